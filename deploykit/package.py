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

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import json
import platform
import os
import shutil
import stat
import tarfile
import tempfile
import zlib
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import numpy as np

import deploykit
from deploykit.errors import UserError
from deploykit.io import atomic_path, critical_section, current_umask, read_json, sha256_file, write_json, write_text
from deploykit.progress import say, stage

FORMAT = "deploykit-bundle/1"
VARIANTS = {"int8": "model.int8.onnx", "fp32": "model.onnx"}
PRIMARY = "int8"
VERIFY_BATCH = 32                   # device-verify's inference batch
def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"deploykit": deploykit.__version__, "python": platform.python_version()}
    for dist in ("torch", "onnx", "onnxruntime", "onnxscript", "transformers", "numpy", "triton", "tensorrt"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


# ----------------------------------------------------------------------------- package
class GateFailed(Exception):
    """The models miss their thresholds where they are packaged: a bundle would only fail on the device."""


@dataclass
class BundleResult:
    path: Path
    sha256: str
    size_bytes: int
    files: int
    manifest: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        return {"path": str(self.path), "sha256": self.sha256, "size_bytes": self.size_bytes, "files": self.files}


def _run_file(run_dir: Path, rel: str, what: str) -> Path:
    path = run_dir / rel
    if not path.is_file():
        raise UserError(f"the run has no {what} ({rel})", path=run_dir,
                        fix="package the folder of a finished deploykit run (runs/<name>)")
    return path


def _plugin_sources() -> dict[str, bytes]:
    root = resources.files("deploykit.plugins")
    out: dict[str, bytes] = {}

    def walk(node, prefix: str) -> None:
        for child in sorted(node.iterdir(), key=lambda c: c.name):
            if child.is_dir() and not child.name.startswith(("_", ".")):
                walk(child, f"{prefix}{child.name}/")
            elif child.name.endswith(".py"):
                out[f"plugins/{prefix}{child.name}"] = child.read_bytes()

    walk(root, "")
    return out


def _engines_for(models: dict[str, Path], target) -> tuple[dict[str, Path], list[str]]:
    """Engines next to the bundled models (``deploykit build`` writes ``<model>.engine`` and its
    ``.json``) that were built from exactly those files, for exactly ``target``'s GPU and
    TensorRT; under the bundle's canonical names."""
    from deploykit.targets import check_engine

    picked: dict[str, Path] = {}
    notes: list[str] = []
    for kind, model in models.items():
        engine, meta = model.with_suffix(".engine"), model.with_suffix(".json")
        if not engine.is_file():
            continue
        info = read_json(meta, what="engine metadata") if meta.is_file() else {}
        if info.get("onnx_sha256") and info["onnx_sha256"] != sha256_file(model):
            notes.append(f"{engine.name} not bundled: built from another version of {model.name}")
            continue
        try:
            check_engine(info, target, engine)
        except UserError as exc:
            notes.append(f"{engine.name} not bundled: {exc.message}")
            continue
        stem = Path(VARIANTS[kind]).stem
        picked[f"engines/{stem}.engine"] = engine
        if meta.is_file():
            picked[f"engines/{stem}.json"] = meta
    return picked, notes


def _device_readme(name: str, target, has_engine: bool) -> str:
    lines = [f"# deploykit bundle {name}", "",
             f"Target: {target.name} ({target.description}); runtime {target.runtime.describe()}, arch {target.arch}"
             + (f", sm_{target.compute_capability.replace('.', '')}" if target.compute_capability else "") + ".", "",
             "On the device (deploykit installed):", "", "```bash",
             f"sha256sum -c {name}.tar.gz.sha256",
             f"deploykit unpack {name}.tar.gz --target {target.name}",
             f"deploykit device-verify {name}"]
    lines += ["```", "", "`model/model.int8.onnx` is the model to deploy (explicit Q/DQ)."]
    if target.runtime.name == "tensorrt":
        lines += ["device-verify uses the bundled engine when it was built for this GPU and TensorRT"
                  + (" (one is bundled)" if has_engine else " (none is bundled)")
                  + ", else builds one from the Q/DQ model with `deploykit build`."]
        if target.int8_calibrator:
            lines += ["`model/calibration.cache` carries the same ranges as a TensorRT calibration cache for "
                      "TensorRT's implicit INT8 path (trtexec --int8 --calib=model/calibration.cache "
                      "--onnx=model/model.onnx); the Q/DQ model is the preferred path."]
    return "\n".join(lines) + "\n"


def _run_models(run_dir: Path, report: dict[str, Any], target, variant: str | None) -> tuple[dict[str, Path], Path, str]:
    """(``{"int8": .., "fp32": ..}``, ranges file, bundle name stem) of a run or of one study variant."""
    if variant is None:
        if not (run_dir / "model.onnx").is_file() and (report.get("study") or {}):
            names = ", ".join((report.get("study") or {}).get("variants") or []) or "see the run folder"
            raise UserError("this run is a study of several variants", path=run_dir,
                            fix=f"choose one with --variant ({names})")
        models = {v: _run_file(run_dir, rel, f"{v} model") for v, rel in VARIANTS.items()}
        return models, _run_file(run_dir, "model.int8.ranges.json", "calibration ranges"), \
            str(report.get("run") or run_dir.name)
    vdir = run_dir / variant
    if not vdir.is_dir():
        raise UserError(f"the run has no variant '{variant}'", path=run_dir,
                        fix="choose a variant folder of the run (--variant)")
    presets = [target.preset] + [p.name[len("model."):-len(".ranges.json")]
                                 for p in sorted(vdir.glob("model.*.ranges.json"))]
    preset = next((p for p in presets if (vdir / f"model.{p}.onnx").is_file()
                   and (vdir / f"model.{p}.ranges.json").is_file()), None)
    if preset is None:
        raise UserError(f"variant '{variant}' has no calibrated Q/DQ model", path=vdir,
                        fix="run the study with a quantization preset (study.presets)")
    models = {"int8": vdir / f"model.{preset}.onnx", "fp32": _run_file(vdir, "model.onnx", "FP32 model")}
    return models, vdir / f"model.{preset}.ranges.json", f"{report.get('run') or run_dir.name}-{variant}"


def package_run(run_dir: str | Path, target_name: str, out: str | Path | None = None, *,
                samples: int | None = None, targets_file: str | Path | None = None,
                variant: str | None = None, allow_failing: bool = False,
                outputs: dict[str, np.ndarray] | None = None) -> BundleResult:
    """Write the edge bundle of a finished run (or of one variant of a study run) for ``target_name``.

    ``outputs``: each model's ORT CPU outputs on the whole evaluation split in batches of
    ``VERIFY_BATCH``, when the caller has them (``run`` has, from verify); used when the bundle
    carries the whole split, else computed here."""
    from deploykit.data import Split, load_split, split_arrays, split_record
    from deploykit.io import read_npz
    from deploykit.onnx_utils import get_metadata, load_onnx
    from deploykit.runners import OrtRunner
    from deploykit.targets import check_model, get_target
    from deploykit.verify import evaluate_checks, parity_entry, run_split

    from deploykit.runfolder import check_complete

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError("run folder not found", path=run_dir, fix="give the folder of a deploykit run (runs/<name>)")
    check_complete(run_dir)
    target = get_target(target_name, targets_file)
    report = read_json(_run_file(run_dir, "report.json", "report"), what="report")
    models, ranges_path, stem = _run_models(run_dir, report, target, variant)
    inputs_path = _run_file(run_dir, "data/evaluation.npz", "saved evaluation inputs")
    from deploykit.quantize.record import read_ranges

    ranges = read_ranges(ranges_path, quantized=models["int8"], fp32=models["fp32"])   # refuses mixed runs
    notes = []
    for name_, path in models.items():
        notes += [f"{name_}: {n}" for n in check_model(path, target)]   # refuses what the target cannot run
    name = f"{stem}-{target.name}"
    out = Path(out) if out is not None else run_dir / "bundles" / f"{name}.tar.gz"
    if not out.name.endswith(".tar.gz"):
        raise UserError("a bundle is a .tar.gz file", path=out, fix=f"name it e.g. {name}.tar.gz")

    fp32_meta = get_metadata(load_onnx(models["fp32"], load_weights=False))
    source = fp32_meta.get("source") or report.get("model")
    task = str(fp32_meta.get("task") or "text-embedding")
    input_names = [i.name for i in load_onnx(models["fp32"], load_weights=False).graph.input]
    split = load_split(inputs_path, input_names)
    n = split.count if samples is None else min(int(samples), split.count)
    if n < 1:
        raise UserError("--samples must be at least 1", fix="e.g. --samples 256")
    feeds = {k: np.ascontiguousarray(v[:n]) for k, v in split.feeds.items()}
    labels = split.labels[:n] if split.labels is not None else None
    reference_path = run_dir / "reference.npz"
    if variant is None and reference_path.is_file():
        reference = read_npz(reference_path, what="reference outputs").get("output")
        if reference is None or reference.shape[0] != split.count:
            raise UserError("reference.npz does not match the saved evaluation inputs", path=reference_path,
                            fix="re-run the recipe (deploykit run) to write both together")
        reference = reference[:n]
    else:
        # A study variant's weights were trained in the run (its export does not record them as a
        # source option), so its reference is its FP32 ONNX, checked against torch at export.
        reference = run_split(OrtRunner(models["fp32"]), Split("inputs", feeds, split.sha256), batch_size=32,
                              description="reference (fp32 ONNX)")
        parity = (read_json(models["fp32"].parent / "variant.json", what="variant record").get("export_parity")
                  if (models["fp32"].parent / "variant.json").is_file() else None)
        notes.append("reference outputs: the variant's FP32 ONNX on ONNX Runtime (its export matched torch to "
                     f"max |diff| {parity if parity is not None else 'unknown'})")

    # Canonical names inside the bundle, whatever the run called the files.
    files: dict[str, bytes | Path] = {"model/model.int8.onnx": models["int8"], "model/model.onnx": models["fp32"],
                                      "model/model.int8.ranges.json": ranges_path}
    expected = {"reference": reference}
    figures: dict[str, Any] = {}
    part = Split("inputs", feeds, split.sha256, labels=labels)
    with stage(f"package {run_dir} for {target.name}: expected outputs on {n} inputs (ort-cpu)"):
        for kind, path in models.items():
            known = (outputs or {}).get(kind)
            expected[kind] = known if known is not None and known.shape[0] == n == split.count else \
                run_split(OrtRunner(path), part, batch_size=VERIFY_BATCH, description=f"expected {kind}")
            figures[f"{kind}@ort-cpu"] = parity_entry(task, reference, expected[kind], labels)
    rules = dict((report.get("recipe_settings") or {}).get("acceptance") or {}) if variant is None else {}
    rules = {k: v for k, v in rules.items() if k.split("@")[0].split(".")[0] in VARIANTS}
    if not rules:
        rules = derived_rules(figures)
        notes.append("the recipe gives no thresholds for these models: device-verify checks the ones derived from "
                     f"the figures here ({', '.join(f'{k} {v}' for k, v in rules.items())})")
    checks_here = evaluate_checks(rules, figures)
    failed = [f"{c['check']} {c['threshold']} (here {c['value']})" for c in checks_here if not c["passed"]]
    if failed and not allow_failing:
        raise GateFailed(f"not packaged: the models miss their thresholds already here: {'; '.join(failed)}")
    if failed:
        notes.append(f"packaged although the models miss thresholds here: {'; '.join(failed)}")

    buf = io.BytesIO()
    np.savez(buf, **split_arrays(part))
    files["verify/inputs.npz"] = buf.getvalue()
    files["verify/inputs.json"] = json.dumps(split_record(part), indent=2).encode()
    buf = io.BytesIO()
    np.savez(buf, **expected)
    files["verify/expected.npz"] = buf.getvalue()
    files["verify/thresholds.json"] = json.dumps({"task": task, "rules": rules, "primary": PRIMARY}, indent=2).encode()

    engines: dict[str, Path] = {}
    if target.is_gpu:
        from deploykit.bundle_gpu import plugin_ptx

        files.update(_plugin_sources())
        for kind, path in models.items():
            ptx, ptx_notes = plugin_ptx(load_onnx(path), target.compute_capability)
            files.update({f"plugins/ptx/{fname}": text.encode() for fname, text in ptx.items()})
            notes += [f"{kind}: {x}" for x in ptx_notes]
        if target.int8_calibrator:
            from deploykit.bundle_gpu import calibration_cache

            try:
                files["model/calibration.cache"] = calibration_cache(
                    ranges, target.runtime.min_version,
                    load_onnx(models["fp32"], load_weights=False)).encode()
            except UserError as exc:       # e.g. smoothed ranges: they describe another graph than model.onnx
                notes.append(f"no calibration cache: {exc.message}")
        engines, engine_notes = _engines_for(models, target)
        files.update(engines)
        notes += engine_notes
    elif any(n.domain == "deploykit" for n in load_onnx(models["int8"], load_weights=False).graph.node):
        files.update(_plugin_sources())     # the ops' sources travel with the model that uses them
    files["README.md"] = _device_readme(name, target, bool(engines)).encode()

    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    entries: dict[str, dict[str, Any]] = {}
    for rel, content in sorted(files.items()):
        if isinstance(content, Path):
            entries[rel] = {"sha256": sha256_file(content), "bytes": content.stat().st_size}
        else:
            entries[rel] = {"sha256": hashlib.sha256(content).hexdigest(), "bytes": len(content)}
    settings = report.get("recipe_settings") or {}
    manifest = {
        "profile": {k: list(v) for k, v in asdict(bundle_profile(settings)).items()},
        "format": FORMAT, "name": name, "created": created, "target": target.to_dict(),
        "model": source, "recipe": report.get("recipe"), "run": report.get("run"),
        "variants": {"int8": "model/model.int8.onnx", "fp32": "model/model.onnx"}, "primary": PRIMARY,
        "task": task, "source_files": {v: str(p) for v, p in models.items()},
        "inputs": {"names": list(feeds), "samples": n, "sha256": split.sha256},
        "versions": _versions(),
        "flags": {"quantize": settings.get("quantize"), "export": settings.get("export"),
                  "calibration": report.get("calibration"),
                  "engines": {rel: read_json(p, what="engine metadata") for rel, p in engines.items()
                              if rel.endswith(".json")}},
        "verify": {"here": {"machine": report.get("environment", {}).get("cpu"), "figures": figures,
                            "checks": checks_here, "run_parity": report.get("parity")},
                   "rules": rules},
        "latency_here": (report.get("targets") or {}).get(target.name),
        "notes": notes,
        "files": entries,
    }
    files["manifest.json"] = (json.dumps(manifest, indent=2, allow_nan=False, default=str) + "\n").encode()

    with stage(f"write {out}"):
        mtime = int(_dt.datetime.fromisoformat(created).timestamp())
        with atomic_path(out, inputs=tuple(models.values())) as tmp:
            with tarfile.open(tmp, "w:gz", compresslevel=6) as tar:
                _add_dir(tar, name, mtime)
                for rel in sorted(files):
                    _add_file(tar, f"{name}/{rel}", files[rel], mtime)
        digest = sha256_file(out)
        write_text(out.with_name(out.name + ".sha256"), f"{digest}  {out.name}\n")
    say(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {len(files)} files) and {out.name}.sha256")
    for note in notes:
        say(f"  note: {note}")
    return BundleResult(out, digest, out.stat().st_size, len(files), manifest)


def bundle_profile(settings: dict[str, Any]):
    """The TensorRT profile device-verify builds with: the recipe's shapes (``recipe_settings`` of
    its report, as ``ShapeRanges.from_recipe``), with room for device-verify's batches of 32."""
    from deploykit.engine import ShapeRanges

    bench = settings.get("bench") or {}
    ranges = ShapeRanges.from_shapes(bench.get("batches") or [1, 8, 32], int(bench.get("seq_len") or 128),
                                     ((settings.get("model") or {}).get("options") or {}).get("max_length"))
    lo, opt, hi = ranges.batch
    return ShapeRanges(batch=(lo, opt, max(hi, VERIFY_BATCH)), sequence=ranges.sequence)


def derived_rules(figures: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Thresholds for a bundle whose recipe gives none: FP32 must match torch (cosine_min >=
    0.9999: float rounding across CPUs and runtimes stays far above it), and INT8 may lose at
    most 0.005 mean cosine against what it measured where it was packaged (int8 kernels differ
    between CPUs and GPUs by rounding, not by that much)."""
    rules = {"fp32.cosine_min": ">= 0.9999"}
    here = (figures.get(f"{PRIMARY}@ort-cpu") or {}).get("cosine_mean")
    if here is not None:
        rules[f"{PRIMARY}.cosine_mean"] = f">= {max(0.0, np.floor((here - 0.005) * 1e4) / 1e4):.4f}"
    return rules


def _add_dir(tar: tarfile.TarFile, name: str, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, mtime
    tar.addfile(info)


def _add_file(tar: tarfile.TarFile, arcname: str, content: bytes | Path, mtime: int) -> None:
    info = tarfile.TarInfo(arcname)
    info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = 0o644, mtime, 0, 0, "", ""
    if isinstance(content, Path):
        info.size = content.stat().st_size
        with open(content, "rb") as fh:
            tar.addfile(info, fh)
    else:
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))


# ----------------------------------------------------------------------------- unpack
# Ceilings on what reading a bundle may write or load, whatever its manifest declares. A bundle
# holds one transformer (FP32 and INT8, a few hundred MiB at most for the models deploykit ships),
# its engines and the verification arrays; these leave room for models up to about 2 GiB (ONNX's
# protobuf limit without external data) and refuse a decompression bomb long before a disk fills.
MAX_MEMBER_BYTES = 4 * 2**30        # one file of the bundle
MAX_TOTAL_BYTES = 8 * 2**30         # all its files together
MAX_MEMBERS = 10_000                # archive entries (files and folders)
MAX_MANIFEST_BYTES = 16 * 2**20     # manifest.json, read into memory
_CHUNK = 1 << 20                    # extraction writes (and checks its bounds) this much at a time
_HEX = frozenset("0123456789abcdef")
_REQUIRED = ("verify/inputs.npz", "verify/expected.npz", "verify/thresholds.json")
_FIX_BAD = "do not use this bundle; re-package the run with deploykit package"


def _unsafe_rel(rel: Any) -> str | None:
    """Why ``rel`` is not a plain relative path inside a bundle (None when it is)."""
    if not isinstance(rel, str) or not rel:
        return "is not a non-empty string"
    if len(rel) > 4096 or any(ord(c) < 32 for c in rel):
        return "is too long or holds control characters"
    if rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":"):
        return "is an absolute path"
    if "\\" in rel:
        return "holds a backslash"
    parts = rel.split("/")
    if ".." in parts:
        return "climbs out of the bundle ('..')"
    if any(p in ("", ".") or len(p) > 255 for p in parts):
        return "is not a plain relative path"
    return None


def _bad(message: str, where: Path | str) -> UserError:
    return UserError(message, path=where, fix=_FIX_BAD)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def check_manifest(manifest: Any, where: Path | str) -> dict[str, Any]:
    """The manifest's structure, every path it names and every size it declares; the manifest.

    Every path (``files``' keys, ``variants``' values) must be a plain relative path inside the
    bundle, and every model a variant names must be one of ``files`` (so it is hash-checked)."""
    if not isinstance(manifest, dict):
        raise _bad(f"manifest.json is {_kind(manifest)}, not a JSON object", where)
    if manifest.get("format") != FORMAT:
        raise _bad(f"manifest.json is not a {FORMAT} manifest (format {manifest.get('format')!r})", where)
    for key, kind in (("name", str), ("files", dict), ("variants", dict), ("target", dict), ("inputs", dict)):
        if key not in manifest:
            raise _bad(f"manifest.json lacks '{key}'", where)
        if not isinstance(manifest[key], kind) or isinstance(manifest[key], bool):
            raise _bad(f"manifest.json '{key}' is {_kind(manifest[key])}, not {_kind(kind())}", where)
    files = manifest["files"]
    total = 0
    for rel, entry in files.items():
        why = _unsafe_rel(rel)
        if why or rel == "manifest.json":
            raise _bad(f"the manifest lists an unsafe path '{rel}' ({why or 'the manifest itself'})", where)
        if not isinstance(entry, dict):
            raise _bad(f"manifest.json files['{rel}'] is {_kind(entry)}, not an object with sha256 and bytes",
                       where)
        digest, size = entry.get("sha256"), entry.get("bytes")
        if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _HEX:
            raise _bad(f"manifest.json files['{rel}'] has no SHA-256 (64 lowercase hex digits)", where)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise _bad(f"manifest.json files['{rel}'] has no size in bytes", where)
        if size > MAX_MEMBER_BYTES:
            raise _bad(f"bundle file {rel} declares {size} bytes, over the {MAX_MEMBER_BYTES} a bundle file may hold",
                       where)
        total += size
    if total > MAX_TOTAL_BYTES:
        raise _bad(f"the bundle declares {total} bytes, over the {MAX_TOTAL_BYTES} a bundle may hold", where)
    for rel in _REQUIRED:
        if rel not in files:
            raise _bad(f"manifest.json does not list {rel}", where)
    variants = manifest["variants"]
    if not variants:
        raise _bad("manifest.json names no variants", where)
    for variant, rel in variants.items():
        if not isinstance(rel, str):
            raise _bad(f"manifest.json variants['{variant}'] is {_kind(rel)}, not a path in the bundle", where)
        why = _unsafe_rel(rel)
        if why:
            raise _bad(f"manifest.json variants['{variant}'] names an unsafe path '{rel}' ({why})", where)
        if rel not in files or not rel.endswith(".onnx"):
            raise _bad(f"manifest.json variants['{variant}'] names '{rel}', which is not an ONNX file the "
                       "manifest lists (and hashes)", where)
    if manifest.get("primary") is not None and manifest["primary"] not in variants:
        raise _bad(f"manifest.json primary '{manifest['primary']}' is not one of its variants", where)
    name = manifest["target"].get("name")
    if not isinstance(name, str) or not name:
        raise _bad("manifest.json target has no name", where)
    names = manifest["inputs"].get("names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise _bad("manifest.json inputs.names is not a list of input names", where)
    profile = manifest.get("profile")
    if profile is not None:
        if not isinstance(profile, dict):
            raise _bad(f"manifest.json profile is {_kind(profile)}, not an object", where)
        for key, value in profile.items():
            if not (isinstance(value, list) and len(value) == 3
                    and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
                raise _bad(f"manifest.json profile['{key}'] is not [min, opt, max] positive integers", where)
    return manifest


def _parse_manifest(data: bytes, where: Path | str) -> dict[str, Any]:
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        reason = " ".join(str(getattr(exc, "msg", exc)).split())[:120] or type(exc).__name__
        raise _bad(f"manifest.json is not valid JSON ({reason})", where) from None
    return check_manifest(manifest, where)


def _member_error(name: str, why: str, archive: Path) -> UserError:
    fix = ("do not use this bundle; deploykit bundles hold only files and folders" if "link" in why or "device" in why
           else _FIX_BAD)
    return UserError(f"archive member '{name}' {why}", path=archive, fix=fix)


def _scan_members(tar: tarfile.TarFile, archive: Path) -> tuple[str, dict[str, tarfile.TarInfo], set[str]]:
    """(top folder, ``{relative path: member}`` of the files, relative folders), reading headers one
    at a time: names, types, duplicates and the size ceilings are checked before the next header
    is read, so a bomb is refused after reading at most the ceilings' worth of the archive."""
    tops: set[str] = set()
    files: dict[str, tarfile.TarInfo] = {}
    dirs: set[str] = set()
    seen: dict[str, str] = {}
    total = count = 0
    while True:
        member = tar.next()
        if member is None:
            break
        count += 1
        if count > MAX_MEMBERS:
            raise UserError(f"the archive holds more than {MAX_MEMBERS} entries", path=archive, fix=_FIX_BAD)
        name = member.name
        if member.issym() or member.islnk():
            raise _member_error(name, "is a link", archive)
        if member.isdev() or member.ischr() or member.isblk() or member.isfifo():
            raise _member_error(name, "is a device or FIFO", archive)
        if member.type == tarfile.GNUTYPE_SPARSE or member.issparse() or not (member.isfile() or member.isdir()):
            raise _member_error(name, "is not a regular file or folder", archive)
        rel = name.rstrip("/") if member.isdir() else name
        why = _unsafe_rel(rel)
        if why:
            raise _member_error(name, why, archive)
        key = rel.casefold()
        if key in seen:
            raise _member_error(name, f"appears twice in the archive (as '{seen[key]}' too)", archive)
        seen[key] = name
        if member.size > MAX_MEMBER_BYTES:
            raise _member_error(name, f"holds {member.size} bytes, over the {MAX_MEMBER_BYTES} a bundle file may hold",
                                archive)
        total += member.size
        if total > MAX_TOTAL_BYTES:
            raise UserError(f"the archive holds more than {MAX_TOTAL_BYTES} bytes", path=archive, fix=_FIX_BAD)
        parts = rel.split("/")
        tops.add(parts[0])
        inner = "/".join(parts[1:])
        if member.isdir():
            if inner:
                dirs.add(inner)
        elif not inner:
            tops.add("")              # a file at the top: not a bundle folder
        else:
            files[inner] = member
    if len(tops) != 1 or "" in tops:
        raise UserError("the archive does not hold exactly one bundle folder", path=archive,
                        fix="use an archive written by deploykit package")
    for rel in files:                 # a file where a folder is needed ('model' and 'model/x.onnx')
        parents = ["/".join(rel.split("/")[:i]) for i in range(1, rel.count("/") + 1)]
        clash = next((p for p in parents if p in files), None) or (rel if rel in dirs else None)
        if clash:
            raise _member_error(clash, "is both a file and a folder in the archive", archive)
    return tops.pop(), files, dirs


def _copy_bounded(src, fd: int, limit: int, rel: str, where: Path | str) -> tuple[int, str]:
    """Copy ``src`` into the open file ``fd`` in chunks; (bytes, SHA-256). Refuses as soon as more
    than ``limit`` bytes arrive: at most one chunk past the limit is read, none of it written."""
    h = hashlib.sha256()
    written = 0
    while True:
        chunk = src.read(_CHUNK)
        if not chunk:
            return written, h.hexdigest()
        if written + len(chunk) > limit:
            raise _bad(f"bundle file {rel} holds more than the {limit} bytes its manifest declares "
                       "(or the ceiling allows)", where)
        h.update(chunk)
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view):]
        written += len(chunk)


def _write_member(src, path: Path, limit: int, rel: str, where: Path | str) -> tuple[int, str]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        return _copy_bounded(src, fd, limit, rel, where)
    except BaseException:
        os.close(fd)
        fd = -1
        path.unlink(missing_ok=True)          # the partial file goes at once, not with the staging folder
        raise
    finally:
        if fd >= 0:
            os.close(fd)


def _hash_file(folder: Path, rel: str, entry: dict[str, Any], where: Path | str) -> None:
    """The file ``rel`` of an unpacked bundle: a regular file (no link on the way), of the
    declared size and SHA-256."""
    path = folder
    for part in rel.split("/"):
        path = path / part
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise UserError(f"bundle file {rel} is missing", path=where, fix="fetch the bundle again") from None
        if stat.S_ISLNK(st.st_mode):
            raise UserError(f"bundle file {rel} is a link", path=where, fix="do not use this bundle")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"bundle file {rel} is not a regular file", path=where, fix="do not use this bundle")
    if st.st_size != entry["bytes"]:
        raise UserError(f"bundle file {rel} is {st.st_size} bytes, not the {entry['bytes']} its manifest declares "
                        "(tampered or corrupted)", path=where, fix="do not use this bundle; fetch it again")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as fh:
        h = hashlib.sha256()
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    if h.hexdigest() != entry["sha256"]:
        raise UserError(f"bundle file {rel} does not match its manifest SHA-256 (tampered or corrupted)",
                        path=where, fix="do not use this bundle; fetch it again")


def _check_sidecar(archive: Path) -> None:
    sidecar = archive.with_name(archive.name + ".sha256")
    if not sidecar.is_file():
        return
    with open(sidecar, "rb") as fh:
        recorded = fh.read(4096).decode("utf-8", errors="replace").split()
    if not recorded or recorded[0].lower() != sha256_file(archive):
        raise UserError(f"the archive does not match its SHA-256 in {sidecar.name} (tampered or corrupted)",
                        path=archive, fix="fetch the bundle again")


def verify_tree(folder: Path, shown: Path | str | None = None) -> dict[str, Any]:
    """Check an unpacked bundle against its manifest; the manifest. Refuses links, anything
    that is not a file or folder, files the manifest does not list, listed files that are missing
    or differ in size or SHA-256, and any manifest :func:`check_manifest` refuses. Errors name
    ``shown`` (default: the folder)."""
    folder = Path(folder)
    where = shown if shown is not None else folder
    manifest_path = folder / "manifest.json"
    try:
        st = os.lstat(manifest_path)
    except FileNotFoundError:
        raise UserError("the bundle has no manifest.json", path=where,
                        fix="give a folder deploykit unpack wrote, or the bundle archive") from None
    if not stat.S_ISREG(st.st_mode):
        raise _bad("manifest.json is not a regular file", where)
    if st.st_size > MAX_MANIFEST_BYTES:
        raise _bad(f"manifest.json is over {MAX_MANIFEST_BYTES} bytes", where)
    with open(manifest_path, "rb") as fh:
        manifest = _parse_manifest(fh.read(MAX_MANIFEST_BYTES + 1), where)
    listed = manifest["files"]
    present: set[str] = set()
    for root, dirnames, filenames in os.walk(folder):          # does not follow links
        for name in dirnames + filenames:
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                raise UserError(f"bundle file {rel} is a link", path=where, fix="do not use this bundle")
            if stat.S_ISREG(mode):
                present.add(rel)
            elif not stat.S_ISDIR(mode):
                raise UserError(f"bundle file {rel} is not a regular file or folder", path=where,
                                fix="do not use this bundle")
    present.discard("manifest.json")
    extra = sorted(present - set(listed))
    if extra:
        raise UserError(f"bundle file {extra[0]} is not in the manifest (added after packaging)", path=where,
                        fix="do not use this bundle; fetch it again")
    for rel, entry in sorted(listed.items()):
        _hash_file(folder, rel, entry, where)
    return manifest


def _check_target(manifest: dict[str, Any], expected: str | None, where: Path):
    from deploykit.targets import parse_target

    raw = dict(manifest.get("target") or {})
    name = raw.pop("name", None)
    if not name:
        raise UserError("the manifest names no target", path=where, fix="use a bundle written by deploykit package")
    if expected is not None and expected != name:
        raise UserError(f"the bundle is for target '{name}', not '{expected}'", path=where,
                        fix=f"package the run for {expected}: deploykit package <run> --target {expected}")
    raw.pop("source", None)
    target = parse_target(name, raw, f"{where} (manifest)")
    if target.runtime.name == "tensorrt":
        version = _tensorrt_version()
        if version is not None and not target.runtime.accepts(version):
            raise UserError(f"the bundle is for {target.runtime.describe()} (target '{name}'); this machine has "
                            f"TensorRT {version}", path=where,
                            fix="package for a target whose TensorRT range holds this version")
    return target


def _tensorrt_version() -> str | None:
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return None
    from importlib import metadata

    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt_libs"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _prepare_parent(dest: Path, archive: Path) -> list[Path]:
    """Create the missing folders above ``dest``; the ones created (outermost first). A parent
    that is a file, or an existing ``dest`` that is a link, a file or a non-empty folder, is refused."""
    for parent in reversed(dest.parents):
        if parent.exists() and not parent.is_dir():
            raise UserError(f"cannot unpack {archive} here: {parent} is a file, not a folder", path=dest,
                            fix="choose an --out path whose folders are folders")
    if dest.is_symlink():
        raise UserError("the destination is a link", path=dest, fix="choose a new folder with --out")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UserError("the destination exists and is not empty", path=dest,
                        fix="choose a new folder with --out (unpack never overwrites)")
    created: list[Path] = []
    missing = [p for p in reversed(dest.parents) if not p.exists()]
    try:
        for parent in missing:
            parent.mkdir()
            created.append(parent)
    except OSError as exc:
        _remove_created(created)
        raise UserError(f"cannot create the folder to unpack {archive} into ({os.strerror(exc.errno or 0) or exc})",
                        path=dest, fix="choose an --out path you can write to") from None
    return created


def _remove_created(created: list[Path]) -> None:
    for parent in reversed(created):
        try:
            parent.rmdir()
        except OSError:
            pass


def unpack_bundle(archive: str | Path, dest: str | Path | None = None, *, target: str | None = None,
                  announce: bool = True) -> Path:
    """Unpack and check a bundle into ``dest`` (default ``./<bundle name>``); the folder.

    Members are checked from their headers first (names, types, duplicates, sizes against the
    ceilings and the manifest's declared sizes), the manifest and target before anything is
    written; files are then streamed into a private staging folder beside ``dest``, each bounded
    by its declared size and hashed as it is written, and the folder is renamed onto ``dest`` at
    the end. On any error the staging folder and the folders created for it are removed."""
    archive = Path(archive)
    if archive.is_dir():
        raise UserError("this is a folder, not a bundle archive", path=archive,
                        fix="device-verify an unpacked folder directly; unpack takes the .tar.gz")
    if not archive.is_file():
        raise UserError("bundle not found", path=archive, fix="check the path")
    _check_sidecar(archive)
    damaged = (tarfile.TarError, OSError, EOFError, zlib.error)
    try:
        tar = tarfile.open(archive, "r:*")
    except damaged as exc:
        raise UserError(f"not a readable bundle archive ({exc})", path=archive,
                        fix="use the .tar.gz written by deploykit package; fetch it again if it was cut short") from None
    with tar:
        try:
            top, members, dirs = _scan_members(tar, archive)
            if "manifest.json" not in members:
                raise UserError("the archive holds no manifest.json", path=archive,
                                fix="use an archive written by deploykit package")
            if members["manifest.json"].size > MAX_MANIFEST_BYTES:
                raise _bad(f"manifest.json is over {MAX_MANIFEST_BYTES} bytes", archive)
            manifest_bytes = tar.extractfile(members["manifest.json"]).read(MAX_MANIFEST_BYTES + 1)
        except damaged as exc:
            raise UserError(f"the bundle archive is damaged ({exc})", path=archive, fix="fetch it again") from None
        manifest = _parse_manifest(manifest_bytes, archive)
        listed = manifest["files"]
        extra = sorted(set(members) - set(listed) - {"manifest.json"})
        if extra:
            raise UserError(f"bundle file {extra[0]} is not in the manifest (added after packaging)", path=archive,
                            fix="do not use this bundle; fetch it again")
        missing = sorted(set(listed) - set(members))
        if missing:
            raise UserError(f"bundle file {missing[0]} is missing", path=archive, fix="fetch the bundle again")
        for rel, member in sorted(members.items()):
            declared = listed[rel]["bytes"] if rel != "manifest.json" else member.size
            if member.size > declared:
                raise _bad(f"bundle file {rel} holds {member.size} bytes, more than the {declared} its manifest "
                           "declares", archive)
        _check_target(manifest, target, archive)

        dest = Path(dest) if dest is not None else Path.cwd() / top
        created = _prepare_parent(dest, archive)
        staging: Path | None = None
        try:
            staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".staging", dir=dest.parent))
            for rel in sorted(dirs):
                (staging / rel).mkdir(parents=True, exist_ok=True)
            (staging / "manifest.json").write_bytes(manifest_bytes)
            budget = MAX_TOTAL_BYTES
            for rel, member in sorted(members.items(), key=lambda item: item[1].offset):
                if rel == "manifest.json":
                    continue
                entry = listed[rel]
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                size, digest = _write_member(tar.extractfile(member), staging / rel,
                                             min(entry["bytes"], MAX_MEMBER_BYTES, budget), rel, archive)
                budget -= size
                if size != entry["bytes"]:
                    raise UserError(f"bundle file {rel} is {size} bytes, not the {entry['bytes']} its manifest "
                                    "declares (tampered or corrupted)", path=archive,
                                    fix="do not use this bundle; fetch it again")
                if digest != entry["sha256"]:
                    raise UserError(f"bundle file {rel} does not match its manifest SHA-256 (tampered or corrupted)",
                                    path=archive, fix="do not use this bundle; fetch it again")
            os.chmod(staging, 0o777 & ~current_umask())
            with critical_section():
                os.replace(staging, dest)         # onto a missing or empty folder
            staging = None
        except BaseException as exc:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            _remove_created(created)
            if isinstance(exc, UserError):
                raise
            if isinstance(exc, (tarfile.TarError, EOFError, zlib.error)):
                raise UserError(f"the bundle archive is damaged ({exc})", path=archive, fix="fetch it again") from None
            if isinstance(exc, OSError):
                reason = os.strerror(exc.errno) if exc.errno else str(exc)
                raise UserError(f"cannot unpack into {dest} ({reason}); nothing was written", path=archive,
                                fix="free disk space or choose another --out") from None
            raise
    if announce:        # device-verify unpacks into a private folder whose name is no concern of the user's
        say(f"unpacked {archive} -> {dest} ({len(manifest['files'])} files, hashes checked, target "
            f"{manifest['target']['name']})")
    return dest


# ----------------------------------------------------------------------------- device-verify
def device_verify(bundle: str | Path, *, target: str | None = None, out: str | Path | None = None,
                  variants: list[str] | None = None, threads: int | None = None, iterations: int = 20,
                  allow_other_arch: bool = False) -> dict[str, Any]:
    """On the device: check the bundle, run it, compare with the expected outputs, time it."""
    bundle = Path(bundle)
    if bundle.is_file():
        with tempfile.TemporaryDirectory(prefix="deploykit-bundle-") as tmp:
            with _shown_as(Path(tmp) / "bundle", bundle):
                folder = unpack_bundle(bundle, Path(tmp) / "bundle", target=target, announce=False)
                return _device_verify(folder, bundle, target, out, variants, threads, iterations, allow_other_arch)
    if not bundle.is_dir():
        raise UserError("bundle not found", path=bundle, fix="give the .tar.gz or the folder deploykit unpack wrote")
    with _shown_as(bundle, bundle):
        return _device_verify(bundle, bundle, target, out, variants, threads, iterations, allow_other_arch)


@contextlib.contextmanager
def _shown_as(folder: Path, shown: Path):
    """Errors about files below ``folder`` (the bundle's folder, or the private folder an archive
    was unpacked into) name ``shown`` (what the user gave) and the file's path inside the bundle;
    their fix is the bundle's (the file was hash-checked: only a new bundle mends it)."""
    try:
        yield
    except UserError as exc:
        root = str(folder)
        path = exc.path or ""
        inside = path.startswith(root + os.sep)
        if not (inside or path == root or root in exc.message or root in (exc.fix or "")):
            raise
        rel = Path(path).relative_to(folder).as_posix() if inside else ""
        message = exc.message.replace(root + os.sep, "").replace(root, str(shown))
        if rel and not message.startswith(rel):
            message = f"{rel}: {message}"
        fix = _FIX_BAD if rel else (exc.fix or "").replace(root + os.sep, "").replace(root, str(shown)) or None
        raise UserError(message, path=shown, fix=fix) from None


def _all_tensors(graph) -> Iterator[Any]:
    """Every tensor a graph (or a function) holds: initializers, sparse ones, and node
    attributes, subgraphs included."""
    yield from getattr(graph, "initializer", ())
    for sparse in getattr(graph, "sparse_initializer", ()):
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)


def _check_model_data(folder: Path, rel: str, listed: dict[str, Any], where: Path) -> None:
    """A bundled ONNX model whose weights live in external files may name only files of the
    bundle that the manifest lists (and that were hash-checked): never a path outside it."""
    import onnx

    try:
        model = onnx.load(str(folder / rel), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises its own types for bad files
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise _bad(f"bundle model {rel} is not a readable ONNX file ({first})", where) from None
    base = PurePosixPath(rel).parent
    for tensor in (t for g in [model.graph, *model.functions] for t in _all_tensors(g)):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        why = _unsafe_rel(location)
        inside = (base / location).as_posix() if not why else None
        if why or inside not in listed:
            raise _bad(f"bundle model {rel} reads its weights from '{location}', "
                       f"{'which ' + why if why else 'a file the manifest does not list'}", where)


def _check_npz(folder: Path, rel: str, where: Path) -> None:
    """A bundled .npz (a zip of .npy arrays), before numpy loads it: plain .npy members, no
    duplicates, each within the ceilings, each array's header no larger than its member."""
    import zipfile

    from numpy.lib import format as npy

    try:
        with zipfile.ZipFile(folder / rel) as zf:
            infos = zf.infolist()
            names = [i.filename for i in infos]
            if len(set(names)) != len(names):
                raise _bad(f"bundle file {rel} holds an array name twice", where)
            if sum(i.file_size for i in infos) > MAX_TOTAL_BYTES or len(infos) > MAX_MEMBERS:
                raise _bad(f"bundle file {rel} unpacks to more than {MAX_TOTAL_BYTES} bytes", where)
            for info in infos:
                if info.is_dir() or not info.filename.endswith(".npy") or _unsafe_rel(info.filename) \
                        or "/" in info.filename:
                    raise _bad(f"bundle file {rel} holds '{info.filename}', not an array", where)
                if info.file_size > MAX_MEMBER_BYTES:
                    raise _bad(f"bundle file {rel}: array {info.filename} unpacks to {info.file_size} bytes, "
                               f"over the {MAX_MEMBER_BYTES} allowed", where)
                with zf.open(info) as fh:
                    version = npy.read_magic(fh)
                    reader = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
                    shape, _, dtype = reader(fh)
                if dtype.hasobject or int(np.prod(shape, dtype=np.float64)) * dtype.itemsize > info.file_size:
                    raise _bad(f"bundle file {rel}: array {info.filename} declares more data than it holds "
                               f"(shape {list(shape)}, {dtype})", where)
    except UserError:
        raise
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zipfile.LargeZipFile,
            NotImplementedError) as exc:
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise _bad(f"bundle file {rel} is not a readable .npz ({reason})", where) from None


def _device_verify(folder: Path, shown: Path, target_name: str | None, out, variants, threads, iterations,
                   allow_other_arch: bool) -> dict[str, Any]:
    from deploykit.bench import BenchConfig, time_runner
    from deploykit.data import iterate_batches, load_split
    from deploykit.io import read_npz
    from deploykit.runners import default_threads
    from deploykit.targets import check_engine, machine_arch
    from deploykit.verify import evaluate_checks, parity_entry

    from deploykit.verify import parse_rule

    manifest = verify_tree(folder, shown)
    target = _check_target(manifest, target_name, shown)
    arch = machine_arch()
    if arch != target.arch and not allow_other_arch:
        raise UserError(f"the bundle is for {target.arch} (target '{target.name}'); this machine is {arch}",
                        path=shown, fix=f"run device-verify on the {target.name} device (or --allow-other-arch to "
                                        "check the numerics here anyway)")
    for meta in sorted((folder / "engines").glob("*.json")) if (folder / "engines").is_dir() else []:
        info = read_json(meta, what="engine metadata")
        if not isinstance(info, dict):
            raise _bad(f"bundle file engines/{meta.name} is {_kind(info)}, not an object", shown)
        try:
            check_engine(info, target, shown / "engines" / meta.name)
        except UserError as exc:        # its own fix (build on the target), not a broken bundle's
            raise UserError(f"engines/{meta.name}: {exc.message}", path=shown, fix=exc.fix) from None
    thresholds = read_json(folder / "verify/thresholds.json", what="thresholds")
    rules = thresholds.get("rules") or {} if isinstance(thresholds, dict) else None
    if not isinstance(rules, dict) or not all(isinstance(k, str) and "." in k and parse_rule(v) is not None
                                              for k, v in rules.items()):
        raise _bad("bundle file verify/thresholds.json is not {task, rules: {'<variant>.<metric>': '>= x'}}", shown)
    task = thresholds.get("task", manifest.get("task"))
    if not isinstance(task, str):
        raise _bad("bundle file verify/thresholds.json names no task", shown)
    for rel in ("verify/expected.npz", "verify/inputs.npz"):
        _check_npz(folder, rel, shown)
    expected = read_npz(folder / "verify/expected.npz", what="expected outputs")
    split = load_split(folder / "verify/inputs.npz", list(manifest["inputs"]["names"]))
    reference = expected.get("reference")
    if reference is None or reference.ndim < 1 or reference.shape[0] != split.count:
        raise _bad(f"bundle file verify/expected.npz holds no 'reference' outputs for the {split.count} inputs", shown)
    chosen = variants or list(manifest["variants"])
    unknown = [v for v in chosen if v not in manifest["variants"]]
    if unknown:
        raise UserError(f"the bundle has no variant(s) {unknown}", path=shown,
                        fix=f"choose from {', '.join(manifest['variants'])}")
    backend, runners = _device_runners(folder, manifest, target, chosen, threads, shown)
    parity: dict[str, Any] = {}
    vs_here: dict[str, Any] = {}
    latency: dict[str, Any] = {}
    with stage(f"device-verify {manifest['name']} on {backend} ({split.count} inputs)"):
        for variant, runner in runners.items():
            try:
                output = np.concatenate([runner.infer(f) for f in iterate_batches(split.feeds, VERIFY_BATCH)],
                                        axis=0)
            except UserError:
                raise
            except Exception as exc:  # noqa: BLE001 - the runtimes raise their own types for bad graphs or feeds
                first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
                raise _bad(f"variant {variant} cannot run on the bundle's inputs ({first})", shown) from None
            if output.shape != reference.shape:
                raise _bad(f"variant {variant} gives outputs of shape {list(output.shape)}, the expected outputs "
                           f"are {list(reference.shape)}", shown)
            key = f"{variant}@{backend}"
            parity[key] = parity_entry(task, reference, output, split.labels)
            here = expected.get(variant)
            if here is not None and here.shape != output.shape:
                raise _bad(f"bundle file verify/expected.npz: '{variant}' has shape {list(here.shape)}, the "
                           f"variant gives {list(output.shape)}", shown)
            if here is not None:
                entry = parity_entry(task, here, output, None)
                vs_here[key] = {k: entry[k] for k in ("cosine_mean", "cosine_min", "max_abs_diff", "snr_db")}
            # One saved input at its full saved shape (text: padded to max_length, as deploykit bench
            # times it), not trimmed to its own length: the figure is comparable across machines.
            feeds = {k: np.ascontiguousarray(v[:1]) for k, v in split.feeds.items()}
            latency[key] = {**time_runner(runner, feeds, BenchConfig(batches=[1], warmup=3, iterations=iterations,
                                                                     min_seconds=0.5, max_seconds=20.0)),
                            "shapes": {k: list(v.shape) for k, v in feeds.items()}}
    checks = evaluate_checks(thresholds.get("rules") or {}, parity)
    passed = all(c["passed"] for c in checks)
    from deploykit.timing import peak_rss_mib

    # The whole check's peak (every model's session, 1,000 inputs and outputs): an upper bound
    # of what serving one model takes, against the target's memory.
    memory = {"peak_rss_mib": round(peak_rss_mib(), 1), "budget_mib": target.memory_gib * 1024}
    memory["within_budget"] = memory["peak_rss_mib"] <= memory["budget_mib"]
    result = {"bundle": str(shown), "name": manifest["name"], "target": target.name, "backend": backend,
              "machine": {"arch": arch, "platform": platform.platform(),
                          "threads": threads or min(target.threads or default_threads(), default_threads())},
              "samples": split.count, "parity": parity, "vs_packaging_machine": vs_here, "latency_b1": latency,
              "memory": memory,
              "checks": checks, "passed": passed}
    _print_device(result)
    if out is not None:
        write_json(Path(out), result)
        say(f"wrote {out}")
    return result


def _device_runners(folder: Path, manifest: dict[str, Any], target, chosen: list[str], threads: int | None,
                    shown: Path) -> tuple[str, dict[str, Any]]:
    from deploykit.runners import OrtRunner, default_threads

    if target.runtime.name == "onnxruntime":
        import onnxruntime as ort

        if not target.runtime.accepts(ort.__version__):
            raise UserError(f"the bundle's target '{target.name}' runs {target.runtime.describe()}; this machine has "
                            f"onnxruntime {ort.__version__}", path=shown, fix="install an onnxruntime in that range")
        n = threads or min(target.threads or default_threads(), default_threads())
        for v in chosen:
            _check_model_data(folder, manifest["variants"][v], manifest["files"], shown)
        return "ort-cpu", {v: OrtRunner(folder / manifest["variants"][v], threads=n) for v in chosen}
    from deploykit.engine import ShapeRanges, TrtRunner, build_engine, engine_info, require_tensorrt

    env = require_tensorrt(shown, plugins=False)   # deploykit ops: plugins from 10.15, else their decomposition
    runners = {}
    for variant in chosen:
        _check_model_data(folder, manifest["variants"][variant], manifest["files"], shown)
        onnx_path = folder / manifest["variants"][variant]
        bundled = folder / "engines" / (Path(manifest["variants"][variant]).stem + ".engine")
        engine = None
        if bundled.is_file():
            info = engine_info(bundled)
            if str(info.get("compute_capability")) == str(env.compute_capability) and \
                    str(info.get("tensorrt")) == str(env.version):
                engine = bundled
        if engine is None:
            engine = folder.parent / f"{folder.name}.engines" / f"{variant}.engine"
            profile = manifest.get("profile") or {}
            ranges = ShapeRanges(**{k: tuple(v) for k, v in profile.items() if k in ("batch", "sequence")})
            with stage(f"build the {variant} engine on this device ({env.gpu})"):
                build_engine(onnx_path, engine, target=target.name, ranges=ranges)
        runners[variant] = TrtRunner(engine)
    return "tensorrt", runners


def _print_device(result: dict[str, Any]) -> None:
    from deploykit.progress import is_quiet

    if is_quiet():
        return
    from rich.table import Table

    from deploykit.progress import console

    table = Table(title=f"device-verify {result['name']} ({result['backend']}, target {result['target']})")
    for col, justify in (("variant@backend", "left"), ("cosine mean", "right"), ("SNR dB", "right"),
                         ("vs packaging machine (cos)", "right"), ("b1 p50 ms", "right")):
        table.add_column(col, justify=justify)
    for key, metrics in result["parity"].items():
        snr = metrics.get("snr_db")
        here = result["vs_packaging_machine"].get(key, {}).get("cosine_mean")
        table.add_row(key, f"{metrics['cosine_mean']:.5f}", "exact" if snr is None else f"{snr:.1f}",
                      "—" if here is None else f"{here:.6f}", f"{result['latency_b1'][key]['p50_ms']:.2f}")
    console.print(table)
    for c in result["checks"]:
        say(f"  {c['check']} {c['threshold']}: {c['value']} -> {'pass' if c['passed'] else 'FAIL'}")
    mem = result["memory"]
    say(f"  peak RSS of the whole check {mem['peak_rss_mib']:.0f} MiB of the target's {mem['budget_mib']:.0f} "
        f"({'within' if mem['within_budget'] else 'OVER'} budget; one model alone takes less)")
    say(f"[bold]{'PASS' if result['passed'] else 'FAIL'}[/]")


__all__ = ["GateFailed", "package_run", "unpack_bundle", "device_verify", "verify_tree", "BundleResult", "FORMAT"]
