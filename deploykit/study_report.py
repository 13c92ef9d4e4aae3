"""The study's part of report.md: its comparison table, compression and layer-latency tables,
and its plots. Registered with the report as the ``study`` section by :func:`register`, which
every path that saves a report calls (:func:`deploykit.context.save_report`), so a report that
holds a study renders the same from ``run``, a stage command or ``deploykit report``.

Below the study: it needs only the report's plot helpers and the outlier plot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deploykit.report.sections import register_section

OUTLIER_PLOT = "outliers.png"
LOSS_PLOT = "training_loss.png"
LAYER_PLOT = "attention_layer_latency.png"


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
    from deploykit.report.plots import figure, save

    fig, ax = figure(6.5, 4.0)
    for name, rows in layer["variants"].items():
        xs = [row["seq_len"] for row in rows.values()]
        ax.plot(xs, [row["p50_ms"] for row in rows.values()], marker="o", label=f"{name} ({layer['ops'][name]['kind']})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("one layer, p50 (ms, log scale)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return save(fig, dest, inputs)


def compression_lines(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []

    def f(v, spec):
        return "—" if v is None else format(v, spec)

    pct = rows[0]["metric"] == "top1"
    bmax = rows[0]["bmax"]
    md = ["### Compression", "",
          "Accuracy of the deployed ONNX model (binary weights as int8 ±1 + per-channel scales; "
          "the others FP32) and its change from the base; packed = 1 bit per binary weight + 4 bytes "
          "per other parameter; OPs = BOPs/64 + FLOPs (multiply-accumulates, one example); attention "
          "density = kept share of the attention probabilities; ORT CPU p50 latency.", "",
          f"| variant | {rows[0]['metric']} | Δ | parameters | packed KiB | ONNX KiB | MOPs (BOPs M / FLOPs M) | "
          f"linear sparsity (2:4 layers) | attention density | p50 b1 | p50 b{bmax} |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        value = f(None if r["value"] is None else (100 * r["value"] if pct else r["value"]), ".1f" if pct else ".4f")
        delta = f(None if r["delta"] is None else (100 * r["delta"] if pct else r["delta"]), "+.1f" if pct else "+.4f")
        md.append(f"| {r['variant']} | {value}{'%' if pct and r['value'] is not None else ''} | {delta} | "
                  f"{r['parameters']:,} | {r['packed_bytes'] / 1024:.1f} | {r['onnx_bytes'] / 1024:.1f} | "
                  f"{r['ops'] / 1e6:.2f} ({r['bops'] / 1e6:.2f} / {r['flops'] / 1e6:.2f}) | "
                  f"{100 * r['linear_sparsity']:.1f}% ({r['two_four_layers']}) | "
                  f"{f(None if r['attention_density'] is None else 100 * r['attention_density'], '.1f')}"
                  f"{'%' if r['attention_density'] is not None else ''} | "
                  f"{f(r['p50_ms_b1'], '.2f')} ms | {f(r['p50_ms_bmax'], '.2f')} ms |")
    return md + [""]


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


def plot_losses(variants: dict[str, Any], dest: Path, inputs: tuple[Path, ...] = ()) -> Path | None:
    from deploykit.report.plots import figure, save

    curves = {k: v["train"] for k, v in variants.items() if v.get("train") and v["train"].get("losses")}
    if not curves:
        return None
    fig, ax = figure(6.5, 3.8)
    for name, tr in curves.items():
        steps = [tr["log_every"] * (i + 1) for i in range(len(tr["losses"]))]
        ax.plot(steps, tr["losses"], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, dest, inputs)


def study_section(report: dict[str, Any], rendering: Any) -> list[str]:
    """report.md lines for a study: the comparison table, outlier and loss plots (registered on
    ``rendering``, a :class:`deploykit.report.rendering.Rendering`)."""
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
    md += compression_lines(study.get("compression_table") or [])
    if study.get("layer_latency"):
        md += layer_latency_lines(study["layer_latency"])
        layer = rendering.add(LAYER_PLOT, lambda dest: plot_layer_latency(study["layer_latency"], dest))
        md += [f"![One attention layer by sequence length]({layer})", ""]
    outliers = rendering.add(OUTLIER_PLOT, lambda dest: plot_outliers(
        {k: v["outliers"] for k, v in study["variants"].items()}, dest))
    md += [f"![Outliers per layer]({outliers})", ""]
    if any(v.get("train") and v["train"].get("losses") for v in study["variants"].values()):
        losses = rendering.add(LOSS_PLOT, lambda dest: plot_losses(study["variants"], dest))
        md += [f"![Training loss]({losses})", ""]
    return md


def register() -> None:
    """Register the study section with the report (idempotent: a key registers once)."""
    register_section("study", study_section, applies=lambda study: isinstance(study, dict) and bool(study.get("table")))
