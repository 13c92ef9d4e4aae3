"""``deploykit package``: the edge bundle of a finished run, written in one go with its ``.sha256``."""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import platform
import tarfile
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

import deploykit
from deploykit.errors import UserError
from deploykit.io import atomic_path, portable_path, read_json, sha256_file, write_text
from deploykit.package.manifest import FORMAT, PRIMARY, VARIANTS, VERIFY_BATCH
from deploykit.progress import say, stage


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"deploykit": deploykit.__version__, "python": platform.python_version()}
    for dist in ("torch", "onnx", "onnxruntime", "onnxscript", "transformers", "numpy", "triton", "tensorrt"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


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
    from deploykit.runfolder import check_complete
    from deploykit.targets import get_target

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError("run folder not found", path=run_dir, fix="give the folder of a deploykit run (runs/<name>)")
    check_complete(run_dir)
    target = get_target(target_name, targets_file)
    report = read_json(_run_file(run_dir, "report.json", "report"), what="report")
    models, ranges_path, stem = _run_models(run_dir, report, target, variant)
    inputs_path = _run_file(run_dir, "data/evaluation.npz", "saved evaluation inputs")
    ranges, notes = _checked_models(models, ranges_path, target)
    name = f"{stem}-{target.name}"
    out = Path(out) if out is not None else run_dir / "bundles" / f"{name}.tar.gz"
    if not out.name.endswith(".tar.gz"):
        raise UserError("a bundle is a .tar.gz file", path=out, fix=f"name it e.g. {name}.tar.gz")

    source, task, split, part = _verify_inputs(report, models, inputs_path, samples)
    reference = _reference(run_dir, models, split, part, variant, notes)
    # Canonical names inside the bundle, whatever the run called the files.
    files: dict[str, bytes | Path] = {"model/model.int8.onnx": models["int8"], "model/model.onnx": models["fp32"],
                                      "model/model.int8.ranges.json": ranges_path}
    expected, figures = _expected_outputs(run_dir, target, models, part, reference, task, outputs, split.count)
    rules, checks_here = _gate(report, variant, figures, notes, allow_failing)
    files.update(_verify_files(part, expected, task, rules))
    runtime_files, engines = _runtime_files(models, ranges, target, notes)
    files.update(runtime_files)
    files["README.md"] = _device_readme(name, target, bool(engines)).encode()

    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    manifest = _manifest(files, run_dir=run_dir, name=name, created=created, target=target, report=report, models=models,
                         source=source, task=task, part=part, engines=engines, figures=figures,
                         checks_here=checks_here, rules=rules, notes=notes)
    files["manifest.json"] = (json.dumps(manifest, indent=2, allow_nan=False, default=str) + "\n").encode()
    digest = _write_archive(out, name, files, models, created)
    # counted as unpack counts them: the files manifest.json lists, then manifest.json itself
    say(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {len(manifest['files'])} files + manifest.json) "
        f"and {out.name}.sha256")
    for note in notes:
        say(f"  note: {note}")
    return BundleResult(out, digest, out.stat().st_size, len(manifest["files"]), manifest)   # as unpack counts


def _checked_models(models: dict[str, Path], ranges_path: Path, target) -> tuple[Any, list[str]]:
    """(the calibration ranges, notes): refuses ranges of another run's models and models the
    target cannot run."""
    from deploykit.quantize.record import read_ranges
    from deploykit.targets import check_model

    ranges = read_ranges(ranges_path, quantized=models["int8"], fp32=models["fp32"])   # refuses mixed runs
    notes = []
    for name_, path in models.items():
        notes += [f"{name_}: {n}" for n in check_model(path, target)]   # refuses what the target cannot run
    return ranges, notes


def _verify_inputs(report: dict[str, Any], models: dict[str, Path], inputs_path: Path, samples: int | None):
    """(model source, task, the saved evaluation split, the part of it the bundle carries: its
    first ``samples`` inputs, default all)."""
    from deploykit.data import Split, load_split
    from deploykit.onnx_utils import get_metadata, load_onnx

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
    return source, task, split, Split("inputs", feeds, split.sha256, labels=labels)


def _reference(run_dir: Path, models: dict[str, Path], split, part, variant: str | None,
               notes: list[str]) -> np.ndarray:
    """The reference outputs on ``part``: the run's torch outputs, or (a study variant) its FP32 ONNX's."""
    from deploykit.data import Split
    from deploykit.io import read_npz
    from deploykit.runners import OrtRunner
    from deploykit.verify import run_split

    n = part.count
    reference_path = run_dir / "reference.npz"
    if variant is None and reference_path.is_file():
        reference = read_npz(reference_path, what="reference outputs").get("output")
        if reference is None or reference.shape[0] != split.count:
            raise UserError("reference.npz does not match the saved evaluation inputs", path=reference_path,
                            fix="re-run the recipe (deploykit run) to write both together")
        return reference[:n]
    # A study variant's weights were trained in the run (its export does not record them as a
    # source option), so its reference is its FP32 ONNX, checked against torch at export.
    reference = run_split(OrtRunner(models["fp32"]), Split("inputs", part.feeds, split.sha256), batch_size=32,
                          description="reference (fp32 ONNX)")
    parity = (read_json(models["fp32"].parent / "variant.json", what="variant record").get("export_parity")
              if (models["fp32"].parent / "variant.json").is_file() else None)
    notes.append("reference outputs: the variant's FP32 ONNX on ONNX Runtime (its export matched torch to "
                 f"max |diff| {parity if parity is not None else 'unknown'})")
    return reference


def _expected_outputs(run_dir: Path, target, models: dict[str, Path], part, reference: np.ndarray, task: str,
                      outputs: dict[str, np.ndarray] | None, total: int):
    """(``{"reference": .., "int8": .., "fp32": ..}`` outputs on ``part``, each model's figures
    against the reference); the caller's ``outputs`` when they cover the whole split of ``total``."""
    from deploykit.runners import OrtRunner, scores_exact
    from deploykit.verify import output_reducer, parity_entry, run_split

    n = part.count
    expected = {"reference": reference}
    figures: dict[str, Any] = {}
    # An ONNX Runtime target runs ORT's own fused kernels, as device-verify does there; the
    # run's outputs (exact Q/DQ for a gpu-trt model) are reused only where they are the same.
    fused = target.runtime.name == "onnxruntime"
    with stage(f"package {run_dir} for {target.name}: expected outputs on {n} inputs (ort-cpu)"):
        for kind, path in models.items():
            known = (outputs or {}).get(kind)
            reusable = known is not None and known.shape[0] == n == total and not (fused and scores_exact(path))
            expected[kind] = known if reusable else \
                run_split(OrtRunner(path, exact_qdq=False if fused else None), part, batch_size=VERIFY_BATCH,
                          description=f"expected {kind}",
                          reduce=output_reducer(task, part.feeds, reference))   # a causal LM: per-position records
            figures[f"{kind}@ort-cpu"] = parity_entry(task, reference, expected[kind], part.labels)
    return expected, figures


def _gate(report: dict[str, Any], variant: str | None, figures: dict[str, Any], notes: list[str],
          allow_failing: bool) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """(the rules device-verify applies, their checks here); refuses (``GateFailed``) models that
    miss them here unless ``allow_failing``."""
    from deploykit.verify import evaluate_checks

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
    return rules, checks_here


def _verify_files(part, expected: dict[str, np.ndarray], task: str, rules: dict[str, str]) -> dict[str, bytes]:
    """The bundle's ``verify/`` folder: inputs (and their record), expected outputs, thresholds."""
    from deploykit.data import split_arrays, split_record

    files: dict[str, bytes] = {}
    buf = io.BytesIO()
    np.savez(buf, **split_arrays(part))
    files["verify/inputs.npz"] = buf.getvalue()
    files["verify/inputs.json"] = json.dumps(split_record(part), indent=2).encode()
    buf = io.BytesIO()
    np.savez(buf, **expected)
    files["verify/expected.npz"] = buf.getvalue()
    files["verify/thresholds.json"] = json.dumps({"task": task, "rules": rules, "primary": PRIMARY}, indent=2).encode()
    return files


def _runtime_files(models: dict[str, Path], ranges, target,
                   notes: list[str]) -> tuple[dict[str, bytes | Path], dict[str, Path]]:
    """(what the target's runtime needs besides the models: the ops' sources, their PTX, a
    calibration cache, engines; the engines among them)."""
    from deploykit.onnx_utils import load_onnx

    files: dict[str, bytes | Path] = {}
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
    return files, engines


def _manifest(files: dict[str, bytes | Path], *, run_dir: Path, name: str, created: str, target, report: dict[str, Any],
              models: dict[str, Path], source, task: str, part, engines: dict[str, Path], figures: dict[str, Any],
              checks_here: list[dict[str, Any]], rules: dict[str, str], notes: list[str]) -> dict[str, Any]:
    """The bundle's manifest.json: the SHA-256 and size of every file in ``files``, and the record."""
    entries: dict[str, dict[str, Any]] = {}
    for rel, content in sorted(files.items()):
        if isinstance(content, Path):
            entries[rel] = {"sha256": sha256_file(content), "bytes": content.stat().st_size}
        else:
            entries[rel] = {"sha256": hashlib.sha256(content).hexdigest(), "bytes": len(content)}
    settings = report.get("recipe_settings") or {}
    return {
        "profile": {k: list(v) for k, v in asdict(bundle_profile(settings)).items()},
        "format": FORMAT, "name": name, "created": created, "target": target.to_dict(),
        # names, not the packaging machine's paths: a bundle names nothing outside itself
        "model": portable_path(source), "recipe": portable_path(report.get("recipe")), "run": report.get("run"),
        "variants": {"int8": "model/model.int8.onnx", "fp32": "model/model.onnx"}, "primary": PRIMARY,
        "task": task, "source_files": {v: portable_path(str(p), run_dir) for v, p in models.items()},
        "reference": _reference_name(models["fp32"], report),
        "inputs": {"names": list(part.feeds), "samples": part.count, "sha256": part.sha256},
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


def _reference_name(fp32: Path, report: dict[str, Any]) -> str:
    """What the expected outputs were compared with: "torch", or "fp32 onnx on ort-cpu" for a
    model that arrived as ONNX (recorded in its prepared graph)."""
    from deploykit.onnx_utils import get_metadata, load_onnx

    recorded = get_metadata(load_onnx(fp32, load_weights=False)).get("reference")
    return str(recorded or (report.get("verification") or {}).get("reference_model") or "torch")


def _write_archive(out: Path, name: str, files: dict[str, bytes | Path], models: dict[str, Path],
                   created: str) -> str:
    """Write ``files`` under the folder ``name`` into the archive ``out`` (atomically) and its
    ``.sha256`` beside it; the archive's SHA-256."""
    with stage(f"write {out}"):
        mtime = int(_dt.datetime.fromisoformat(created).timestamp())
        with atomic_path(out, inputs=tuple(models.values())) as tmp:
            with tarfile.open(tmp, "w:gz", compresslevel=6) as tar:
                _add_dir(tar, name, mtime)
                for rel in sorted(files):
                    _add_file(tar, f"{name}/{rel}", files[rel], mtime)
        digest = sha256_file(out)
        write_text(out.with_name(out.name + ".sha256"), f"{digest}  {out.name}\n")
    return digest


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


