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

``unpack`` refuses, with one line and exit code 2, and without writing outside the
destination: archive members with absolute paths, ``..``, links, devices or FIFOs (tarfile's
``data`` filter also runs); a file whose SHA-256 differs from the manifest, a file the
manifest does not list, or one it lists that is missing; a bundle for another target; a
TensorRT bundle on a machine whose TensorRT the target's range excludes. ``device-verify``
adds: another CPU architecture than the target's, an engine whose metadata names another GPU
or TensorRT. The manifest's hashes catch corruption and edits of single files; a bundle whose
manifest was rewritten as well is only caught by the outer ``.sha256`` (or a signature over
it, which deploykit leaves to the release process).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import platform
import shutil
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

import deploykit
from deploykit.errors import UserError
from deploykit.io import atomic_path, read_json, sha256_file, write_json, write_text
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
def _check_members(members: list[tarfile.TarInfo], archive: Path) -> str:
    """The bundle's one top folder; refuses unsafe members."""
    tops = set()
    for m in members:
        path = PurePosixPath(m.name)
        if m.name.startswith(("/", "\\")) or path.is_absolute() or (len(m.name) > 1 and m.name[1] == ":"):
            raise UserError(f"archive member '{m.name}' has an absolute path", path=archive,
                            fix="do not use this bundle; re-package it with deploykit package")
        if ".." in path.parts:
            raise UserError(f"archive member '{m.name}' climbs out of the bundle ('..')", path=archive,
                            fix="do not use this bundle; re-package it with deploykit package")
        if m.issym() or m.islnk():
            raise UserError(f"archive member '{m.name}' is a link", path=archive,
                            fix="do not use this bundle; deploykit bundles hold only files and folders")
        if m.isdev() or m.ischr() or m.isblk() or m.isfifo():
            raise UserError(f"archive member '{m.name}' is a device or FIFO", path=archive,
                            fix="do not use this bundle; deploykit bundles hold only files and folders")
        if not (m.isfile() or m.isdir()):
            raise UserError(f"archive member '{m.name}' is not a regular file or folder", path=archive,
                            fix="do not use this bundle")
        tops.add(path.parts[0] if path.parts else "")
    if len(tops) != 1 or "" in tops or "." in tops:
        raise UserError("the archive does not hold exactly one bundle folder", path=archive,
                        fix="use an archive written by deploykit package")
    return tops.pop()


def _check_sidecar(archive: Path) -> None:
    sidecar = archive.with_name(archive.name + ".sha256")
    if not sidecar.is_file():
        return
    recorded = sidecar.read_text(encoding="utf-8", errors="replace").split()
    if not recorded or recorded[0].lower() != sha256_file(archive):
        raise UserError(f"the archive does not match its SHA-256 in {sidecar.name} (tampered or corrupted)",
                        path=archive, fix="fetch the bundle again")


def verify_tree(folder: Path) -> dict[str, Any]:
    """Check an unpacked bundle against its manifest; the manifest."""
    manifest_path = folder / "manifest.json"
    manifest = read_json(manifest_path, what="bundle manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise UserError(f"not a {FORMAT} manifest", path=manifest_path, fix="use a bundle written by deploykit package")
    listed = manifest["files"]
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*")
               if p.is_file() or p.is_symlink()} - {"manifest.json"}
    for rel in sorted(present):
        if (folder / rel).is_symlink():
            raise UserError(f"bundle file {rel} is a link", path=folder, fix="do not use this bundle")
    extra = sorted(present - set(listed))
    if extra:
        raise UserError(f"bundle file {extra[0]} is not in the manifest (added after packaging)", path=folder,
                        fix="do not use this bundle; fetch it again")
    for rel, entry in sorted(listed.items()):
        path = folder / rel
        if PurePosixPath(rel).is_absolute() or ".." in PurePosixPath(rel).parts:
            raise UserError(f"the manifest lists an unsafe path '{rel}'", path=manifest_path, fix="do not use this bundle")
        if not path.is_file():
            raise UserError(f"bundle file {rel} is missing", path=folder, fix="fetch the bundle again")
        if sha256_file(path) != entry.get("sha256"):
            raise UserError(f"bundle file {rel} does not match its manifest SHA-256 (tampered or corrupted)",
                            path=folder, fix="do not use this bundle; fetch it again")
    return manifest


def _check_target(manifest: dict[str, Any], expected: str | None, where: Path):
    from deploykit.targets import _parse

    raw = dict(manifest.get("target") or {})
    name = raw.pop("name", None)
    if not name:
        raise UserError("the manifest names no target", path=where, fix="use a bundle written by deploykit package")
    if expected is not None and expected != name:
        raise UserError(f"the bundle is for target '{name}', not '{expected}'", path=where,
                        fix=f"package the run for {expected}: deploykit package <run> --target {expected}")
    raw.pop("source", None)
    target = _parse(name, raw, f"{where} (manifest)")
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


def unpack_bundle(archive: str | Path, dest: str | Path | None = None, *, target: str | None = None) -> Path:
    """Unpack and check a bundle into ``dest`` (default ``./<bundle name>``); the folder."""
    archive = Path(archive)
    if archive.is_dir():
        raise UserError("this is a folder, not a bundle archive", path=archive,
                        fix="device-verify an unpacked folder directly; unpack takes the .tar.gz")
    if not archive.is_file():
        raise UserError("bundle not found", path=archive, fix="check the path")
    _check_sidecar(archive)
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UserError(f"not a readable bundle archive ({exc})", path=archive,
                        fix="use the .tar.gz written by deploykit package; fetch it again if it was cut short") from None
    created = False
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise UserError(f"the bundle archive is damaged ({exc})", path=archive, fix="fetch it again") from None
        top = _check_members(members, archive)
        dest = Path(dest) if dest is not None else Path.cwd() / top
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise UserError("the destination exists and is not empty", path=dest,
                            fix="choose a new folder with --out (unpack never overwrites)")
        created = not dest.exists()
        dest.mkdir(parents=True, exist_ok=True)

        def strip_top(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
            rel = PurePosixPath(member.name).relative_to(top)
            if not rel.parts:
                return None
            return tarfile.data_filter(member.replace(name=rel.as_posix(), deep=False), path)

        try:
            tar.extractall(dest, filter=strip_top)
            manifest = verify_tree(dest)
            _check_target(manifest, target, archive)
        except BaseException as exc:
            if created:
                shutil.rmtree(dest, ignore_errors=True)
            else:
                for child in list(dest.iterdir()):
                    shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()
            if isinstance(exc, tarfile.TarError):
                raise UserError(f"the bundle archive is unsafe or damaged ({exc})", path=archive,
                                fix="do not use this bundle; fetch it again") from None
            if isinstance(exc, (OSError, EOFError)) and not isinstance(exc, UserError):
                raise UserError(f"cannot unpack ({exc})", path=dest, fix="free disk space or choose --out") from None
            raise
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
            folder = unpack_bundle(bundle, Path(tmp) / "bundle", target=target)
            return _device_verify(folder, bundle, target, out, variants, threads, iterations, allow_other_arch)
    if not bundle.is_dir():
        raise UserError("bundle not found", path=bundle, fix="give the .tar.gz or the folder deploykit unpack wrote")
    verify_tree(bundle)
    return _device_verify(bundle, bundle, target, out, variants, threads, iterations, allow_other_arch)


def _device_verify(folder: Path, shown: Path, target_name: str | None, out, variants, threads, iterations,
                   allow_other_arch: bool) -> dict[str, Any]:
    from deploykit.bench import BenchConfig, time_runner
    from deploykit.data import iterate_batches, load_split
    from deploykit.io import read_npz
    from deploykit.runners import default_threads
    from deploykit.targets import check_engine, machine_arch
    from deploykit.verify import evaluate_checks, parity_entry

    manifest = verify_tree(folder)
    target = _check_target(manifest, target_name, shown)
    arch = machine_arch()
    if arch != target.arch and not allow_other_arch:
        raise UserError(f"the bundle is for {target.arch} (target '{target.name}'); this machine is {arch}",
                        path=shown, fix=f"run device-verify on the {target.name} device (or --allow-other-arch to "
                                        "check the numerics here anyway)")
    for meta in sorted((folder / "engines").glob("*.json")) if (folder / "engines").is_dir() else []:
        check_engine(read_json(meta, what="engine metadata"), target, shown / "engines" / meta.name)
    thresholds = read_json(folder / "verify/thresholds.json", what="thresholds")
    task = thresholds.get("task", manifest.get("task"))
    expected = read_npz(folder / "verify/expected.npz", what="expected outputs")
    reference = expected["reference"]
    split = load_split(folder / "verify/inputs.npz", list(manifest["inputs"]["names"]))
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
            output = np.concatenate([runner.infer(f) for f in iterate_batches(split.feeds, VERIFY_BATCH)], axis=0)
            key = f"{variant}@{backend}"
            parity[key] = parity_entry(task, reference, output, split.labels)
            here = expected.get(variant)
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
        return "ort-cpu", {v: OrtRunner(folder / manifest["variants"][v], threads=n) for v in chosen}
    from deploykit.engine import ShapeRanges, TrtRunner, build_engine, engine_info, require_tensorrt

    env = require_tensorrt(shown, plugins=False)   # deploykit ops: plugins from 10.15, else their decomposition
    runners = {}
    for variant in chosen:
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
