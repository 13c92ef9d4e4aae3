"""One library function per CLI command; ``run_recipe`` chains the same stage functions.

Artifacts of a run (``runs/<name>/``)::

    data/calibration.npz|.json   data/evaluation.npz|.json     seeded split, feeds + texts + hashes
    model.onnx  model.export.json                              FP32 export and its parity check
    model.int8.onnx  model.int8.ranges.json                    Q/DQ model and calibration ranges
    reference.npz                                              torch FP32 outputs on the evaluation set
    report.json  report.md  *.png                              the report (contract in DESIGN.md)
"""

from __future__ import annotations

import datetime as _dt
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

import deploykit
from deploykit.bench import BenchConfig, bench, bench_settings
from deploykit.data import DataSpec, Split, load_split, make_splits, save_split
from deploykit.errors import UserError
from deploykit.io import read_json, read_npz, refuse_overwriting_inputs, write_json, write_npz
from deploykit.onnx_utils import get_metadata, load_onnx
from deploykit.progress import say, stage
from deploykit.quantize import PRESETS, QuantConfig, calibrate
from deploykit.quantize.baselines import VARIANT as BASELINE_VARIANT
from deploykit.quantize.baselines import make_baseline
from deploykit.recipe import Recipe, load_recipe
from deploykit.runners import BACKENDS, TorchRunner, default_threads, make_runner
from deploykit.verify import VerifyResult, run_split, verify


NO_TARGET = "unspecified"        # the report's target when a standalone stage was given none (--target)


# ----------------------------------------------------------------------------- helpers
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def _environment() -> dict[str, Any]:
    from deploykit.doctor import environment

    return environment()


def new_report(model: str, recipe: str | None, target: str) -> dict[str, Any]:
    return {"model": model, "recipe": recipe, "target": target, "created": _now(),
            "deploykit_version": deploykit.__version__, "artifacts": {}, "accuracy": {}, "latency": {},
            "environment": _environment()}


def save_report(path: Path, report: dict[str, Any]) -> Path:
    """Validate and write ``report`` to ``path`` together with its markdown and plots next to it
    (``report.json`` -> ``report.md``; ``X.json`` -> ``X.md``, ``X-*.png``), all or none."""
    import deploykit.study  # noqa: F401  (registers the study section of report.md)
    from deploykit.report import save_and_render_report

    return save_and_render_report(path, report)


def update_report(path: Path, update: dict[str, Any], *, model: str, target: str) -> Path:
    """Merge a stage's results into the report at ``path`` (a new one if absent) and save it."""
    from deploykit.report import merge_report

    existing = read_json(path, what="report") if path.is_file() else new_report(model, None, target)
    if existing.get("target") == NO_TARGET and target != NO_TARGET:
        existing["target"] = target           # a later stage named the deployment target
    return save_report(path, merge_report(existing, {**update, "environment": _environment()}))


def model_source_for(onnx_path: Path, source: str | None) -> str:
    """The model source to use with an ONNX file: given, or recorded in it at export."""
    if source:
        return source
    recorded = get_metadata(load_onnx(onnx_path, load_weights=False)).get("source")
    if not recorded:
        raise UserError("the ONNX file does not record its model source", path=onnx_path,
                        fix="pass --model (e.g. --model embedded:minilm)")
    return recorded


def model_for(onnx_path: Path, source: str | None, options: dict[str, Any] | None):
    """The torch model an ONNX file came from: ``source`` / ``options`` when given, else the
    source and options recorded in it at export (img_size, checkpoint, transforms, ...)."""
    from deploykit.models import load_model

    if not source and not options:
        options = get_metadata(load_onnx(onnx_path, load_weights=False)).get("options") or {}
    return load_model(model_source_for(onnx_path, source), options)


def variant_names(onnx_paths: list[Path]) -> list[str]:
    """Report names for models: the variant recorded at export/calibration (fp32, int8, ...),
    or the file stem where several models in one call share that variant."""
    recorded = [str(get_metadata(load_onnx(p, load_weights=False)).get("variant") or p.stem) for p in onnx_paths]
    names = [r if recorded.count(r) == 1 else p.stem for r, p in zip(recorded, onnx_paths)]
    out: list[str] = []
    for name in names:
        unique, k = name, 2
        while unique in out:
            unique, k = f"{name}-{k}", k + 1
        out.append(unique)
    return out


def check_data_file(data: str | Path | None, models: list[Path]) -> None:
    """A saved .npz of feeds checked against each ONNX model before it is split or run
    (:func:`deploykit.feeds.check_feeds`: names, rank, dtype, shared sizes, ids, positions)."""
    from deploykit.feeds import check_feeds_file

    if data is not None and str(data).endswith(".npz") and Path(data).is_file():
        check_feeds_file(data, models)


def checked_split(split: Split | None, models: list[Path], data: str | Path, **kwargs: Any) -> Split | None:
    """``split`` with its feeds checked against (and cast to) each ONNX model it will be fed to."""
    from deploykit.feeds import check_feeds

    if split is None:
        return None
    feeds = split.feeds
    for model in models:
        feeds = check_feeds(feeds, model, data=data, **kwargs)
    return replace(split, feeds=feeds)


def stage_split(bundle, data: str, which: str, spec: DataSpec) -> Split:
    """The calibration or evaluation set: a saved .npz used whole, or the seeded split of a source."""
    if data.endswith(".npz"):
        return load_split(data, bundle.input_names, bundle)
    splits = make_splits(bundle, DataSpec(source=data, calibration=spec.calibration,
                                          evaluation=spec.evaluation, seed=spec.seed))
    return getattr(splits, which)


# ----------------------------------------------------------------------------- export
def export_model(source: str, out: Path, *, options: dict[str, Any] | None = None, opset: int = 18) -> dict[str, Any]:
    from deploykit.export import export_onnx
    from deploykit.models import load_model

    with stage(f"export {source}"):
        bundle = load_model(source, options)
        result = export_onnx(bundle, out, opset=opset)
    summary = result.summary()
    write_json(out.with_suffix(".export.json"), {"model": bundle.source, **summary})
    say(f"wrote {out} (opset {opset}, {result.node_count} nodes); parity vs torch: max |diff| "
        f"{result.parity['max_abs_diff']:.3g}")
    return summary


# ----------------------------------------------------------------------------- calibrate
def calibrate_model(model_path: Path, out: Path, *, source: str | None, data: str, spec: DataSpec,
                    config: QuantConfig, options: dict[str, Any] | None = None,
                    default_preset: str = "gpu-trt", targets: list[str] | None = None) -> dict[str, Any]:
    from deploykit.targets import check_quant_config, get_target

    preset = config.preset or (default_preset if default_preset in PRESETS else "gpu-trt")
    config.resolved(preset)  # validate before any work
    for name in targets or []:
        check_quant_config(config, preset, get_target(name))
    refuse_overwriting_inputs(out, (model_path,))
    check_data_file(data, [model_path])
    bundle = model_for(model_path, source, options)
    tuning = config.tune.enabled
    if data.endswith(".npz"):
        split = load_split(data, bundle.input_names, bundle)
        tuning_split = None
        if tuning:
            raise UserError("tuning needs a data source to split, not a saved .npz", path=data,
                            fix="use --data docstrings (or a .txt file) with --tune")
    else:
        splits = make_splits(bundle, DataSpec(source=data, calibration=spec.calibration, evaluation=spec.evaluation,
                                              seed=spec.seed, tuning=config.tune.samples if tuning else 0))
        split, tuning_split = splits.calibration, splits.tuning
    split, tuning_split = checked_split(split, [model_path], data), checked_split(tuning_split, [model_path], data)
    label = "tuning" if tuning else config.resolved(preset).method
    with stage(f"calibrate {model_path} ({preset}, {label}, {split.count} samples)"):
        result = calibrate(model_path, split, out, config, tuning_split=tuning_split, default_preset=preset)
    summary = result.summary()
    for name, notes in check_targets([out], targets or []).items():
        for note in notes:
            say(f"  {name}: {note}")
    say(f"wrote {out}: {summary['qdq']['QuantizeLinear']} QuantizeLinear, {summary['quantized_nodes']} quantized "
        f"nodes, {len(result.float_nodes)} kept float ({len(result.fallback_nodes)} fallen back by tuning); "
        f"ranges in {result.ranges_path}")
    if result.tuning is not None:
        tuning_path = out.with_name(out.stem + ".tuning.json")
        write_json(tuning_path, result.tuning, inputs=(model_path,))
        say(f"tuning log: {tuning_path} ({'met' if result.tuning['met'] else 'NOT met'}: "
            f"{result.tuning['chosen']['metrics']})")
    return summary


# ----------------------------------------------------------------------------- debug-quant
def debug_quant(fp32_path: Path, int8_path: Path, out_dir: Path, *, source: str | None, data: str, spec: DataSpec,
                samples: int = 64, top: int = 20, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per-node quantization error of ``int8_path`` against its float counterpart, worst first."""
    from deploykit.quantize.debug import float_counterpart, node_errors, plot_node_errors
    from deploykit.quantize.record import ranges_path_for

    if samples < 1:
        raise UserError("--samples must be at least 1", fix="e.g. --samples 64")
    float_model = float_counterpart(load_onnx(fp32_path), ranges_path_for(int8_path),
                                    quantized=int8_path, fp32=fp32_path)
    qdq = load_onnx(int8_path)
    check_data_file(data, [fp32_path, int8_path])
    bundle = model_for(fp32_path, source, options)
    split = checked_split(stage_split(bundle, data, "evaluation", spec), [fp32_path, int8_path], data)
    split = Split(split.name, {k: v[:samples] for k, v in split.feeds.items()}, split.sha256)
    with stage(f"debug-quant {int8_path} vs {fp32_path} ({split.count} samples)"):
        errors = node_errors(float_model, qdq, split)
    result = {"fp32": str(fp32_path), "int8": str(int8_path), "samples": split.count,
              "data": {"source": data, "seed": spec.seed, "evaluation_sha256": split.sha256},
              "nodes": [e.to_dict() for e in errors]}
    write_json(out_dir / "debug_quant.json", result, inputs=(fp32_path, int8_path))
    plot_node_errors(errors, out_dir / "debug_quant.png", top=top)
    _print_node_errors(errors[:top])
    say(f"wrote {out_dir / 'debug_quant.json'} and {out_dir / 'debug_quant.png'}")
    return result


def _print_node_errors(errors) -> None:
    from deploykit.progress import is_quiet

    if is_quiet():
        return
    from rich.table import Table

    from deploykit.progress import console

    table = Table(title="worst nodes by the error each adds alone (float inputs)")
    for col, justify in (("node", "left"), ("op", "left"), ("torch module", "left"), ("added SNR dB", "right"),
                         ("added cos", "right"), ("accum. SNR dB", "right"), ("accum. cos", "right")):
        table.add_column(col, justify=justify)
    for e in errors:
        table.add_row(e.node, e.op_type, e.module or "-", f"{e.added_snr_db:.1f}", f"{e.added_cosine:.5f}",
                      f"{e.accumulated_snr_db:.1f}", f"{e.accumulated_cosine:.5f}")
    console.print(table)


# ----------------------------------------------------------------------------- outliers
def outliers_model(source: str, out_dir: Path, *, data: str, spec: DataSpec, samples: int | None = None,
                   batch_size: int = 32, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The outlier metrics of Bondarenko et al. per layer -> ``outliers.json`` + ``outliers.png``."""
    from deploykit.models import load_model
    from deploykit.outliers import measure_outliers, plot_outliers, print_outliers

    if samples is not None and samples < 1:
        raise UserError("--samples must be at least 1", fix="e.g. --samples 256")
    bundle = load_model(source, options)
    split = stage_split(bundle, data, "evaluation", spec)
    with stage(f"outliers {bundle.source} ({min(samples or split.count, split.count)} samples)"):
        stats = measure_outliers(bundle, split, batch_size=batch_size, samples=samples)
    print_outliers(stats)
    result = {"model": bundle.source, "options": options or {}, "transforms": bundle.info.get("transforms", []),
              "data": {"source": data, "seed": spec.seed, "evaluation_sha256": split.sha256}, **stats.to_dict()}
    write_json(out_dir / "outliers.json", result)
    plot_outliers({bundle.name: stats.to_dict()}, out_dir / "outliers.png")
    say(f"wrote {out_dir / 'outliers.json'} and {out_dir / 'outliers.png'}")
    return result


# ----------------------------------------------------------------------------- train
def train_model(recipe: str | Path, out: Path, *, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train the recipe's model (with its transforms) per its ``train`` section; write ``out``."""
    from deploykit.models import load_model
    from deploykit.train import distillation_teacher, train

    rec = load_recipe(recipe, overrides)
    rec.train.validate(rec.path)
    if out.suffix != ".safetensors":
        raise UserError("the checkpoint is written as safetensors", path=out, fix="name it <something>.safetensors")
    bundle = load_model(rec.model.source, rec.model.options)
    spec = DataSpec(**asdict(rec.data))
    if spec.training == 0:
        spec.training = -1
    splits = make_splits(bundle, spec)
    teacher = distillation_teacher(rec.model.source, rec.model.options).module if rec.train.mode == "distill" else None
    result = train(bundle, splits.training, rec.train, teacher=teacher, checkpoint=out,
                   description=f"train {rec.name}")
    summary = {"recipe": rec.path, "transforms": bundle.info.get("transforms", []), **result.summary(),
               "data": splits.summary(), "train": asdict(rec.train)}
    write_json(out.with_suffix(".train.json"), summary)
    say(f"wrote {out} ({result.steps} steps, final loss {result.final_loss:.4g}); load it with "
        f"--option checkpoint={out} and the same transforms")
    return summary


# ----------------------------------------------------------------------------- verify
def reference_outputs(bundle, split: Split, batch_size: int) -> np.ndarray:
    return run_split(TorchRunner(bundle), split, batch_size=batch_size, description="reference (torch fp32)")


def is_qdq(path: Path) -> bool:
    model = load_onnx(Path(path), load_weights=False)
    return any(n.op_type == "QuantizeLinear" for n in model.graph.node)


def check_targets(models: list[Path], targets: list[str], where: str | None = None) -> dict[str, list[str]]:
    """Check each model against each target (refuses what a target cannot run); the notes."""
    from deploykit.targets import check_model, get_target

    notes: dict[str, list[str]] = {}
    for name in targets:
        target = get_target(name)
        for model in models:
            for note in check_model(model, target):
                notes.setdefault(name, []).append(f"{Path(model).name}: {note}")
    return notes


def verification_inputs(bundle, inputs: Path | None, data: str, spec: DataSpec,
                        models: list[Path] = ()) -> tuple[Split, Path | None]:
    """The saved inputs every backend runs on: ``inputs`` if it exists (its recorded hash is
    checked), else the evaluation split, saved to ``inputs`` once when a path is given. Either
    is checked against ``models`` (the ONNX files it will be fed to) first."""
    if inputs is not None and inputs.is_file():
        check_data_file(inputs, list(models))
        return checked_split(load_split(inputs, bundle.input_names, bundle), list(models), inputs), inputs
    check_data_file(data, list(models))
    split = checked_split(stage_split(bundle, data, "evaluation", spec), list(models), data)
    if inputs is None:
        return split, None
    if inputs.suffix != ".npz":
        raise UserError("saved inputs are an .npz file", path=inputs, fix="name it e.g. inputs.npz")
    saved = Split(inputs.stem, split.feeds, split.sha256, samples=split.samples, labels=split.labels)
    save_split(saved, inputs.parent)
    say(f"saved the verification inputs to {inputs} ({split.count} samples)")
    return split, inputs


def backend_runners(variants: dict[str, Path], backends: list[str], *, threads: int | None = None,
                    ranges=None) -> dict[str, Any]:
    """``{"<variant>@<backend>": runner}`` for every ONNX variant on every non-torch backend.
    TensorRT uses the engine next to the model, built here first when there is none."""
    runners: dict[str, Any] = {}
    for backend in backends:
        for name, path in variants.items():
            if backend == "torch":
                continue
            if backend == "tensorrt" and not Path(path).with_suffix(".engine").is_file():
                from deploykit.engine import ShapeRanges, build_engine

                with stage(f"build TensorRT engine for {path}"):
                    build_engine(path, Path(path).with_suffix(".engine"), ranges=ranges or ShapeRanges())
            runners[f"{name}@{backend}"] = make_runner(backend, model_path=path, threads=threads)
    return runners


def verify_backends(bundle, variants: dict[str, Path], reference: np.ndarray, split: Split, *, backends: list[str],
                    rules: dict[str, str], batch_size: int = 32, localize_failures: bool = True,
                    localize_samples: int = 64, ranges=None) -> dict[str, Any]:
    """Every variant on every usable backend vs torch FP32, thresholds, and per-node localization
    of a failing Q/DQ variant. Returns the report update (``parity``, ``verification``,
    ``accuracy`` and ``distributions`` of the first ONNX backend, ``passed``)."""
    from deploykit.verify import choose_backends, cross_verify, evaluate_checks, localize, parity_entry

    run, skipped = choose_backends(backends)
    for backend, reason in skipped.items():
        say(f"  {backend}: skipped ({reason})")
    parity: dict[str, Any] = {}
    if "torch" in run:
        parity["fp32@torch"] = parity_entry(bundle.task, reference, reference, split.labels)
    onnx_backends = [b for b in run if b != "torch"]
    result = VerifyResult()
    if onnx_backends:
        first = onnx_backends[0]
        runners = backend_runners(variants, [first])
        with stage(f"verify on {first}"):
            result = verify({k.split("@")[0]: r for k, r in runners.items()}, reference, split, bundle.task,
                            batch_size=batch_size)
        for name in variants:
            parity[f"{name}@{first}"] = {**result.accuracy[name], "samples": split.count}
        others = backend_runners(variants, onnx_backends[1:], ranges=ranges)
        if others:
            with stage(f"verify on {', '.join(onnx_backends[1:])}"):
                more, _ = cross_verify(others, reference, split, bundle.task, batch_size=batch_size)
            parity.update(more)
    checks = evaluate_checks(rules, parity)
    localization: dict[str, Any] = {}
    fp32 = next((p for n, p in variants.items() if not is_qdq(p)), None)
    if localize_failures and fp32 is not None:
        failed = dict.fromkeys(c["check"].rsplit(".", 1)[0] for c in checks if not c["passed"] and "@" in c["check"])
        for key in failed:
            name, backend = key.split("@", 1)
            if name not in variants or not is_qdq(variants[name]):
                continue
            with stage(f"localize {key}: per-node error against {fp32.name}"):
                found = localize(fp32, variants[name], split, samples=localize_samples)
            if backend != "ort-cpu" and parity.get(f"{name}@ort-cpu") is not None:
                found["note"] = (f"compare with {name}@ort-cpu: if ONNX Runtime passes, the difference is "
                                 f"{backend}'s kernels or fusions; `polygraphy run {variants[name]} --trt --onnxrt "
                                 "--trt-outputs mark all --onnx-outputs mark all` compares layer by layer")
            localization[key] = found
    verification = {"backends_run": run, "backends_skipped": skipped, "checks": checks,
                    "localization": localization,
                    "inputs_sha256": split.sha256, "samples": split.count}
    return {"parity": parity, "verification": verification, "accuracy": result.accuracy,
            "distributions": result.distributions, "passed": all(c["passed"] for c in checks),
            "outputs": {f"{k}@{onnx_backends[0]}": v for k, v in result.outputs.items()} if onnx_backends else {}}


def run_artifacts(run_dir: Path) -> dict[str, Any]:
    """What ``deploykit verify <run folder>`` checks: the run's FP32 and Q/DQ models, its saved
    evaluation inputs and torch reference, its recipe's thresholds, its TensorRT shapes, its report."""
    from deploykit.package import bundle_profile
    from deploykit.runfolder import check_complete

    report_path = check_complete(run_dir) / "report.json"
    if not report_path.is_file():
        raise UserError("not a run folder (no report.json)", path=run_dir,
                        fix="pass a runs/<name> folder, or the ONNX models themselves")
    report = read_json(report_path, what="report")
    models = [run_dir / name for name in ("model.onnx", "model.int8.onnx")]
    missing = [m.name for m in models + [run_dir / "data" / "evaluation.npz", run_dir / "reference.npz"]
               if not m.is_file()]
    if missing:
        raise UserError(f"the run folder lacks {', '.join(missing)}", path=run_dir,
                        fix="a study run keeps each variant in its own folder: pass that variant's .onnx files")
    settings = report.get("recipe_settings") or {}
    return {"models": models, "inputs": run_dir / "data" / "evaluation.npz", "reference": run_dir / "reference.npz",
            "rules": dict(settings.get("acceptance") or {}), "report": report_path,
            "ranges": bundle_profile(settings)}


def verify_models(models: list[Path], report: Path, *, source: str | None, data: str, spec: DataSpec,
                  reference: Path | None = None, batch_size: int = 32, backends: list[str] | None = None,
                  options: dict[str, Any] | None = None, inputs: Path | None = None,
                  rules: dict[str, str] | None = None, localize_failures: bool = True, localize_samples: int = 64,
                  targets: list[str] | None = None, ranges=None) -> dict[str, Any]:
    """``deploykit verify``: the models on every usable backend against torch FP32, on saved inputs."""
    if not models:
        raise UserError("no ONNX model given", fix="pass one or more .onnx files")
    notes = check_targets(models, targets or [])
    bundle = model_for(models[0], source, options)
    split, inputs_path = verification_inputs(bundle, inputs, data, spec, models)
    if reference is not None:
        ref = read_npz(reference, what="reference file").get("output")
        if ref is None or ref.shape[0] != split.count:
            raise UserError(f"the reference does not match the {split.count} verification samples", path=reference,
                            fix="use the reference.npz written with these inputs, or omit --reference")
    else:
        ref = reference_outputs(bundle, split, batch_size)
    variants = dict(zip(variant_names(models), models))
    result = verify_backends(bundle, variants, ref, split, backends=list(backends or ["auto"]), rules=rules or {},
                             batch_size=batch_size, localize_failures=localize_failures,
                             localize_samples=localize_samples, ranges=ranges)
    result["verification"].update({"inputs": str(inputs_path) if inputs_path else None,
                                   "reference": str(reference) if reference else "torch fp32, computed here"})
    _print_parity(result["parity"], result["verification"])
    update = {"model": bundle.source, "artifacts": {f"{k}.onnx": str(m) for k, m in variants.items()},
              "accuracy": result["accuracy"], "distributions": result["distributions"], "parity": result["parity"],
              "verification": result["verification"], "acceptance": result["verification"]["checks"],
              # saved inputs carry their own record (verification.inputs / inputs_sha256): a run's
              # data summary is not overwritten by them
              **({} if inputs_path else {"data": {"evaluation": split.summary(), "source": data, "seed": spec.seed}}),
              **({"notes": [f"{t}: {n}" for t, ns in notes.items() for n in ns]} if notes else {})}
    update_report(report, update, model=bundle.source, target=(targets or [NO_TARGET])[0])
    return {**update, "passed": result["passed"]}


def _print_parity(parity: dict[str, Any], verification: dict[str, Any]) -> None:
    for key, metrics in parity.items():
        shown = {k: v for k, v in metrics.items() if k != "samples" and v is not None}
        say(f"  {key}: " + ", ".join(f"{k} {v:.5g}" for k, v in shown.items()))
    for check in verification["checks"]:
        say(f"  check {check['check']} {check['threshold']}: {check['value']} -> "
            f"{'pass' if check['passed'] else 'FAIL'}")
    for key, found in verification["localization"].items():
        worst = ", ".join(f"{n['node']} ({n['added_snr_db']:.1f} dB)" for n in found["nodes"][:5])
        say(f"  {key} worst nodes: {worst}; try: " + " ".join(f"--exclude {n}" for n in found["exclude"]))


# ----------------------------------------------------------------------------- bench
def bench_models(models: list[Path], report: Path, *, source: str | None, data: str, spec: DataSpec,
                 backends: list[str], config: BenchConfig, torch_baseline: bool = True,
                 options: dict[str, Any] | None = None) -> dict[str, Any]:
    from deploykit.models import load_model

    for backend in backends:
        if backend not in BACKENDS:
            raise UserError(f"unknown backend '{backend}'", fix=f"use one of {', '.join(BACKENDS)}")
    if not models and not torch_baseline:
        raise UserError("nothing to benchmark", fix="pass .onnx files and/or keep the torch baseline")
    if models:
        bundle = model_for(models[0], source, options)
    elif source:
        bundle = load_model(source, options)
    else:
        raise UserError("the torch baseline alone needs the model source", fix="pass --model")
    check_data_file(data, models)
    split = checked_split(stage_split(bundle, data, "evaluation", spec), models, data)
    check_bench_length(split, models, data, config)
    threads = config.threads or default_threads()
    latency = _bench_all(bundle, split, models, backends, config, threads, torch_baseline)
    _print_latency(latency)
    update = {"latency": latency, "bench": bench_settings(config, threads)}
    update_report(report, update, model=bundle.source, target=NO_TARGET)
    return update


def bench_models_on_targets(models: list[Path], report: Path, targets: list[str], *, source: str | None, data: str,
                            spec: DataSpec, config: BenchConfig, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """``deploykit bench --target``: each model within each target's budget, where measurable here."""
    if not models:
        raise UserError("no ONNX model given", fix="pass the .onnx files to time on the target")
    notes = check_targets(models, targets)
    check_data_file(data, models)
    bundle = model_for(models[0], source, options)
    split = checked_split(stage_split(bundle, data, "evaluation", spec), models, data)
    check_bench_length(split, models, data, config)
    section = bench_targets(dict(zip(variant_names(models), models)), split, targets, config)
    update = {"targets": section,
              **({"notes": [f"{t}: {n}" for t, ns in notes.items() for n in ns]} if notes else {})}
    update_report(report, update, model=bundle.source, target=targets[0])
    return update


def bench_targets(models: dict[str, Path], split: Split, targets: list[str], config: BenchConfig) -> dict[str, Any]:
    """Each target's budget emulated here where this machine can run it (batch 1, its threads,
    peak memory); a reason for the rest ("not measurable here")."""
    from deploykit.bench.edge import bench_on_target
    from deploykit.targets import get_target

    out = {}
    with stage(f"targets: {', '.join(targets)}"):
        for name in targets:
            entry = bench_on_target(models, split, get_target(name), config)
            out[name] = entry
            if not entry["measurable"]:
                say(f"  {name}: {entry['reason']}")
            for variant, fig in entry["latency"].items():
                say(f"  {name} {variant}: p50 {fig['p50_ms']:.2f} ms at batch 1 on {fig['threads']} threads, "
                    f"peak RSS {fig['peak_rss_mib']:.0f} MiB of {entry['memory_budget_mib']:.0f}")
    return out


def check_bench_length(split: Split, models: list[Path], data: str, config: BenchConfig) -> None:
    """The feeds bench runs (``--seq`` columns, padding kept) fit each model's position table."""
    from deploykit.bench import bench_feeds

    checked_split(replace(split, feeds=bench_feeds(split, 1, config.seq_len)), models, data, trimmed=False,
                  length_fix=f"lower --seq (bench.seq_len, now {config.seq_len}) to the model's positions")


def _bench_all(bundle, split, models, backends, config, threads, torch_baseline) -> dict[str, Any]:
    names = variant_names(models)
    runners = [(name, make_runner(backend, model_path=m, threads=threads))
               for backend in backends if backend != "torch" for name, m in zip(names, models)]
    if torch_baseline or "torch" in backends:
        runners.append(("fp32", TorchRunner(bundle, threads=threads)))
    with stage(f"bench ({threads} threads, batches {config.batches})"):
        return bench(runners, split, config)


# ----------------------------------------------------------------------------- report / print
def _print_latency(latency: dict[str, Any]) -> None:
    for key, entry in latency.items():
        say(f"  {key}: p50 {entry['p50_ms']:.2f} ms, p99 {entry['p99_ms']:.2f} ms, "
            f"{entry['throughput_per_s']:.1f}/s")


# ----------------------------------------------------------------------------- run
@dataclass
class RunResult:
    run_dir: Path
    report_path: Path
    report: dict[str, Any]
    accepted: bool


def run_recipe(recipe: str | Path | None = None, *, out_root: Path = Path("runs"), name: str | None = None,
               overrides: list[str] | None = None) -> RunResult:
    """Run a recipe into ``out_root/<name>``: that folder ends up holding either the previous
    run, untouched, or this whole run (``deploykit.runfolder``)."""
    rec: Recipe = load_recipe(recipe, overrides)
    rec.quantize.validate()
    rec.bench.validate()
    for backend in rec.bench.backends:
        if backend not in BACKENDS:
            raise UserError(f"unknown backend '{backend}' in bench.backends", path=rec.path,
                            fix=f"use {', '.join(BACKENDS)}")
    for kind in rec.baselines:
        if kind not in BASELINE_VARIANT:
            raise UserError(f"unknown baseline '{kind}'", path=rec.path, fix=f"use {', '.join(BASELINE_VARIANT)}")
    from deploykit.runfolder import check_name, run_folder

    run_dir = Path(out_root) / check_name(name or rec.name, rec.path)
    with run_folder(run_dir):
        if rec.study.variants:
            from deploykit.study import run_study

            return run_study(rec, run_dir)
        return _run_single(rec, run_dir)


def _run_single(rec: Recipe, run_dir: Path) -> RunResult:
    from deploykit.export import export_onnx
    from deploykit.models import load_model

    timings: dict[str, float] = {}
    t = time.perf_counter()

    def lap(key: str) -> None:
        nonlocal t
        now = time.perf_counter()
        timings[key] = round(now - t, 2)
        t = now

    say(f"[bold]deploykit run[/] {rec.name} -> {run_dir}")
    with stage(f"load model {rec.model.source}"):
        bundle = load_model(rec.model.source, rec.model.options)
    max_length = getattr(bundle.preprocessor, "max_length", None)
    if max_length is not None and rec.bench.seq_len > max_length:
        raise UserError(f"bench.seq_len {rec.bench.seq_len} is longer than model.options.max_length {max_length}",
                        path=rec.path, fix="raise model.options.max_length or lower bench.seq_len")
    lap("load_model")
    tuning = rec.quantize.tune.enabled
    with stage(f"data: {rec.data.source} (seed {rec.data.seed})"):
        spec = DataSpec(**{**asdict(rec.data), "tuning": rec.quantize.tune.samples if tuning else 0})
        splits = make_splits(bundle, spec)
        data_paths = {name: save_split(split, run_dir / "data") for name, split in splits.parts()
                      if name != "training"}
    lap("data")
    training = None
    if rec.train.enabled:
        from deploykit.study import train_variant

        training = train_variant(bundle, rec, splits, run_dir)
        lap("train")
    fp32_path, int8_path = run_dir / "model.onnx", run_dir / "model.int8.onnx"
    with stage("export"):
        exported = export_onnx(bundle, fp32_path, opset=rec.export.opset, parity_feeds=parity_feeds(splits.evaluation))
        write_json(fp32_path.with_suffix(".export.json"), {"model": bundle.source, **exported.summary()})
    say(f"  parity vs torch: max |diff| {exported.parity['max_abs_diff']:.3g}")
    lap("export")
    preset = rec.preset()
    with stage(f"calibrate ({preset}, {'tuning' if tuning else rec.quantize.resolved(preset).method})"):
        cal = calibrate(fp32_path, splits.calibration, int8_path, rec.quantize, tuning_split=splits.tuning,
                        default_preset=preset)
    say(f"  {cal.qdq_counts['QuantizeLinear']} QuantizeLinear, {len(cal.quantized_nodes)} nodes quantized, "
        f"{len(cal.float_nodes)} kept float ({len(cal.fallback_nodes)} fallen back by tuning)")
    lap("calibrate")
    target_notes = check_targets([fp32_path, int8_path], rec.targets)
    variants = {"fp32": fp32_path, "int8": int8_path}
    for kind in rec.baselines:
        with stage(f"baseline {kind}"):
            path = make_baseline(kind, fp32_path, run_dir / f"model.{BASELINE_VARIANT[kind]}.onnx")
            variants[BASELINE_VARIANT[kind]] = path
    if rec.baselines:
        lap("baselines")
    with stage("reference outputs (torch fp32)"):
        reference = reference_outputs(bundle, splits.evaluation, rec.verify.batch_size)
        write_npz(run_dir / "reference.npz", {"output": reference})
    lap("reference")
    from deploykit.engine import ShapeRanges

    verified = verify_backends(bundle, variants, reference, splits.evaluation, backends=rec.verify.backends,
                               rules=rec.acceptance, batch_size=rec.verify.batch_size,
                               localize_failures=rec.verify.localize, localize_samples=rec.verify.localize_samples,
                               ranges=ShapeRanges.from_recipe(rec))
    _print_parity(verified["parity"], verified["verification"])
    lap("verify")
    threads = rec.bench.threads or default_threads()
    latency = _bench_all(bundle, splits.evaluation, list(variants.values()), rec.bench.backends, rec.bench,
                         threads, rec.bench.torch_baseline)
    _print_latency(latency)
    lap("bench")
    targets_section = bench_targets({k: v for k, v in variants.items() if k in ("fp32", "int8")},
                                    splits.evaluation, rec.targets, rec.bench)
    lap("targets")
    report = new_report(bundle.source, rec.path, rec.target)
    report.update({
        "run": rec.name,
        "artifacts": {**{name: str(path) for name, path in variants.items()},
                      "reference": str(run_dir / "reference.npz"), "calibration_ranges": str(cal.ranges_path),
                      **{f"data_{k}": str(v) for k, v in data_paths.items()}},
        "accuracy": verified["accuracy"],
        "distributions": verified["distributions"],
        "parity": verified["parity"],
        "verification": {**verified["verification"], "inputs": str(data_paths["evaluation"]),
                         "reference": str(run_dir / "reference.npz")},
        "latency": latency,
        "targets": targets_section,
        "data": splits.summary(),
        "export": {k: v for k, v in exported.summary().items() if k != "path"},
        "calibration": {k: v for k, v in cal.summary().items() if k not in ("path", "ranges")},
        **({"tuning": cal.tuning} if cal.tuning is not None else {}),
        "bench": bench_settings(rec.bench, threads),
        "acceptance": verified["verification"]["checks"],
        **({"training": training} if training else {}),
        "recipe_settings": rec.to_dict(),
        "timings_s": timings,
        **({"notes": [f"{t}: {n}" for t, ns in target_notes.items() for n in ns]} if target_notes else {}),
    })
    acceptance = report["acceptance"]
    report_path = save_report(run_dir / "report.json", report)
    if rec.package.targets and not all(a["passed"] for a in acceptance):
        say("  no bundle written: an acceptance check failed (a bundle ships only what passed)")
    elif rec.package.targets:
        from deploykit.package import package_run

        from deploykit.package import VERIFY_BATCH, GateFailed

        # verify's ORT CPU outputs are the bundle's expected outputs when they were computed in
        # the batches the bundle uses (trimmed padding makes other batchings differ by rounding)
        reusable = {k.split("@")[0]: v for k, v in verified["outputs"].items() if k.endswith("@ort-cpu")
                    and k.split("@")[0] in ("fp32", "int8")} if rec.verify.batch_size == VERIFY_BATCH else None
        bundles = {}
        for name_ in rec.package.targets:
            try:
                bundles[name_] = package_run(run_dir, name_, samples=rec.package.samples,
                                             outputs=reusable).summary()
            except GateFailed as exc:        # e.g. package.samples: a subset that misses a threshold
                say(f"  {name_}: {exc}")
                acceptance.append({"check": f"package:{name_}", "value": None, "threshold": "thresholds met on "
                                   "the bundle's inputs", "passed": False})
        lap("package")
        report["bundles"] = bundles
        report["artifacts"].update({f"bundle_{k}": v["path"] for k, v in bundles.items()})
        report["timings_s"] = timings
    report_path = save_report(run_dir / "report.json", report)
    accepted = all(a["passed"] for a in acceptance)
    for a in acceptance:
        say(f"  acceptance {a['check']} {a['threshold']}: {a['value']} -> {'pass' if a['passed'] else 'FAIL'}")
    say(f"[bold]report:[/] {report_path} and {run_dir / 'report.md'}")
    return RunResult(run_dir, report_path, read_json(report_path), accepted)


def parity_feeds(split: Split) -> list[dict[str, np.ndarray]]:
    """Two real batches (8 rows, then 1) to check an export against torch with."""
    from deploykit.data import iterate_batches

    return [dict(next(iterate_batches(split.feeds, size))) for size in (8, 1)]
