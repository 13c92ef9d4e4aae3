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
from dataclasses import asdict
from pathlib import Path
from typing import Any

from deploykit.data import DataSpec, DataSplits, make_splits, save_split
from deploykit.errors import UserError
from deploykit.io import read_json, write_json, write_npz
from deploykit.progress import say, stage
from deploykit.quantize import calibrate
from deploykit.recipe import Recipe, evaluate_acceptance

OUTLIER_PLOT = "outliers.png"
LOSS_PLOT = "training_loss.png"
LAYER_PLOT = "attention_layer_latency.png"


def variant_options(rec: Recipe, transforms: list[dict[str, Any]] | None) -> dict[str, Any]:
    options = dict(rec.model.options)
    options["transforms"] = list(options.get("transforms") or []) + list(transforms or [])
    if not options["transforms"]:
        options.pop("transforms")
    return options


def train_variant(bundle, rec: Recipe, splits: DataSplits, out_dir: Path, *, teacher=None) -> dict[str, Any] | None:
    """Train ``bundle`` per ``rec.train`` on the training split; None when there is nothing to do.
    Distillation uses ``teacher`` (a module), or builds :func:`deploykit.train.distillation_teacher`."""
    from deploykit.train import distillation_teacher, train

    spec = rec.train
    if not spec.enabled:
        return None
    if splits.training is None:
        raise UserError("train.enabled needs a training split", path=rec.path,
                        fix="set data.training (a count, or -1 for every sample the other splits leave)")
    if spec.mode == "distill" and not bundle.info.get("transforms"):
        # The student would start equal to its teacher: zero loss, zero gradient, nothing to learn.
        return {"skipped": "distillation of an untransformed model from itself is the identity"}
    if spec.mode == "distill" and teacher is None:
        teacher = distillation_teacher(rec.model.source, rec.model.options).module
    result = train(bundle, splits.training, spec, teacher=teacher, checkpoint=out_dir / "model.safetensors",
                   description=f"train {out_dir.name}")
    return result.summary()


def run_study(rec: Recipe, run_dir: Path):
    from deploykit.export import export_onnx
    from deploykit.models import load_model
    from deploykit.outliers import measure_outliers, plot_outliers, print_outliers
    from deploykit.pipeline import RunResult, new_report, parity_feeds, reference_outputs, save_report
    from deploykit.runners import OrtRunner
    from deploykit.train import distillation_teacher
    from deploykit.verify import verify

    timings: dict[str, float] = {}
    say(f"[bold]deploykit run[/] {rec.name} (study of {len(rec.study.variants)} variants) -> {run_dir}")
    t0 = time.perf_counter()
    with stage(f"load model {rec.model.source}"):
        # The untransformed model: it fixes the data (preprocessing) and, when distilling,
        # is the teacher every variant matches and is scored against.
        base = distillation_teacher(rec.model.source, rec.model.options)
    with stage(f"data: {rec.data.source} (seed {rec.data.seed})"):
        splits = make_splits(base, DataSpec(**asdict(rec.data)))
        data_paths = {name: save_split(split, run_dir / "data") for name, split in splits.parts()
                      if name != "training"}
    distill = rec.train.enabled and rec.train.mode == "distill"
    teacher = base.module if distill else None
    teacher_ref = None
    if distill:
        with stage("teacher outputs (the untransformed model)"):
            teacher_ref = reference_outputs(base, splits.evaluation, rec.verify.batch_size)
            write_npz(run_dir / "teacher_reference.npz", {"output": teacher_ref})
    timings["setup"] = round(time.perf_counter() - t0, 2)

    accuracy: dict[str, dict[str, float]] = {}
    variants: dict[str, Any] = {}
    artifacts: dict[str, str] = {f"data_{k}": str(v) for k, v in data_paths.items()}
    for name, transforms in rec.study.variants.items():
        t = time.perf_counter()
        vdir = run_dir / name
        say(f"[bold]variant {name}[/]: {transforms or 'no transform'}")
        bundle = load_model(rec.model.source, variant_options(rec, transforms))
        trained = train_variant(bundle, rec, splits, vdir, teacher=teacher)
        outliers = measure_outliers(bundle, splits.evaluation, batch_size=rec.verify.batch_size,
                                    samples=rec.study.outlier_samples, description=f"outliers {name}")
        print_outliers(outliers, title=f"{name}: activation outliers per layer")
        fp32 = vdir / "model.onnx"
        with stage(f"export {name}"):
            exported = export_onnx(bundle, fp32, opset=rec.export.opset, parity_feeds=parity_feeds(splits.evaluation))
        models = {"fp32": fp32}
        calibration = {}
        for preset in rec.study.presets:
            config = copy.deepcopy(rec.quantize)
            config.preset = preset
            config.tune.enabled = False
            if preset != (rec.quantize.preset or preset):
                config.method = None          # each preset's own range method
            path = vdir / f"model.{preset}.onnx"
            with stage(f"calibrate {name} ({preset})"):
                cal = calibrate(fp32, splits.calibration, path, config, default_preset=preset)
            models[preset] = path
            calibration[preset] = {"method": cal.config.method, "quantized_nodes": len(cal.quantized_nodes),
                                   "float_nodes": len(cal.float_nodes), "qdq": cal.qdq_counts}
        reference = teacher_ref if distill else reference_outputs(bundle, splits.evaluation, rec.verify.batch_size)
        with stage(f"verify {name}"):
            verified = verify({k: OrtRunner(p) for k, p in models.items()}, reference, splits.evaluation,
                              bundle.task, batch_size=rec.verify.batch_size)
        for key, metrics in verified.accuracy.items():
            accuracy[f"{name}:{key}"] = metrics
        artifacts.update({f"{name}:{k}": str(p) for k, p in models.items()})
        if trained and trained.get("checkpoint"):
            artifacts[f"{name}:checkpoint"] = trained["checkpoint"]
        variants[name] = {"transforms": bundle.info.get("transforms", []), "train": trained,
                          "outliers": outliers.to_dict(), "export_parity": exported.parity["max_abs_diff"],
                          "calibration": calibration, "seconds": round(time.perf_counter() - t, 1)}
        timings[name] = round(time.perf_counter() - t, 2)
        write_json(vdir / "variant.json", variants[name])

    # One layer's cost by sequence length: a study-level figure, not a model latency, so it
    # lives in the study section (report.json "latency" is the whole model by batch size).
    layer = measure_layer_latency(rec) if rec.study.layer_latency.enabled else None
    table = study_table(variants, accuracy, base.task, rec.study.presets, distill)
    acceptance = evaluate_acceptance(rec.acceptance, accuracy)
    report = new_report(base.source, rec.path, rec.target)
    report.update({
        "run": rec.name, "artifacts": artifacts, "accuracy": accuracy, "latency": {},
        "data": splits.summary(),
        "study": {"title": rec.study.title, "task": base.task, "reference": "teacher (untransformed model)" if distill
                  else "labels / the variant's own torch FP32", "presets": rec.study.presets,
                  "table": table, "variants": variants, **({"layer_latency": layer} if layer else {})},
        "acceptance": acceptance, "recipe_settings": rec.to_dict(), "timings_s": timings,
    })
    plot_outliers({k: v["outliers"] for k, v in variants.items()}, run_dir / OUTLIER_PLOT)
    report_path = save_report(run_dir / "report.json", report)
    _print_table(table, rec.study.presets, rec.study.title)
    for a in acceptance:
        say(f"  acceptance {a['check']} {a['threshold']}: {a['value']} -> {'pass' if a['passed'] else 'FAIL'}")
    say(f"[bold]report:[/] {report_path} and {run_dir / 'report.md'}")
    return RunResult(run_dir, report_path, read_json(report_path), all(a["passed"] for a in acceptance))


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


def layer_latency_lines(layer: dict[str, Any]) -> list[str]:
    lengths = list(next(iter(layer["variants"].values())).keys()) if layer["variants"] else []
    s = layer["setup"]
    md = ["### One attention layer, ORT CPU", "",
          f"Median latency of one layer (q, k, v inputs, batch 1, {s['heads']} heads × {s['head_dim']}, "
          f"{s['threads']} threads, ONNX Runtime {s['onnxruntime']}); dense is softmax(QKᵀ)V.", "",
          "| variant | op | " + " | ".join(f"N={n}" for n in lengths) + " |",
          "|---|---|" + "---:|" * len(lengths)]
    for name, rows in layer["variants"].items():
        op = layer["ops"][name]
        detail = op["kind"] + (f" k={op['kernel_size']}" if op["kind"] == "neighborhood" else "") + \
            (" 2-D" if op.get("ndim") == 2 else "") + (" causal" if op.get("causal") else "")
        md.append(f"| {name} | {detail} | " + " | ".join(f"{rows[n]['p50_ms']:.2f} ms" for n in lengths) + " |")
    return md + [""]


def plot_layer_latency(layer: dict[str, Any], dest: Path, inputs: tuple[Path, ...] = ()) -> Path:
    from deploykit.report.render import _figure, _save

    fig, ax = _figure(6.5, 4.0)
    for name, rows in layer["variants"].items():
        xs = [row["seq_len"] for row in rows.values()]
        ax.plot(xs, [row["p50_ms"] for row in rows.values()], marker="o", label=f"{name} ({layer['ops'][name]['kind']})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("one layer, p50 (ms, log scale)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, dest, inputs)


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


def format_study_table(table: list[dict[str, Any]], presets: list[str]) -> tuple[list[str], list[list[str]]]:
    def num(v, digits=4):
        return "—" if v is None else f"{v:.{digits}f}"

    text = any("fp32_nn" in r for r in table)
    header = ["variant", "FP32", "max ∞-norm", "avg kurtosis", *[f"W8A8 {p}" for p in presets]]
    rows = []
    for r in table:
        if text:
            cells = [f"{num(r['fp32'])} / {num(r['fp32_nn'], 3)}"] + \
                    [f"{num(r[p])} / {num(r[f'{p}_nn'], 3)}" for p in presets]
        else:
            def pct(v):
                return "—" if v is None else f"{100 * v:.1f}%"

            cells = [pct(r["fp32"])] + [f"{pct(r[p])} ({pct(r.get(f'{p}_agree'))} agree)" for p in presets]
        rows.append([r["variant"], cells[0], f"{r['max_inf_norm']:.1f}", f"{r['avg_kurtosis']:.1f}", *cells[1:]])
    return header, rows


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


def plot_losses(variants: dict[str, Any], dest: Path, inputs: tuple[Path, ...] = ()) -> Path | None:
    from deploykit.report.render import _figure, _save

    curves = {k: v["train"] for k, v in variants.items() if v.get("train") and v["train"].get("losses")}
    if not curves:
        return None
    fig, ax = _figure(6.5, 3.8)
    for name, tr in curves.items():
        steps = [tr["log_every"] * (i + 1) for i in range(len(tr["losses"]))]
        ax.plot(steps, tr["losses"], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, dest, inputs)


def study_section(report: dict[str, Any], out: Path, inputs: tuple[Path, ...]) -> list[str]:
    """report.md lines for a study: the comparison table, outlier and loss plots."""
    from deploykit.outliers import plot_outliers

    study = report["study"]
    header, rows = format_study_table(study["table"], study["presets"])
    metric = study["table"][0]["metric"] if study["table"] else ""
    md = [f"## Study: {study.get('title', 'variants compared')}", "",
          f"Metric: {metric} (reference: {study['reference']}; for top-1, 'agree' is the share of "
          "predictions equal to the variant's own FP32). ∞-norm: the maximum over layers of the "
          "per-sequence max |x| averaged over the evaluation set; kurtosis averaged over layers (FFN output and "
          "block output).", ""]
    md += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md.append("")
    if study.get("layer_latency"):
        md += layer_latency_lines(study["layer_latency"])
        plot_layer_latency(study["layer_latency"], out / LAYER_PLOT, inputs)
        md += [f"![One attention layer by sequence length]({LAYER_PLOT})", ""]
    plot_outliers({k: v["outliers"] for k, v in study["variants"].items()}, out / OUTLIER_PLOT, inputs)
    md += [f"![Outliers per layer]({OUTLIER_PLOT})", ""]
    if plot_losses(study["variants"], out / LOSS_PLOT, inputs):
        md += [f"![Training loss]({LOSS_PLOT})", ""]
    return md


__all__ = ["run_study", "study_table", "format_study_table", "study_section", "variant_options", "train_variant"]
