"""One library function per CLI command; ``run_recipe`` chains the same stage functions.

Artifacts of a run (``runs/<name>/``)::

    data/calibration.npz|.json   data/evaluation.npz|.json     seeded split, feeds + texts + hashes
    model.onnx  model.export.json                              FP32 export and its parity check
    model.int8.onnx  model.int8.ranges.json                    Q/DQ model and calibration ranges
    reference.npz                                              torch FP32 outputs on the evaluation set
    report.json  report.md  *.png                              the report (contract in DESIGN.md)
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from deploykit import stages
from deploykit.bench import BenchConfig, bench_settings
from deploykit.context import RunContext, RunResult, new_report, reference_outputs, run_environment, save_report
from deploykit.data import DataSpec, Split, load_split, make_splits, save_split
from deploykit.errors import UserError
from deploykit.io import read_json, read_npz, refuse_overwriting_inputs, write_json
from deploykit.onnx_utils import get_metadata, load_onnx
from deploykit.progress import say, stage
from deploykit.quantize import PRESETS, QuantConfig, calibrate
from deploykit.quantize.baselines import VARIANT as BASELINE_VARIANT
from deploykit.recipe import Recipe, load_recipe
from deploykit.runners import BACKENDS, default_threads
from deploykit.stages import (bench_all, bench_targets, check_targets, print_latency, print_parity, variant_names,
                              verify_backends)


NO_TARGET = "unspecified"        # the report's target when a standalone stage was given none (--target)


# ----------------------------------------------------------------------------- helpers
def update_report(path: Path, update: dict[str, Any], *, model: str, target: str) -> Path:
    """Merge a stage's results into the report at ``path`` (a new one if absent) and save it."""
    from deploykit.report import merge_report

    existing = read_json(path, what="report") if path.is_file() else new_report(model, None, target)
    if existing.get("target") == NO_TARGET and target != NO_TARGET:
        existing["target"] = target           # a later stage named the deployment target
    return save_report(path, merge_report(existing, {**update, "environment": run_environment()}))


def model_source_for(onnx_path: Path, source: str | None) -> str:
    """The model source to use with an ONNX file: given, or recorded in it at export."""
    if source:
        return source
    meta = get_metadata(load_onnx(onnx_path, load_weights=False))
    recorded = meta.get("source")
    if not recorded and not meta:
        return f"onnx:{Path(onnx_path).resolve()}"       # a user's ONNX file is its own model source
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


def is_user_onnx(path: Path) -> bool:
    """An ONNX file deploykit did not write (no deploykit metadata): prepared before use."""
    return not get_metadata(load_onnx(path, load_weights=False))


def prepared_models(bundle, models: list[Path], out_dir: Path) -> list[Path]:
    """``models`` with each user's FP32 ONNX file (an ONNX model source) replaced by its
    prepared graph, written to ``out_dir/<stem>.fp32.onnx``; the user's file is only read."""
    if not stages.has_onnx_reference(bundle):
        return list(models)
    from deploykit.export.onnx_in import prepare_onnx

    out: list[Path] = []
    for path in models:
        if is_user_onnx(path) and Path(path).resolve() == Path(bundle.info["onnx_file"]):
            prepared = Path(out_dir) / f"{Path(path).stem}.fp32.onnx"
            refuse_overwriting_inputs(prepared, tuple(models))
            with stage(f"prepare {path} -> {prepared}"):
                result = prepare_onnx(bundle, prepared)
            say(f"  parity vs {stages.reference_name(bundle)}: max |diff| {result.parity['max_abs_diff']:.3g}")
            path = prepared
        out.append(path)
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
def export_model(source: str, out: Path, *, options: dict[str, Any] | None = None, opset: int = 18,
                 decode_step: bool = False) -> dict[str, Any]:
    from deploykit.export import export_onnx
    from deploykit.models import load_model

    if decode_step:
        return _export_decode_step(source, out, options=options, opset=opset)
    with stage(f"export {source}"):
        bundle = load_model(source, options)
        result = export_onnx(bundle, out, opset=opset)
    summary = result.summary()
    write_json(out.with_suffix(".export.json"), {"model": bundle.source, **summary})
    say(f"wrote {out} (opset {opset}, {result.node_count} nodes); parity vs torch: max |diff| "
        f"{result.parity['max_abs_diff']:.3g}")
    return summary


def _export_decode_step(source: str, out: Path, *, options: dict[str, Any] | None, opset: int) -> dict[str, Any]:
    """``deploykit export --decode-step``: the KV-cache step, its parity measured on the last
    token of 16 docstring sentences after their prefixes."""
    from deploykit.export.decode import export_decode_step
    from deploykit.models import load_model

    with stage(f"export the decode step of {source}"):
        bundle = load_model(source, options)
        split = make_splits(bundle, DataSpec(source="docstrings", calibration=16, evaluation=1, seed=0)).calibration
        record = export_decode_step(bundle, out, split, opset=opset)
    write_json(out.with_suffix(".export.json"), record)
    say(f"wrote {out} (decode step, {record['layers']} layers' KV cache, opset {opset}, {record['nodes']} nodes); "
        f"parity vs torch: max |diff| {record['parity']['max_abs_diff']:.3g}, vs the prefill at the same position "
        f"{record['parity']['vs_prefill_max_abs_diff']:.3g}")
    return record


# ----------------------------------------------------------------------------- calibrate
def smoothing_line(summary: dict[str, Any]) -> str:
    """``SmoothQuant alpha 0.8 (ln-fed): 12 groups smoothed (6 folded into LayerNorm, 6 as Mul)``."""
    folds = summary.get("smoothing_folds") or {}
    how = {"layernorm": "folded into LayerNorm", "rmsnorm": "folded into RMSNorm",
           "linear": "folded into the previous Linear", "mul": "as an explicit Mul"}
    parts = ", ".join(f"{n} {how.get(k, k)}" for k, n in folds.items() if n)
    alpha = summary.get("smoothquant_alpha")
    alpha = ", ".join(f"{k} {v}" for k, v in alpha.items()) if isinstance(alpha, dict) else alpha
    return (f"SmoothQuant alpha {alpha} ({summary.get('smoothquant_targets')}): "
            f"{summary.get('smoothed_groups', 0)} groups smoothed" + (f" ({parts})" if parts else ""))


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
    model_path = prepared_models(bundle, [model_path], out.parent)[0]
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
        f"nodes, {result.float_line()}; "
        f"ranges in {result.ranges_path}")
    if summary.get("smoothed_groups") or summary.get("smoothquant_alpha") is not None:
        say("  " + smoothing_line(summary))
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
    bundle = model_for(models[0], source, options)
    models = prepared_models(bundle, models, report.parent)
    notes = check_targets(models, targets or [])
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
    name = stages.reference_name(bundle)
    computed = f"{stages.reference_label(bundle)}, computed here"
    result["verification"].update({"inputs": str(inputs_path) if inputs_path else None,
                                   "reference": str(reference) if reference else computed, "reference_model": name})
    print_parity(result["parity"], result["verification"])
    update = {"model": bundle.source, "artifacts": {f"{k}.onnx": str(m) for k, m in variants.items()},
              "accuracy": result["accuracy"], "distributions": result["distributions"], "parity": result["parity"],
              "verification": result["verification"], "acceptance": result["verification"]["checks"],
              # saved inputs carry their own record (verification.inputs / inputs_sha256): a run's
              # data summary is not overwritten by them
              **({} if inputs_path else {"data": {"evaluation": split.summary(), "source": data, "seed": spec.seed}}),
              **({"notes": [f"{t}: {n}" for t, ns in notes.items() for n in ns]} if notes else {})}
    update_report(report, update, model=bundle.source, target=(targets or [NO_TARGET])[0])
    return {**update, "passed": result["passed"]}


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
        models = prepared_models(bundle, models, report.parent)
    elif source:
        bundle = load_model(source, options)
    else:
        raise UserError("the torch baseline alone needs the model source", fix="pass --model")
    check_data_file(data, models)
    split = checked_split(stage_split(bundle, data, "evaluation", spec), models, data)
    check_bench_length(split, models, data, config)
    threads = config.threads or default_threads()
    latency = bench_all(bundle, split, models, backends, config, threads, torch_baseline)
    print_latency(latency)
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
    models = prepared_models(bundle, models, report.parent)
    split = checked_split(stage_split(bundle, data, "evaluation", spec), models, data)
    check_bench_length(split, models, data, config)
    section = bench_targets(dict(zip(variant_names(models), models)), split, targets, config)
    update = {"targets": section,
              **({"notes": [f"{t}: {n}" for t, ns in notes.items() for n in ns]} if notes else {})}
    update_report(report, update, model=bundle.source, target=targets[0])
    return update


def check_bench_length(split: Split, models: list[Path], data: str, config: BenchConfig) -> None:
    """The feeds bench runs (``--seq`` columns, padding kept) fit each model's position table."""
    from deploykit.bench import bench_feeds

    checked_split(replace(split, feeds=bench_feeds(split, 1, config.seq_len)), models, data, trimmed=False,
                  length_fix=f"lower --seq (bench.seq_len, now {config.seq_len}) to the model's positions")


# ----------------------------------------------------------------------------- run
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
            from deploykit.study import run_study      # only studies need it

            return run_study(rec, run_dir)
        return _run_single(rec, run_dir)


def _run_single(rec: Recipe, run_dir: Path) -> RunResult:
    ctx = RunContext(rec, run_dir)
    say(f"[bold]deploykit run[/] {rec.name} -> {run_dir}")
    stages.load(ctx)
    _check_bench_seq_len(ctx)
    ctx.lap("load_model")
    tuning = rec.quantize.tune.samples if rec.quantize.tune.enabled else 0
    stages.data(ctx, DataSpec(**{**asdict(rec.data), "tuning": tuning}))
    ctx.lap("data")
    stages.train(ctx)
    stages.export(ctx)
    ctx.lap("export")
    stages.calibrate_int8(ctx)
    stages.baselines(ctx)
    stages.reference(ctx)
    ctx.lap("reference")
    stages.verify(ctx)
    stages.bench(ctx)
    ctx.report = _run_report(ctx)
    save_report(run_dir / "report.json", ctx.report)
    stages.package(ctx)
    report_path = save_report(run_dir / "report.json", ctx.report)
    return stages.finish(ctx, report_path, ctx.report["acceptance"])


def _check_bench_seq_len(ctx: RunContext) -> None:
    max_length = getattr(ctx.bundle.preprocessor, "max_length", None)
    if max_length is not None and ctx.rec.bench.seq_len > max_length:
        raise UserError(f"bench.seq_len {ctx.rec.bench.seq_len} is longer than model.options.max_length "
                        f"{max_length}", path=ctx.rec.path, fix="raise model.options.max_length or lower bench.seq_len")


def _run_report(ctx: RunContext) -> dict[str, Any]:
    """report.json of a run (contract in DESIGN.md), before packaging."""
    rec, run_dir, verified, cal = ctx.rec, ctx.run_dir, ctx.verified, ctx.calibration
    report = new_report(ctx.bundle.source, rec.path, rec.target)
    report.update({
        "run": rec.name,
        "artifacts": {**{name: str(path) for name, path in ctx.models.items()},
                      "reference": str(run_dir / "reference.npz"), "calibration_ranges": str(cal.ranges_path),
                      **{f"data_{k}": str(v) for k, v in ctx.data_paths.items()}},
        "accuracy": verified["accuracy"],
        "distributions": verified["distributions"],
        "parity": verified["parity"],
        "verification": {**verified["verification"], "inputs": str(ctx.data_paths["evaluation"]),
                         "reference": str(run_dir / "reference.npz"),
                         "reference_model": stages.reference_name(ctx.bundle)},
        "latency": ctx.latency,
        "targets": ctx.targets,
        "data": ctx.splits.summary(),
        "export": {k: v for k, v in ctx.exported.summary().items() if k != "path"},
        "calibration": {k: v for k, v in cal.summary().items() if k not in ("path", "ranges")},
        "file_sizes": {"fp32_mb": round(cal.file_sizes["fp32_bytes"] / 1e6, 2),
                       "int8_mb": round(cal.file_sizes["int8_bytes"] / 1e6, 2),
                       "int8_over_fp32": cal.file_sizes["int8_over_fp32"]},
        **({"tuning": cal.tuning} if cal.tuning is not None else {}),
        "bench": bench_settings(rec.bench, ctx.threads),
        "acceptance": verified["verification"]["checks"],
        **({"training": ctx.training} if ctx.training else {}),
        "recipe_settings": rec.to_dict(),
        "timings_s": ctx.timings,
        **({"notes": [f"{t}: {n}" for t, ns in ctx.target_notes.items() for n in ns]} if ctx.target_notes else {}),
    })
    return report
