"""Edge deployment bundles: ``deploykit package``, ``deploykit unpack``, ``deploykit device-verify``.

A bundle is one ``.tar.gz`` holding a single folder (``<run>-<target>/``)::

    manifest.json                  SHA-256 and size of every other file, tool versions, target, flags,
                                   the figures measured where it was packaged
    README.md                      what to run on the device
    model/model.int8.onnx          the portable Q/DQ model: the source of truth
    model/model.onnx               the FP32 model it was calibrated from
    model/model.int8.ranges.json   the calibration ranges (and the smoothing record)
    model/calibration.cache        TensorRT < 11 targets (implicit INT8 calibration still exists there)
    plugins/...                    deploykit's op sources (reference, ONNX function, Triton, TRT plugin)
    plugins/ptx/*.ptx              their kernels compiled for the target GPU (GPU targets)
    engines/*.engine, *.json       engines built for exactly this target (GPU, TensorRT version), if any
    verify/inputs.npz (+ .json)    the saved verification inputs (hash recorded)
    verify/expected.npz            torch FP32 outputs (``reference``) and each variant's outputs here
    verify/thresholds.json         the checks device-verify applies

Next to the archive, ``<bundle>.sha256`` (``sha256sum`` format) covers the archive itself.

``unpack`` refuses, with one line naming the archive and exit code 2, and without writing
outside the destination: archive members with absolute paths, ``..`` or odd names, links,
devices, FIFOs or sparse files, names that appear twice (also differing only in case) or as
both file and folder; a manifest that is missing, not JSON, or not the expected objects and
types; any path the manifest names (``files``, ``variants``) that is not a plain relative path
inside the bundle, a variant that is not a listed (hashed) ONNX file; a member larger than the
size its manifest declares, or past the ceilings (``MAX_MEMBER_BYTES``, ``MAX_TOTAL_BYTES``,
``MAX_MEMBERS``); a file whose SHA-256 differs from the manifest, a file the manifest does not
list, or one it lists that is missing; a bundle for another target; a TensorRT bundle on a
machine whose TensorRT the target's range excludes. All of that but the hashes is checked
before anything is written; files are then streamed into a private staging folder, each
stopped at its declared size and hashed as written, and the folder is renamed into place (a
failed unpack leaves nothing). ``device-verify`` adds: another CPU architecture than the
target's, an engine whose metadata names another GPU or TensorRT, a model whose external
weights are not listed files of the bundle, and malformed thresholds or arrays (checked before
numpy allocates them). The manifest's hashes catch corruption and edits of single files; a bundle whose
manifest was rewritten as well is only caught by the outer ``.sha256`` (or a signature over
it, which deploykit leaves to the release process).
"""

from deploykit.package.device import device_verify
from deploykit.package.manifest import FORMAT, VERIFY_BATCH, check_manifest
from deploykit.package.unpack import unpack_bundle, verify_tree
from deploykit.package.write import BundleResult, GateFailed, bundle_profile, derived_rules, package_run

__all__ = ["GateFailed", "package_run", "unpack_bundle", "device_verify", "verify_tree", "BundleResult", "FORMAT",
           "VERIFY_BATCH", "bundle_profile", "check_manifest", "derived_rules"]
