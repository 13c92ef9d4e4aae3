"""A study: several variants of one model, built, trained and quantized the same way.

The outlier study of Bondarenko et al. (2023) in miniature is one: vanilla softmax,
clipped softmax and gated attention, same seed, data and budget; for each, the FP
accuracy, the activation-outlier metrics, and the accuracy after W8A8 in the paper's
setting and in deploykit's deployment presets. Artifacts per variant go to
``runs/<name>/<variant>/`` (checkpoint, ONNX, Q/DQ models, ranges); the comparison goes to
``report.json`` (``study`` section, accuracy keys ``<variant>:<model>``) and ``report.md``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deploykit import stages
from deploykit.context import RunContext, RunResult, new_report, reference_outputs, save_report
from deploykit.data import DataSpec, DataSplits
from deploykit.errors import UserError
from deploykit.io import write_json
from deploykit.progress import say, stage
from deploykit.recipe import Recipe, evaluate_acceptance, variant_spec
from deploykit.study_report import OUTLIER_PLOT, compression_lines, format_study_table


def variant_options(rec: Recipe, transforms: list[dict[str, Any]] | None) -> dict[str, Any]:
    options = dict(rec.model.options)
    options["transforms"] = list(options.get("transforms") or []) + list(transforms or [])
    if not options["transforms"]:
        options.pop("transforms")
    return options


def fine_tune_variant(bundle, rec: Recipe, splits: DataSplits, out_dir: Path, *, teacher,
                      stages: list[str], spec) -> dict[str, Any]:
    """Fine-tune a variant by distillation from ``teacher`` (the study's base, or the
    pretrained model) with ``spec``, stage by stage (the budget split evenly) when
    ``stages`` is given (BiViT: binary attention first, then everything)."""
    from deploykit.train import train

    spec = copy.deepcopy(spec)
    if splits.training is None:
        raise UserError("fine-tuning a study variant needs a training split", path=rec.path,
                        fix="set data.training (a count, or -1 for every sample the other splits leave)")
    runs = []
    for i, stage_name in enumerate(stages or [None]):
        if stage_name is not None:
            from deploykit.recipes.binarize import set_binarization_stage

            set_binarization_stage(bundle.module, stage_name)
        part = copy.deepcopy(spec)
        part.epochs = spec.epochs / max(1, len(stages))
        last = i == max(0, len(stages) - 1)
        result = train(bundle, splits.training, part, teacher=teacher,
                       checkpoint=out_dir / "model.safetensors" if last else None,
                       description=f"fine-tune {out_dir.name}" + (f" ({stage_name})" if stage_name else ""))
        runs.append({"stage": stage_name, **result.summary()})
    out = dict(runs[-1])
    out["stages"] = runs
    out["seconds"] = round(sum(r["seconds"] for r in runs), 1)
    out["steps"] = sum(r["steps"] for r in runs)
    out["losses"] = [v for r in runs for v in r["losses"]]
    return out


def resolve_data_transforms(rec: Recipe, options: dict[str, Any], splits: DataSplits) -> tuple[dict, list]:
    """Transforms whose settings come from data (head pruning ranked by importance): computed
    on the calibration split from the base weights (with the variant's earlier transforms)
    and written into the variant's transforms as an explicit ``heads`` list, so the variant
    (and its checkpoint) rebuilds without data."""
    transforms = list(options.get("transforms") or [])
    derived = []
    for i, t in enumerate(transforms):
        if t.get("name") != "head-pruning" or "heads" in t or t.get("importance", "gradient") == "weight-norm":
            continue
        from deploykit.models import load_model
        from deploykit.sparsity import plan_head_pruning

        before = load_model(rec.model.source, {**options, "transforms": transforms[:i]})
        entry = plan_head_pruning(before, splits.calibration, prune=t.get("prune"), ratio=t.get("ratio"),
                                  importance=t.get("importance", "gradient"))
        transforms[i] = {"name": "head-pruning", "heads": entry["heads"]}
        derived.append({**entry, "ranked_on": f"calibration split ({splits.calibration.count} samples)"})
    return ({**options, "transforms": transforms} if derived else options), derived


def write_binary_onnx(fp32: Path, dest: Path) -> Path:
    """The FP32 export with every binary weight stored as int8 ±1 + a per-channel scale through
    DequantizeLinear (bit-exact: ``deploykit.compression.binarize_initializers`` checks it)."""
    import onnx

    from deploykit.compression import binarize_initializers
    from deploykit.io import atomic_path

    model = onnx.load(str(fp32))
    converted = binarize_initializers(model)
    if not converted:
        raise UserError("the model has binary-weights transforms but no binary weight in its export", path=fp32,
                        fix="check the transform's targets")
    onnx.checker.check_model(model, full_check=True)
    with atomic_path(dest, inputs=(fp32,)) as tmp:
        onnx.save(model, str(tmp))
    return dest


def compression_figures(bundle, models: dict[str, Path], splits: DataSplits, rec: Recipe) -> dict[str, Any]:
    """Per variant: parameters, packed bytes, BOPs / FLOPs / OPs (OPs = BOPs/64 + FLOPs, for one
    example), weight sparsity (2:4 layers), attention sparsity or density (binary and top-k
    attention, recorded on evaluation samples) and the ONNX files (latency: interleaved_latency)."""
    import contextlib

    import torch

    from deploykit.bench import bench_feeds
    from deploykit.compression import model_stats, onnx_file_stats
    from deploykit.data import iterate_batches
    from deploykit.recipes.binarize import attention_density, binary_attention_modules, recording_attention
    from deploykit.recipes.sparsify import topk_modules
    from deploykit.sparsity import attention_sparsity, check_2_4, parameter_counts, record_attention_sparsity
    from deploykit.sparsity import weight_sparsity

    module = bundle.module
    example = bench_feeds(splits.evaluation, 1, rec.bench.seq_len)
    out: dict[str, Any] = {"model": model_stats(module, tuple(example[k] for k in bundle.input_names))}
    out["weights"] = weight_sparsity(module)
    try:
        out["heads"] = parameter_counts(module)
    except UserError:               # no deploykit attention module (an untransformed model)
        pass
    binary = bool(binary_attention_modules(module))
    topk = not binary and any(m is not None for m in topk_modules(module))
    if binary or topk:
        with contextlib.ExitStack() as stack:
            stack.enter_context(recording_attention(module) if binary else record_attention_sparsity(module))
            stack.enter_context(torch.no_grad())
            samples = {k: v[:64] for k, v in splits.evaluation.feeds.items()}
            for feeds in iterate_batches(samples, 32):
                module(*[torch.from_numpy(feeds[k]) for k in bundle.input_names])
        out["attention"] = attention_density(module) if binary else attention_sparsity(module)
    out["files"] = {k: onnx_file_stats(p) for k, p in models.items()}
    out["onnx_2_4"] = {k: v for k, v in check_2_4(models["fp32"]).items() if k != "initializers"}
    return out


def interleaved_latency(models: dict[str, dict[str, Path]], splits: DataSplits, rec: Recipe,
                        rounds: int = 5) -> dict[str, dict[str, Any]]:
    """ORT CPU latency of every variant's models at batch 1 and the largest bench batch, timed
    in ``rounds`` interleaved rounds (variant A, B, C, ..., then again) and summarised by the
    median over rounds: drift of a shared machine then hits every variant alike instead of
    whichever ran during it. ``{variant: {"<model>@ort-cpu/b<batch>": entry}}``."""
    import statistics

    from deploykit.bench import BenchConfig, bench_feeds, time_runner
    from deploykit.progress import track
    from deploykit.runners import OrtRunner

    config = BenchConfig(batches=sorted({1, max(rec.bench.batches)}), seq_len=rec.bench.seq_len, warmup=2,
                         iterations=10, min_seconds=0.3, max_seconds=5.0)
    runners = {(v, key): OrtRunner(path, exact_qdq=False) for v, paths in models.items() for key, path in paths.items()}
    feeds = {b: bench_feeds(splits.evaluation, b, config.seq_len) for b in config.batches}
    samples: dict[tuple, list[dict[str, Any]]] = {}
    jobs = [(r, v, key, b) for r in range(rounds) for (v, key) in runners for b in config.batches]
    for _, v, key, b in track(jobs, total=len(jobs), description="latency (interleaved rounds)"):
        samples.setdefault((v, key, b), []).append(time_runner(runners[(v, key)], feeds[b], config))
    out: dict[str, dict[str, Any]] = {}
    for (v, key, b), runs in samples.items():
        entry = {k: statistics.median(r[k] for r in runs) for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms",
                                                                    "throughput_per_s")}
        entry.update(batch=b, rounds=len(runs), iterations=sum(r["iterations"] for r in runs),
                     threads=runs[0]["threads"], p50_ms_rounds=[round(r["p50_ms"], 4) for r in runs])
        out.setdefault(v, {})[f"{key}@ort-cpu/b{b}"] = entry
    return out


def target_fit(rec: Recipe, artifacts: dict[str, str]) -> list[str]:
    """Whether each variant's deployable model (the primary target's preset) fits each target of
    the recipe, as report notes: a study compares variants, so a misfit is reported, not refused."""
    from deploykit.targets import check_model, get_target

    preset = rec.preset()
    notes = []
    for key, path in artifacts.items():
        if not key.endswith(f":{preset}"):
            continue
        for name in rec.targets:
            try:
                found = check_model(path, get_target(name))
            except UserError as exc:
                notes.append(f"{key} does not fit {name}: {exc.message}")
                continue
            notes += [f"{key} on {name}: {n}" for n in found]
    return notes


@dataclass
class StudyState:
    """What a study's variants share and add to, in the order they run."""
    ctx: RunContext                  # the study's: its folder, the untransformed model, data, artifacts, timings
    distill: bool
    teacher: Any = None              # the untransformed module, when distilling
    teacher_ref: Any = None          # its outputs on the evaluation split, when distilling
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    variants: dict[str, Any] = field(default_factory=dict)
    deployed: dict[str, dict[str, Path]] = field(default_factory=dict)   # per variant, the models timed
    base_checkpoint: str | None = None                                   # for the compression table
    base_teacher: Any = None


def run_study(rec: Recipe, run_dir: Path) -> RunResult:
    from deploykit.outliers import plot_outliers

    say(f"[bold]deploykit run[/] {rec.name} (study of {len(rec.study.variants)} variants) -> {run_dir}")
    ctx = RunContext(rec, run_dir)
    study = study_setup(ctx)
    for name in variant_order(rec):
        run_variant(study, name)
    latency = variant_latency(study)
    # One layer's cost by sequence length: a study-level figure, not a model latency, so it
    # lives in the study section (report.json "latency" is the whole model by batch size).
    layer = measure_layer_latency(rec) if rec.study.layer_latency.enabled else None
    task = ctx.bundle.task
    table = study_table(study.variants, study.accuracy, task, rec.study.presets, study.distill)
    compressed = compression_table(study.variants, study.accuracy, task, rec.study.base) \
        if rec.study.compression else []
    acceptance = evaluate_acceptance(rec.acceptance, study.accuracy)
    ctx.report = study_report(study, latency, layer, table, compressed, acceptance)
    plot_outliers({k: v["outliers"] for k, v in study.variants.items()}, run_dir / OUTLIER_PLOT)
    report_path = save_report(run_dir / "report.json", ctx.report)
    _print_table(table, rec.study.presets, rec.study.title)
    for line in compression_lines(compressed)[2:]:
        say(line)
    return stages.finish(ctx, report_path, acceptance)


def study_setup(ctx: RunContext) -> StudyState:
    """The untransformed model: it fixes the data (preprocessing) and, when distilling, is the
    teacher every variant matches and is scored against."""
    rec = ctx.rec
    stages.load(ctx, untransformed=True)
    stages.data(ctx, DataSpec(**asdict(rec.data)))
    distill = rec.train.enabled and rec.train.mode == "distill"
    study = StudyState(ctx, distill, teacher=ctx.bundle.module if distill else None)
    if distill:
        study.teacher_ref = stages.reference(ctx, "teacher outputs (the untransformed model)",
                                             "teacher_reference.npz")
    ctx.lap("setup")
    ctx.artifacts = {f"data_{k}": str(v) for k, v in ctx.data_paths.items()}
    return study


def variant_order(rec: Recipe) -> list[str]:
    """The study's variants, the base first (the others start from it)."""
    order = list(rec.study.variants)
    if rec.study.base is not None:
        order.remove(rec.study.base)
        order.insert(0, rec.study.base)
    return order


def run_variant(study: StudyState, name: str) -> None:
    """One variant through the stages into ``<run>/<name>/``: its model, training, outliers,
    export, calibration per preset, verification (and compression figures); ``variant.json``."""
    from deploykit.models import load_model

    ctx, rec = study.ctx, study.ctx.rec
    transforms, fine_stages = variant_spec(rec.study.variants[name], name, rec.path)
    t = time.perf_counter()
    vdir = ctx.run_dir / name
    say(f"[bold]variant {name}[/]: {transforms or 'no transform'}")
    options, derived = variant_options_for(study, transforms)
    bundle = load_model(rec.model.source, options)
    trained = train_study_variant(study, bundle, options, vdir, fine_stages)
    if derived:
        trained = {**(trained or {}), "derived_transforms": derived}
    if name == rec.study.base:
        if not (trained and trained.get("checkpoint")):
            raise UserError(f"study.base '{name}' must be trained to give the other variants a start",
                            path=rec.path, fix="set train.enabled: true")
        study.base_checkpoint = trained["checkpoint"]
    vctx = RunContext(rec, vdir, bundle=bundle, splits=ctx.splits)
    outliers, calibration = build_variant(study, vctx, name)
    ctx.artifacts.update({f"{name}:{k}": str(p) for k, p in vctx.models.items()})
    if trained and trained.get("checkpoint"):
        ctx.artifacts[f"{name}:checkpoint"] = trained["checkpoint"]
    if rec.study.compression:
        with stage(f"compression figures {name}"):
            compression = compression_figures(bundle, vctx.models, ctx.splits, rec)
        study.deployed[name] = {k: p for k, p in vctx.models.items() if k in ("fp32", "binary")}
    study.variants[name] = {"transforms": bundle.info.get("transforms", []), "train": trained,
                            **({"compression": compression} if rec.study.compression else {}),
                            "outliers": outliers.to_dict(), "export_parity": vctx.exported.parity["max_abs_diff"],
                            "calibration": calibration, "seconds": round(time.perf_counter() - t, 1)}
    ctx.timings[name] = round(time.perf_counter() - t, 2)
    write_json(vdir / "variant.json", study.variants[name])


def variant_options_for(study: StudyState, transforms: list[dict[str, Any]] | None) -> tuple[dict, list]:
    """The variant's model options (starting from the trained base where there is one) and the
    transforms derived from data for it."""
    rec = study.ctx.rec
    options = variant_options(rec, transforms)
    if study.base_checkpoint is not None:
        options["base_checkpoint"] = study.base_checkpoint
    return resolve_data_transforms(rec, options, study.ctx.splits)


def train_study_variant(study: StudyState, bundle, options: dict[str, Any], vdir: Path,
                        fine_stages: list[str]) -> dict[str, Any] | None:
    """A variant derived from the trained base is fine-tuned from it; a staged one is fine-tuned
    stage by stage; the others are trained per the recipe (or not at all)."""
    from deploykit.train import distillation_teacher, train_variant

    rec, splits = study.ctx.rec, study.ctx.splits
    if study.base_checkpoint is not None:
        if study.base_teacher is None:         # the trained base, frozen: one for every derived variant
            study.base_teacher = distillation_teacher(rec.model.source, {k: v for k, v in options.items()
                                                                          if k != "transforms"}).module
        return fine_tune_variant(bundle, rec, splits, vdir, teacher=study.base_teacher, stages=fine_stages,
                                 spec=rec.study.fine_tune)
    if fine_stages and rec.train.enabled and bundle.info.get("transforms"):
        return fine_tune_variant(bundle, rec, splits, vdir, stages=fine_stages, spec=rec.train,
                                 teacher=study.teacher if study.teacher is not None else distillation_teacher(
                                     rec.model.source, rec.model.options).module)
    return train_variant(bundle, rec, splits, vdir, teacher=study.teacher)


def build_variant(study: StudyState, vctx: RunContext, name: str) -> tuple[Any, dict[str, Any]]:
    """Outliers, export, calibration per preset and verification of one variant; its outlier
    statistics and calibration summary (accuracy into the study's)."""
    from deploykit.outliers import measure_outliers, print_outliers

    rec, bundle, splits = vctx.rec, vctx.bundle, vctx.splits
    outliers = measure_outliers(bundle, splits.evaluation, batch_size=rec.verify.batch_size,
                                samples=rec.study.outlier_samples, description=f"outliers {name}")
    print_outliers(outliers, title=f"{name}: activation outliers per layer")
    stages.export(vctx, f"export {name}", record=False)
    fp32 = vctx.models["fp32"]
    if any(t.get("name") in ("binary-weights",) for t in bundle.info.get("transforms", [])):
        with stage(f"binary weights as int8 ±1 + per-channel scales {name}"):
            vctx.models["binary"] = write_binary_onnx(fp32, vctx.run_dir / "model.binary.onnx")
    calibration = {}
    for preset in rec.study.presets:
        config = copy.deepcopy(rec.quantize)
        config.preset = preset
        config.tune.enabled = False
        if preset != (rec.quantize.preset or preset):
            config.method = None          # each preset's own range method
        cal = stages.calibrate(vctx, preset, config, preset, f"calibrate {name} ({preset})")
        calibration[preset] = {"method": cal.config.method, "quantized_nodes": len(cal.quantized_nodes),
                               "float_nodes": len(cal.float_nodes), "qdq": cal.qdq_counts}
    reference = study.teacher_ref if study.distill else reference_outputs(bundle, splits.evaluation,
                                                                          rec.verify.batch_size)
    verified = stages.verify_on_ort(vctx, reference, f"verify {name}")
    for key, metrics in verified.accuracy.items():
        study.accuracy[f"{name}:{key}"] = metrics
    return outliers, calibration


def variant_latency(study: StudyState) -> dict[str, Any]:
    """Every variant's deployed models timed in interleaved rounds (with ``study.compression``);
    the report's latency section (``<variant>:<model>@ort-cpu/b<batch>``)."""
    ctx, rec = study.ctx, study.ctx.rec
    if rec.study.compression:
        with stage("latency of every variant (ORT CPU, interleaved rounds)"):
            timed = interleaved_latency(study.deployed, ctx.splits, rec)
        for name, rows in timed.items():
            study.variants[name]["compression"]["latency"] = rows
            write_json(ctx.run_dir / name / "variant.json", study.variants[name])
    return {f"{name}:{key}": row for name, info in study.variants.items()
            for key, row in (info.get("compression") or {}).get("latency", {}).items()}


def study_report(study: StudyState, latency: dict[str, Any], layer: dict[str, Any] | None,
                 table: list[dict[str, Any]], compressed: list[dict[str, Any]],
                 acceptance: list[dict[str, Any]]) -> dict[str, Any]:
    """report.json of a study: the comparison in its ``study`` section."""
    ctx, rec, distill = study.ctx, study.ctx.rec, study.distill
    base = ctx.bundle
    fits = target_fit(rec, ctx.artifacts)
    report = new_report(base.source, rec.path, rec.target)
    report.update({
        "run": rec.name, "artifacts": ctx.artifacts, "accuracy": study.accuracy, "latency": latency,
        "data": ctx.splits.summary(),
        "study": {"title": rec.study.title, "task": base.task, "reference": "teacher (untransformed model)" if distill
                  else "labels / the variant's own torch FP32", "presets": rec.study.presets,
                  "table": table, "variants": study.variants, **({"layer_latency": layer} if layer else {}),
                  **({"compression_table": compressed} if compressed else {})},
        "acceptance": acceptance, "recipe_settings": rec.to_dict(), "timings_s": ctx.timings,
        **({"notes": fits} if fits else {}),
    })
    return report


def measure_layer_latency(rec: Recipe) -> dict[str, Any]:
    """One attention layer per distinct variant kind, timed on ORT CPU at each length."""
    import onnxruntime as ort

    from deploykit.bench.attention_layer import build_layer, layer_op, time_layer
    from deploykit.runners import default_threads

    spec = rec.study.layer_latency
    threads = spec.threads or default_threads()
    out: dict[str, Any] = {"setup": {"heads": spec.heads, "head_dim": spec.head_dim, "batch": 1,
                                     "threads": threads, "iterations": spec.iterations,
                                     "onnxruntime": ort.__version__},
                           "ops": {}, "variants": {}}
    for name, transforms in rec.study.variants.items():
        # A ViT's neighborhood swap windows the 2-D patch grid; text models a 1-D sequence.
        op = layer_op(variant_options(rec, transforms).get("transforms"),
                      ndim=2 if rec.model.source.startswith("timm:") else 1)
        with stage(f"attention layer latency: {name} ({op['kind']})"):
            model = build_layer(op, spec.heads, spec.head_dim)
            rows = time_layer(model, op, spec.lengths, spec.heads, spec.head_dim, threads=threads,
                              iterations=spec.iterations)
        out["ops"][name] = op
        out["variants"][name] = {str(n): row for n, row in rows.items()}
    return out


def compression_table(variants: dict[str, Any], accuracy: dict[str, dict[str, float]], task: str,
                      base: str | None) -> list[dict[str, Any]]:
    """One row per variant: accuracy (the deployed ONNX: int8 ±1 weights where binary, else FP32)
    and its change from the base, parameters, packed bytes, operations, sparsity, latency."""
    metric = "top1" if task == "image-classification" else "cosine_mean"
    rows = []
    ref = None
    for name, info in variants.items():
        c = info.get("compression")
        if not c:
            continue
        deployed = "binary" if "binary" in c["files"] else "fp32"
        value = accuracy.get(f"{name}:{deployed}", {}).get(metric)
        if name == (base or next(iter(variants))):
            ref = value
        att = c.get("attention") or {}
        lat = c["latency"]
        rows.append({
            "variant": name, "deployed": deployed, "metric": metric, "value": value,
            "parameters": c["model"]["parameters"], "packed_bytes": c["model"]["packed_bytes"],
            "onnx_bytes": c["files"][deployed]["file_bytes"], "bops": c["model"]["bops"],
            "flops": c["model"]["flops"], "ops": c["model"]["ops"],
            "linear_sparsity": c["weights"]["linear_sparsity"], "two_four_layers": c["weights"]["two_four_layers"],
            "attention_density": att.get("density") if "density" in att else (
                None if att.get("mean") is None else 1.0 - att["mean"]),
            "p50_ms_b1": lat.get(f"{deployed}@ort-cpu/b1", {}).get("p50_ms"),
            "p50_ms_bmax": max((v for k, v in lat.items() if k.startswith(f"{deployed}@")),
                               key=lambda v: v["batch"])["p50_ms"],
            "bmax": max(v["batch"] for k, v in lat.items() if k.startswith(f"{deployed}@")),
        })
    for row in rows:
        row["delta"] = None if ref is None or row["value"] is None else row["value"] - ref
    return rows


def study_table(variants: dict[str, Any], accuracy: dict[str, dict[str, float]], task: str,
                presets: list[str], distill: bool) -> list[dict[str, Any]]:
    """One row per variant: FP metric, outlier metrics, metric after each preset."""
    rows = []
    for name, info in variants.items():
        s = info["outliers"]["summary"]
        row: dict[str, Any] = {"variant": name, "max_inf_norm": s["max_inf_norm"],
                               "avg_kurtosis": s["avg_kurtosis"]}
        if task == "image-classification":
            row["metric"] = "top1"
            row["fp32"] = accuracy.get(f"{name}:torch-fp32", {}).get("top1")
            for p in presets:
                row[p] = accuracy.get(f"{name}:{p}", {}).get("top1")
                row[f"{p}_agree"] = accuracy.get(f"{name}:{p}", {}).get("top1_agreement")
        else:
            row["metric"] = "cosine_mean / nn_agreement vs teacher" if distill else "cosine_mean / nn_agreement"
            fp = accuracy.get(f"{name}:fp32", {})
            row["fp32"] = fp.get("cosine_mean")
            row["fp32_nn"] = fp.get("nn_agreement")
            for p in presets:
                m = accuracy.get(f"{name}:{p}", {})
                row[p] = m.get("cosine_mean")
                row[f"{p}_nn"] = m.get("nn_agreement")
        rows.append(row)
    return rows


def _print_table(table: list[dict[str, Any]], presets: list[str], title: str) -> None:
    from deploykit.progress import console, is_quiet

    if is_quiet() or not table:
        return
    from rich.table import Table

    header, rows = format_study_table(table, presets)
    out = Table(title=f"{title} ({table[0]['metric']})")
    for h in header:
        out.add_column(h, justify="left" if h == "variant" else "right")
    for r in rows:
        out.add_row(*r)
    console.print(out)


__all__ = ["run_study", "study_table", "variant_options"]
