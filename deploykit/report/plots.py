"""The report's plots: PNGs drawn with object-oriented matplotlib (Agg, no global state, no
creation time or software tag in the files, so the same report draws the same bytes).

:func:`figure` and :func:`save` are the shared figure setup and atomic PNG writer, also used by
the plots of other modules (outliers, studies)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deploykit.io import atomic_path
from deploykit.report.formatting import format_ms, group_series, parity_rows
from deploykit.report.schema import is_number

LATENCY_PLOT = "latency_by_batch.png"
THROUGHPUT_PLOT = "throughput_by_batch.png"
COSINE_PLOT = "cosine_distribution.png"
TUNING_PLOT = "tuning_trials.png"
PARITY_PLOT = "parity_by_backend.png"
TARGETS_PLOT = "latency_by_target.png"


def figure(width: float = 7.0, height: float = 4.2, ncols: int = 1):
    """A constrained-layout figure of ``ncols`` axes side by side: ``(fig, axes)``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, axes


def save(fig, dest: Path, inputs: tuple[Path, ...]) -> Path:
    """Write ``fig`` as a PNG to ``dest`` atomically and return ``dest``; ``inputs`` are the files
    the caller read: writing onto one of them is refused."""
    with atomic_path(dest, inputs=inputs) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    return dest


def _series_styles(rows: list[dict]) -> dict[str, dict[str, Any]]:
    """Colour by variant, line style and marker by backend, so the two axes of variation read apart."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    colors = [f"C{i}" for i in range(10)]
    lines, markers = ["-", "--", ":", "-."], ["o", "s", "^", "D", "v"]
    return {r["series"]: {"color": colors[variants.index(r["variant"]) % 10],
                          "linestyle": lines[backends.index(r["backend"]) % 4],
                          "marker": markers[backends.index(r["backend"]) % 5]} for r in rows}


def _batch_axis(ax, batches: list[int]) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(batches))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(b) for b in batches])
    if len(batches) == 1:
        ax.set_xlim(batches[0] / 2, batches[0] * 2)
    ax.set_xlabel("batch size (log2 scale)")
    ax.grid(True, which="both", alpha=0.3)


def _plain_log_y(ax) -> None:
    """Log y axis labelled 1, 2, 5, 10, 20 … instead of 2×10¹."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.6g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    lo, hi = ax.get_ylim()
    if sum(lo <= t <= hi for t in ax.yaxis.get_majorticklocs()) < 2:  # narrow range: label every 1..9
        ax.yaxis.set_major_locator(LogLocator(base=10, subs="all"))


def plot_latency(rows: list[dict], dest: Path, inputs: tuple[Path, ...] = ()) -> Path:
    fig, ax = figure()
    styles = _series_styles(rows)
    for series, points in group_series(rows).items():
        x = [p["batch"] for p in points]
        style = styles[series]
        ax.fill_between(x, [p["p50_ms"] for p in points], [p["p99_ms"] for p in points],
                        color=style["color"], alpha=0.12, linewidth=0)
        ax.errorbar(x, [p["p50_ms"] for p in points],
                    yerr=[[0] * len(points), [max(p["p90_ms"] - p["p50_ms"], 0) for p in points]],
                    capsize=3, label=series, **style)
    _batch_axis(ax, sorted({r["batch"] for r in rows}))
    _plain_log_y(ax)
    ax.set_ylabel("latency per call, p50 (ms, log scale)")
    ax.set_title("Latency by batch size (whisker: p90, band: p50–p99)", fontsize=10)
    ax.legend(fontsize=8, title="variant@backend", title_fontsize=8)
    return save(fig, dest, inputs)


def plot_throughput(rows: list[dict], dest: Path, inputs: tuple[Path, ...] = ()) -> Path:
    fig, ax = figure()
    styles = _series_styles(rows)
    for series, points in group_series(rows).items():
        ax.plot([p["batch"] for p in points], [p["throughput_per_s"] for p in points], label=series,
                **styles[series])
    _batch_axis(ax, sorted({r["batch"] for r in rows}))
    if any(r["throughput_per_s"] > 0 for r in rows):
        _plain_log_y(ax)
    ax.set_ylabel("throughput (items/s, log scale)")
    ax.set_title("Throughput by batch size", fontsize=10)
    ax.legend(fontsize=8, title="variant@backend", title_fontsize=8)
    return save(fig, dest, inputs)


def plot_cosine(cosines: dict[str, list[float]], dest: Path, inputs: tuple[Path, ...] = ()) -> Path:
    """Histogram and ECDF of ``1 - cosine`` per variant on a log axis, mean marked."""
    import numpy as np

    gaps = {v: 1.0 - np.asarray(c, dtype=np.float64) for v, c in cosines.items()}
    positive = np.concatenate([g[g > 0] for g in gaps.values()] + [np.array([])])
    floor = max(float(positive.min()) / 2, 1e-15) if positive.size else 1e-9  # float64 resolution near 1
    top = max(float(positive.max()) * 2, floor * 10) if positive.size else 1e-8
    bins = np.logspace(np.log10(floor), np.log10(top), 50)
    fig, (hist, ecdf) = figure(width=10.0, height=4.2, ncols=2)
    for i, (variant, gap) in enumerate(gaps.items()):
        color = f"C{i % 10}"
        clipped = np.sort(np.clip(gap, floor, None))
        mean = max(float(gap.mean()), floor)
        label = f"{variant} (n={gap.size}, mean 1−cos {float(gap.mean()):.2e})"
        hist.hist(clipped, bins=bins, histtype="step", linewidth=1.5, color=color, label=label)
        ecdf.step(clipped, np.arange(1, clipped.size + 1) / clipped.size, where="post", color=color, label=variant)
        for ax in (hist, ecdf):
            ax.axvline(mean, color=color, linestyle="--", linewidth=1)
    from matplotlib.ticker import LogLocator, NullFormatter

    for ax in (hist, ecdf):
        ax.set_xscale("log")
        # Gaps span many decades (FP32 ~1e-13, INT8 ~1e-1): label decades only.
        ax.xaxis.set_major_locator(LogLocator(base=10, numticks=12))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"1 − cosine to reference (log scale; ≤{floor:.0e} shown at left edge)")
        ax.grid(True, which="major", alpha=0.3)
    hist.set_ylim(0, hist.get_ylim()[1] * 1.25)  # room for the legend above the peaks
    hist.set_ylabel("samples")
    hist.set_title("Per-sample cosine gap (dashed: mean)", fontsize=10)
    hist.legend(fontsize=8, loc="upper center")
    ecdf.set_ylabel("fraction of samples ≤ x")
    ecdf.set_ylim(0, 1.02)
    ecdf.set_title("ECDF of the cosine gap (left and high is better)", fontsize=10)
    ecdf.legend(fontsize=8, loc="lower right")
    return save(fig, dest, inputs)


def plot_tuning(tuning: dict, dest: Path, inputs: tuple[Path, ...] = ()) -> Path:
    """Each criterion's value per trial, threshold dashed, chosen trial circled; float nodes on a twin axis."""
    from deploykit.verify import parse_rule

    trials = tuning["trials"]
    criteria = tuning.get("criteria") or {}
    fig, ax = figure(width=8.0, height=4.2)
    x = [t["trial"] for t in trials]
    for i, (metric, rule) in enumerate(criteria.items()):
        color = f"C{i}"
        ax.plot(x, [t["metrics"].get(metric) for t in trials], "o-", color=color, markersize=4, label=metric)
        parsed = parse_rule(rule)
        if parsed:
            ax.axhline(parsed[1], color=color, linestyle="--", linewidth=1)
    chosen = tuning.get("chosen") or {}
    if chosen:
        for metric in criteria:
            value = chosen["metrics"].get(metric)
            if value is not None:
                ax.plot([chosen["trial"]], [value], "o", markersize=11, markerfacecolor="none", color="k")
    ax.set_xlabel("trial (grid: method x SmoothQuant alpha; then fallback of the worst nodes)")
    ax.set_ylabel("metric on the tuning split (dashed: target)")
    ax.grid(True, alpha=0.3)
    twin = ax.twinx()
    twin.bar(x, [t["float_node_count"] for t in trials], color="0.6", alpha=0.35, width=0.6)
    twin.set_ylabel("float nodes (bars)")
    ax.set_zorder(twin.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Accuracy-driven tuning (circled: chosen)", fontsize=10)
    return save(fig, dest, inputs)


def plot_parity(parity: dict, dest: Path, inputs: tuple[Path, ...] = ()) -> Path:
    """Left: ``1 - cosine_mean`` (log), right: SNR (dB), one bar per variant@backend, grouped by variant
    and coloured by backend; null values are left out."""
    from matplotlib.patches import Patch

    rows = parity_rows(parity)
    variants = list(dict.fromkeys(r[0] for r in rows))
    backends = list(dict.fromkeys(r[1] for r in rows))
    width = 0.8 / max(len(backends), 1)
    colors = {b: f"C{i % 10}" for i, b in enumerate(backends)}

    def x(variant: str, backend: str) -> float:
        return variants.index(variant) + (backends.index(backend) - (len(backends) - 1) / 2) * width

    fig, (gap_ax, snr_ax) = figure(width=11.0, height=4.4, ncols=2)
    gaps = [(v, b, 1.0 - m["cosine_mean"]) for v, b, m in rows if is_number(m.get("cosine_mean"))]
    positive = [g for _, _, g in gaps if g > 0]
    floor = max(min(positive) / 10, 1e-15) if positive else 1e-12  # exact matches (gap <= 0) drawn at the floor
    base = floor / 10
    for v, b, gap in gaps:
        bar = gap_ax.bar([x(v, b)], [max(gap, floor) - base], bottom=base, width=width * 0.9, color=colors[b])
        gap_ax.bar_label(bar, labels=[f"{gap:.1e}" if gap > 0 else "0"], fontsize=7, padding=2)
    snrs = [(v, b, m["snr_db"]) for v, b, m in rows if is_number(m.get("snr_db"))]
    for v, b, snr in snrs:
        bar = snr_ax.bar([x(v, b)], [snr], width=width * 0.9, color=colors[b])
        snr_ax.bar_label(bar, labels=[f"{snr:.1f}"], fontsize=7, padding=2)

    if gaps:
        gap_ax.set_yscale("log")
        gap_ax.set_ylim(base, max(max(positive, default=floor), floor) * 20)
    else:
        gap_ax.set_yticks([])
    if snrs:
        snr_ax.set_ylim(min(0.0, min(s for _, _, s in snrs) * 1.15), max(max(s for _, _, s in snrs) * 1.15, 1.0))
    else:
        snr_ax.set_yticks([])
    for ax, values, title, label in (
            (gap_ax, gaps, "1 − cosine_mean vs the reference (log scale; lower is better)",
             "1 − mean cosine (log scale)"),
            (snr_ax, snrs, "SNR vs the reference (higher is better)", "SNR (dB)")):
        ax.set_xticks(range(len(variants)), variants)
        ax.set_xlim(-0.6, len(variants) - 0.4)
        ax.set_xlabel("variant (bars: backend" + ("; 0: exact match, drawn at the bottom)" if ax is gap_ax and
                                                  any(g <= 0 for _, _, g in gaps) else ")"))
        ax.set_ylabel(label)
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", which="major", alpha=0.3)
        if not values:
            ax.text(0.5, 0.5, "no values", transform=ax.transAxes, ha="center", va="center", color="0.4")
        drawn = [b for b in backends if any(vb == b for _, vb, _ in values)]   # no legend entry without a bar
        if drawn:
            ax.legend(handles=[Patch(color=colors[b], label=b) for b in drawn], fontsize=8, title="backend",
                      title_fontsize=8, loc="upper left")
    return save(fig, dest, inputs)


def _target_rows(targets: dict) -> tuple[list[tuple[str, str, dict]], list[str]]:
    """Measured ``(target, variant, entry)`` with a p50, and the names of unmeasurable targets."""
    measured, unmeasurable = [], []
    for name, target in targets.items():
        if not target.get("measurable"):
            unmeasurable.append(name)
            continue
        for variant, entry in (target.get("latency") or {}).items():
            if is_number(entry.get("p50_ms")):
                measured.append((name, variant, entry))
    return measured, unmeasurable


def plot_targets(targets: dict, dest: Path, inputs: tuple[Path, ...] = ()) -> Path:
    """Horizontal bars of p50 per target and variant, p99 as a whisker; unmeasurable targets named."""
    from matplotlib.patches import Patch

    measured, unmeasurable = _target_rows(targets)
    variants = list(dict.fromkeys(v for _, v, _ in measured))
    colors = {v: f"C{i % 10}" for i, v in enumerate(variants)}
    fig, ax = figure(width=8.0, height=max(2.6, 1.4 + 0.38 * len(measured)))
    if measured:
        p50 = [e["p50_ms"] for _, _, e in measured]
        p99 = [e["p99_ms"] if is_number(e.get("p99_ms")) else e["p50_ms"] for _, _, e in measured]
        positive = [v for v in p50 if v > 0]
        log = bool(positive) and max(p99) / min(positive) > 30
        left = min(positive) / 2 if log else 0.0
        y = list(range(len(measured)))
        ax.barh(y, [max(v, left) - left for v in p50], left=left, height=0.6,
                color=[colors[v] for _, v, _ in measured])
        ax.errorbar([max(v, left) for v in p50], y, xerr=[[0] * len(y), [max(b - a, 0) for a, b in zip(p50, p99)]],
                    fmt="none", ecolor="k", elinewidth=1, capsize=3)
        for row, (a, b) in enumerate(zip(p50, p99)):  # after the whisker, so the two never overlap
            ax.annotate(f"p50 {format_ms(a)} / p99 {format_ms(b)} ms", (max(a, b, left), row), xytext=(5, 0),
                        textcoords="offset points", va="center", fontsize=7)
        ax.set_yticks(y, [f"{t} · {v}" for t, v, _ in measured])
        ax.invert_yaxis()
        if log:
            ax.set_xscale("log")
            ax.set_xlim(left, max(p99) * 8)
        else:
            ax.set_xlim(0, max(p99) * 1.6 or 1.0)
        ax.set_xlabel("latency per call, batch 1 (ms" + (", log scale)" if log else ")"))
        ax.grid(True, axis="x", which="major", alpha=0.3)
        ax.legend(handles=[Patch(color=colors[v], label=v) for v in variants], fontsize=8, title="variant",
                  title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no target measurable here", transform=ax.transAxes, ha="center", va="center",
                color="0.4")
    title = "Latency per target (bar: p50, whisker: p99)"
    if unmeasurable:
        title += "\nnot measurable here: " + ", ".join(unmeasurable)
    ax.set_title(title, fontsize=10)
    return save(fig, dest, inputs)


__all__ = ["figure", "save", "plot_latency", "plot_throughput", "plot_cosine", "plot_tuning", "plot_parity",
           "plot_targets", "LATENCY_PLOT", "THROUGHPUT_PLOT", "COSINE_PLOT", "TUNING_PLOT", "PARITY_PLOT",
           "TARGETS_PLOT"]
