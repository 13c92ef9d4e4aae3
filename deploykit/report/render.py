"""The report: check the report.json contract, merge stage results into it, render report.md and plots.

Contract (see DESIGN.md)::

    {"model": str, "recipe": str|null, "target": str,
     "artifacts":   {name: path},
     "accuracy":    {variant: {metric: float|null}},
     "latency":     {"<variant>@<backend>/b<batch>": {"batch", "p50_ms", "p90_ms", "p99_ms", "throughput_per_s"}},
     "environment": {"python": str, "torch", "onnxruntime", "cpu", "gpu": str|null, ...}}

plus optional ``created``, ``deploykit_version``, ``data``, ``export``, ``calibration``,
``distributions`` ({variant: {"cosine": [...]}}), ``acceptance``, ``timings_s``, ``bench``,
``notes``, and the deployment sections::

    "parity":       {"<variant>@<backend>": {metric: float|null, "samples": int|null}},
    "verification": {"inputs", "inputs_sha256", "reference": str, "backends_run": [str],
                     "backends_skipped": {backend: reason}, "checks": [acceptance-like rows],
                     "localization": {"<variant>@<backend>": {"nodes": [{"node", "op_type", "module",
                                      "added_snr_db", "added_cosine", "accumulated_snr_db",
                                      "accumulated_cosine"}], "exclude": [str]}}},
    "targets":      {target: {"runtime": str, "measurable": bool, "reason": str|null, "threads",
                              "machine_cores", "memory_budget_mib", "notes": [str],
                              "latency": {variant: {"p50_ms", "p99_ms", "peak_rss_mib",
                                                    "within_memory_budget": bool|null, ...}}}},
    "bundles":      {target: {"path": str, "sha256": str, "size_bytes": int, "files": int}}

Unknown extra fields are allowed and kept.

Rendering writes ``report.md`` and PNG plots (Agg, object-oriented matplotlib: no global
state, no creation time or software tag in the PNGs) next to the report or into ``out_dir``,
all in one group of atomic renames; it never writes onto report.json. The rendered files
follow the report's name: ``report.json`` gives ``report.md`` and ``latency_by_batch.png`` …,
any other ``X.json`` gives ``X.md`` and ``X-latency_by_batch.png`` …, so two reports in one
folder never write over each other's files.
"""

from __future__ import annotations

import copy
import math
import re
import shlex
from pathlib import Path
from typing import Any, Callable

from deploykit.errors import UserError
from deploykit.io import atomic_path, atomic_paths, read_json, write_json

LATENCY_KEY = re.compile(r"^(?P<variant>[^@/]+)@(?P<backend>[^@/]+)/b(?P<batch>[1-9][0-9]*)$")
LATENCY_FIELDS = ("batch", "p50_ms", "p90_ms", "p99_ms", "throughput_per_s")
PARITY_KEY = re.compile(r"^(?P<variant>[^@/]+)@(?P<backend>[^@/]+)$")
DICT_SECTIONS = ("artifacts", "accuracy", "latency", "environment", "distributions", "timings_s", "data",
                 "export", "calibration", "bench", "parity", "verification", "targets", "bundles")
LIST_SECTIONS = ("acceptance", "notes")
ENVIRONMENT_KEYS = ("python", "torch", "onnxruntime", "cpu", "gpu")

LATENCY_PLOT = "latency_by_batch.png"
THROUGHPUT_PLOT = "throughput_by_batch.png"
COSINE_PLOT = "cosine_distribution.png"
TUNING_PLOT = "tuning_trials.png"
PARITY_PLOT = "parity_by_backend.png"
TARGETS_PLOT = "latency_by_target.png"
LOCALIZATION_ROWS = 10
DEFAULT_REPORT_STEM = "report"   # report.json renders report.md and unprefixed plot names
_FIX = "regenerate the report with deploykit or correct the field in report.json"


# ----------------------------------------------------------------------------- validation
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_report(data: dict, *, path: str | Path | None = None) -> None:
    """Check ``data`` against the report contract; raise :class:`UserError` naming the first problem."""

    def fail(where: str, problem: str) -> None:
        raise UserError(f"report field {where} {problem}", path=path, fix=_FIX)

    def need_dict(value: Any, where: str) -> dict:
        if not isinstance(value, dict):
            fail(where, f"must be an object, got {type(value).__name__}")
        return value

    if not isinstance(data, dict):
        raise UserError(f"a report must be a JSON object, got {type(data).__name__}", path=path, fix=_FIX)
    for key in ("model", "recipe", "target", "artifacts", "accuracy", "latency", "environment"):
        if key not in data:
            fail(f"'{key}'", "is missing")
    for key in ("model", "target"):
        if not isinstance(data[key], str):
            fail(f"'{key}'", f"must be a string, got {type(data[key]).__name__}")
    if data["recipe"] is not None and not isinstance(data["recipe"], str):
        fail("'recipe'", f"must be a string or null, got {type(data['recipe']).__name__}")
    for key in ("created", "deploykit_version"):
        if key in data and data[key] is not None and not isinstance(data[key], str):
            fail(f"'{key}'", f"must be a string, got {type(data[key]).__name__}")

    for name, value in need_dict(data["artifacts"], "'artifacts'").items():
        if not isinstance(value, str):
            fail(f"artifacts['{name}']", f"must be a path string, got {type(value).__name__}")

    for variant, metrics in need_dict(data["accuracy"], "'accuracy'").items():
        for metric, value in need_dict(metrics, f"accuracy['{variant}']").items():
            if value is not None and not _is_number(value):
                fail(f"accuracy['{variant}']['{metric}']", f"must be a finite number or null, got {value!r}")

    for key, entry in need_dict(data["latency"], "'latency'").items():
        where = f"latency['{key}']"
        match = LATENCY_KEY.match(key)
        if not match:
            fail(where, "has a bad key: use '<variant>@<backend>/b<batch>', e.g. 'int8@ort-cpu/b8'")
        need_dict(entry, where)
        for name in LATENCY_FIELDS:
            if name not in entry:
                fail(where, f"is missing '{name}'")
        batch = entry["batch"]
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            fail(f"{where}['batch']", f"must be a positive integer, got {batch!r}")
        if batch != int(match["batch"]):
            fail(where, f"has batch {batch} but its key says b{match['batch']}")
        for name in LATENCY_FIELDS[1:]:
            if not _is_number(entry[name]) or entry[name] < 0:
                fail(f"{where}['{name}']", f"must be a non-negative finite number, got {entry[name]!r}")

    env = need_dict(data["environment"], "'environment'")
    for key in ENVIRONMENT_KEYS:
        if key not in env:
            fail(f"environment['{key}']", "is missing")
        if not (isinstance(env[key], str) or (env[key] is None and key != "python")):
            fail(f"environment['{key}']", f"must be a string{'' if key == 'python' else ' or null'}, "
                                          f"got {type(env[key]).__name__}")

    for key in ("data", "export", "calibration", "bench", "timings_s", "distributions", "study", "training"):
        if key in data:
            need_dict(data[key], f"'{key}'")
    for stage, seconds in data.get("timings_s", {}).items():
        if not _is_number(seconds):
            fail(f"timings_s['{stage}']", f"must be a finite number, got {seconds!r}")
    for variant, dist in data.get("distributions", {}).items():
        for name, values in need_dict(dist, f"distributions['{variant}']").items():
            if not isinstance(values, list) or not all(_is_number(v) for v in values):
                fail(f"distributions['{variant}']['{name}']", "must be a list of finite numbers")

    def check_rows(rows: Any, where: str, prefix: str) -> None:
        """Acceptance-like rows ``{"check", "value", "threshold", "passed"}``."""
        if not isinstance(rows, list):
            fail(where, f"must be a list, got {type(rows).__name__}")
        for i, row in enumerate(rows):
            at = f"{prefix}[{i}]"
            need_dict(row, at)
            for key, ok in (("check", lambda v: isinstance(v, str)), ("threshold", lambda v: isinstance(v, str)),
                            ("passed", lambda v: isinstance(v, bool)),
                            ("value", lambda v: v is None or _is_number(v))):
                if key not in row:
                    fail(at, f"is missing '{key}'")
                if not ok(row[key]):
                    fail(f"{at}['{key}']", f"has the wrong type or value: {row[key]!r}")

    if "acceptance" in data:
        check_rows(data["acceptance"], "'acceptance'", "acceptance")
    if "notes" in data and not (isinstance(data["notes"], list) and all(isinstance(n, str) for n in data["notes"])):
        fail("'notes'", "must be a list of strings")
    _validate_deployment(data, fail, need_dict, check_rows)


def _validate_deployment(data: dict, fail, need_dict, check_rows) -> None:
    """The optional ``parity``, ``verification``, ``targets`` and ``bundles`` sections."""

    def optional(entry: dict, key: str, where: str, ok, expected: str) -> None:
        if key in entry and not ok(entry[key]):
            fail(f"{where}['{key}']", f"must be {expected}, got {entry[key]!r}")

    def is_str(v: Any) -> bool:
        return isinstance(v, str)

    def str_or_null(v: Any) -> bool:
        return v is None or isinstance(v, str)

    def count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    def count_or_null(v: Any) -> bool:
        return v is None or count(v)

    def positive_or_null(v: Any) -> bool:
        return v is None or (count(v) and v > 0)

    def amount_or_null(v: Any) -> bool:
        return v is None or (_is_number(v) and v >= 0)

    def number_or_null(v: Any) -> bool:
        return v is None or _is_number(v)

    def str_list(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(x, str) for x in v)

    def bool_or_null(v: Any) -> bool:
        return v is None or isinstance(v, bool)

    def pair_key(key: str, where: str) -> None:
        if not PARITY_KEY.match(key):
            fail(where, "has a bad key: use '<variant>@<backend>', e.g. 'int8@ort-cpu'")

    if "parity" in data:
        for key, metrics in need_dict(data["parity"], "'parity'").items():
            where = f"parity['{key}']"
            pair_key(key, where)
            for metric, value in need_dict(metrics, where).items():
                if metric == "samples":
                    optional(metrics, metric, where, count_or_null, "a non-negative integer or null")
                elif not number_or_null(value):
                    fail(f"{where}['{metric}']", f"must be a finite number or null, got {value!r}")

    if "verification" in data:
        ver = need_dict(data["verification"], "'verification'")
        for key in ("inputs", "inputs_sha256", "reference"):
            optional(ver, key, "verification", str_or_null, "a string or null")
        optional(ver, "backends_run", "verification", str_list, "a list of strings")
        if "backends_skipped" in ver:
            for backend, reason in need_dict(ver["backends_skipped"], "verification['backends_skipped']").items():
                if not isinstance(reason, str):
                    fail(f"verification['backends_skipped']['{backend}']", f"must be a reason string, got {reason!r}")
        if "checks" in ver:
            check_rows(ver["checks"], "verification['checks']", "verification['checks']")
        if "localization" in ver:
            for key, loc in need_dict(ver["localization"], "verification['localization']").items():
                where = f"verification['localization']['{key}']"
                pair_key(key, where)
                need_dict(loc, where)
                optional(loc, "exclude", where, str_list, "a list of node names")
                if "nodes" in loc:
                    if not isinstance(loc["nodes"], list):
                        fail(f"{where}['nodes']", f"must be a list, got {type(loc['nodes']).__name__}")
                    for i, node in enumerate(loc["nodes"]):
                        at = f"{where}['nodes'][{i}]"
                        need_dict(node, at)
                        if not isinstance(node.get("node"), str):
                            fail(f"{at}['node']", f"must be a node name string, got {node.get('node')!r}")
                        for name in ("op_type", "module"):
                            optional(node, name, at, str_or_null, "a string or null")
                        for name in ("added_snr_db", "added_cosine", "accumulated_snr_db", "accumulated_cosine"):
                            optional(node, name, at, number_or_null, "a finite number or null")

    if "targets" in data:
        for name, target in need_dict(data["targets"], "'targets'").items():
            where = f"targets['{name}']"
            need_dict(target, where)
            for key in ("runtime", "measurable"):
                if key not in target:
                    fail(where, f"is missing '{key}'")
            optional(target, "measurable", where, lambda v: isinstance(v, bool), "true or false")
            optional(target, "target", where, is_str, "a string")
            optional(target, "runtime", where, is_str, "a string")
            optional(target, "reason", where, str_or_null, "a string or null")
            optional(target, "threads", where, positive_or_null, "a positive integer or null")
            optional(target, "machine_cores", where, positive_or_null, "a positive integer or null")
            optional(target, "memory_budget_mib", where, amount_or_null, "a non-negative finite number or null")
            optional(target, "notes", where, str_list, "a list of strings")
            latency = target.get("latency")
            for variant, entry in ({} if latency is None else need_dict(latency, f"{where}['latency']")).items():
                at = f"{where}['latency']['{variant}']"
                need_dict(entry, at)
                if "p50_ms" not in entry:
                    fail(at, "is missing 'p50_ms'")
                for key in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "throughput_per_s", "peak_rss_mib",
                            "model_rss_mib"):
                    optional(entry, key, at, amount_or_null, "a non-negative finite number or null")
                for key in ("batch", "threads"):
                    optional(entry, key, at, positive_or_null, "a positive integer or null")
                optional(entry, "iterations", at, count_or_null, "a non-negative integer or null")
                optional(entry, "within_memory_budget", at, bool_or_null, "true, false or null")

    if "bundles" in data:
        for name, bundle in need_dict(data["bundles"], "'bundles'").items():
            where = f"bundles['{name}']"
            need_dict(bundle, where)
            if "path" not in bundle:
                fail(where, "is missing 'path'")
            optional(bundle, "path", where, is_str, "a path string")
            optional(bundle, "sha256", where, str_or_null, "a string or null")
            for key in ("size_bytes", "files"):
                optional(bundle, key, where, count_or_null, "a non-negative integer or null")


# ----------------------------------------------------------------------------- merge
def merge_report(existing: dict | None, update: dict) -> dict:
    """Return ``existing`` updated by a stage's partial report ``update``; neither input is changed.

    Dict sections merge key by key (update wins; ``accuracy`` merges each variant's metrics; a
    ``parity`` / ``targets`` / ``bundles`` entry of the update replaces the same-named one whole),
    lists (``acceptance``, ``notes``) and scalars are replaced.
    """
    merged = copy.deepcopy(existing) if existing else {}
    for key, value in copy.deepcopy(update).items():
        old = merged.get(key)
        if key in DICT_SECTIONS and isinstance(old, dict) and isinstance(value, dict):
            if key == "accuracy":
                for variant, metrics in value.items():
                    if isinstance(old.get(variant), dict) and isinstance(metrics, dict):
                        old[variant].update(metrics)
                    else:
                        old[variant] = metrics
            else:
                old.update(value)
        else:
            merged[key] = value
    return merged


# ----------------------------------------------------------------------------- formatting
def format_number(value: Any, metric: str = "") -> str:
    """A readable cell: cosines with 6 decimals, tiny or huge numbers in scientific notation."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _cell(value)
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    name = metric.lower()
    if value == 0:
        return "0"
    if "diff" in name or "err" in name or abs(value) < 1e-3 or abs(value) >= 1e6:
        return f"{value:.3e}"
    if "cos" in name:
        return f"{value:.6f}"
    if abs(value) <= 1:
        return f"{value:.4f}"
    return f"{value:.6g}"


def _ms(value: float) -> str:
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.1f}"


def _per_s(value: float) -> str:
    return f"{value:,.1f}" if value < 1000 else f"{value:,.0f}"


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return format_number(value)
    if isinstance(value, list):
        shown = ", ".join(_cell(v) for v in value[:6])
        return f"{len(value)} items: {shown}, …" if len(value) > 6 else (shown or "(none)")
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items()) or "(none)"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _flatten(data: dict, prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows.extend(_flatten(value, name + "."))
        elif name.endswith("sha256") and isinstance(value, str) and len(value) > 16:
            rows.append((name, value[:16] + "…"))
        else:
            rows.append((name, value))
    return rows


def _table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> list[str]:
    align = align or ["l"] + ["r"] * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(line) + " |" for line in (header, rule, *rows)]


def _kv_table(data: dict) -> list[str]:
    return _table(["key", "value"], [[f"`{k}`", _cell(v)] for k, v in _flatten(data)], ["l", "l"])


def format_latency_table(report: dict) -> list[dict]:
    """Latency entries as rows ``{"series": "variant@backend", "variant", "backend", "batch", ...}``.

    Series keep their first-seen order; each series' rows are sorted by batch.
    """
    rows: list[dict] = []
    order: dict[str, int] = {}
    for key, entry in report.get("latency", {}).items():
        match = LATENCY_KEY.match(key)
        series = f"{match['variant']}@{match['backend']}"
        order.setdefault(series, len(order))
        rows.append({"series": series, "variant": match["variant"], "backend": match["backend"],
                     **{k: entry[k] for k in LATENCY_FIELDS}})
    return sorted(rows, key=lambda r: (order[r["series"]], r["batch"]))


def _group(rows: list[dict]) -> dict[str, list[dict]]:
    series: dict[str, list[dict]] = {}
    for row in rows:
        series.setdefault(row["series"], []).append(row)
    return series


# ----------------------------------------------------------------------------- plots
def _figure(width: float = 7.0, height: float = 4.2, ncols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, axes


def _save(fig, dest: Path, inputs: tuple[Path, ...]) -> Path:
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
    fig, ax = _figure()
    styles = _series_styles(rows)
    for series, points in _group(rows).items():
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
    return _save(fig, dest, inputs)


def plot_throughput(rows: list[dict], dest: Path, inputs: tuple[Path, ...] = ()) -> Path:
    fig, ax = _figure()
    styles = _series_styles(rows)
    for series, points in _group(rows).items():
        ax.plot([p["batch"] for p in points], [p["throughput_per_s"] for p in points], label=series,
                **styles[series])
    _batch_axis(ax, sorted({r["batch"] for r in rows}))
    if any(r["throughput_per_s"] > 0 for r in rows):
        _plain_log_y(ax)
    ax.set_ylabel("throughput (items/s, log scale)")
    ax.set_title("Throughput by batch size", fontsize=10)
    ax.legend(fontsize=8, title="variant@backend", title_fontsize=8)
    return _save(fig, dest, inputs)


def plot_cosine(cosines: dict[str, list[float]], dest: Path, inputs: tuple[Path, ...] = ()) -> Path:
    """Histogram and ECDF of ``1 - cosine`` per variant on a log axis, mean marked."""
    import numpy as np

    gaps = {v: 1.0 - np.asarray(c, dtype=np.float64) for v, c in cosines.items()}
    positive = np.concatenate([g[g > 0] for g in gaps.values()] + [np.array([])])
    floor = max(float(positive.min()) / 2, 1e-15) if positive.size else 1e-9  # float64 resolution near 1
    top = max(float(positive.max()) * 2, floor * 10) if positive.size else 1e-8
    bins = np.logspace(np.log10(floor), np.log10(top), 50)
    fig, (hist, ecdf) = _figure(width=10.0, height=4.2, ncols=2)
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
    return _save(fig, dest, inputs)


# ----------------------------------------------------------------------------- markdown
def plot_tuning(tuning: dict, dest: Path, inputs: tuple[Path, ...] = ()) -> Path:
    """Each criterion's value per trial, threshold dashed, chosen trial circled; float nodes on a twin axis."""
    from deploykit.verify import parse_rule

    trials = tuning["trials"]
    criteria = tuning.get("criteria") or {}
    fig, ax = _figure(width=8.0, height=4.2)
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
    return _save(fig, dest, inputs)


def _parity_rows(parity: dict) -> list[tuple[str, str, dict]]:
    """``(variant, backend, metrics)`` grouped by variant (first-seen order), backends in first-seen order."""
    rows = [(m["variant"], m["backend"], metrics) for key, metrics in parity.items()
            if (m := PARITY_KEY.match(key))]
    variants = list(dict.fromkeys(r[0] for r in rows))
    return sorted(rows, key=lambda r: variants.index(r[0]))


def plot_parity(parity: dict, dest: Path, inputs: tuple[Path, ...] = ()) -> Path:
    """Left: ``1 - cosine_mean`` (log), right: SNR (dB), one bar per variant@backend, grouped by variant
    and coloured by backend; null values are left out."""
    from matplotlib.patches import Patch

    rows = _parity_rows(parity)
    variants = list(dict.fromkeys(r[0] for r in rows))
    backends = list(dict.fromkeys(r[1] for r in rows))
    width = 0.8 / max(len(backends), 1)
    colors = {b: f"C{i % 10}" for i, b in enumerate(backends)}

    def x(variant: str, backend: str) -> float:
        return variants.index(variant) + (backends.index(backend) - (len(backends) - 1) / 2) * width

    fig, (gap_ax, snr_ax) = _figure(width=11.0, height=4.4, ncols=2)
    gaps = [(v, b, 1.0 - m["cosine_mean"]) for v, b, m in rows if _is_number(m.get("cosine_mean"))]
    positive = [g for _, _, g in gaps if g > 0]
    floor = max(min(positive) / 10, 1e-15) if positive else 1e-12  # exact matches (gap <= 0) drawn at the floor
    base = floor / 10
    for v, b, gap in gaps:
        bar = gap_ax.bar([x(v, b)], [max(gap, floor) - base], bottom=base, width=width * 0.9, color=colors[b])
        gap_ax.bar_label(bar, labels=[f"{gap:.1e}" if gap > 0 else "0"], fontsize=7, padding=2)
    snrs = [(v, b, m["snr_db"]) for v, b, m in rows if _is_number(m.get("snr_db"))]
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
    handles = [Patch(color=colors[b], label=b) for b in backends]
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
        ax.legend(handles=handles, fontsize=8, title="backend", title_fontsize=8, loc="upper left")
    return _save(fig, dest, inputs)


def _target_rows(targets: dict) -> tuple[list[tuple[str, str, dict]], list[str]]:
    """Measured ``(target, variant, entry)`` with a p50, and the names of unmeasurable targets."""
    measured, unmeasurable = [], []
    for name, target in targets.items():
        if not target.get("measurable"):
            unmeasurable.append(name)
            continue
        for variant, entry in (target.get("latency") or {}).items():
            if _is_number(entry.get("p50_ms")):
                measured.append((name, variant, entry))
    return measured, unmeasurable


def plot_targets(targets: dict, dest: Path, inputs: tuple[Path, ...] = ()) -> Path:
    """Horizontal bars of p50 per target and variant, p99 as a whisker; unmeasurable targets named."""
    from matplotlib.patches import Patch

    measured, unmeasurable = _target_rows(targets)
    variants = list(dict.fromkeys(v for _, v, _ in measured))
    colors = {v: f"C{i % 10}" for i, v in enumerate(variants)}
    fig, ax = _figure(width=8.0, height=max(2.6, 1.4 + 0.38 * len(measured)))
    if measured:
        p50 = [e["p50_ms"] for _, _, e in measured]
        p99 = [e["p99_ms"] if _is_number(e.get("p99_ms")) else e["p50_ms"] for _, _, e in measured]
        positive = [v for v in p50 if v > 0]
        log = bool(positive) and max(p99) / min(positive) > 30
        left = min(positive) / 2 if log else 0.0
        y = list(range(len(measured)))
        ax.barh(y, [max(v, left) - left for v in p50], left=left, height=0.6,
                color=[colors[v] for _, v, _ in measured])
        ax.errorbar([max(v, left) for v in p50], y, xerr=[[0] * len(y), [max(b - a, 0) for a, b in zip(p50, p99)]],
                    fmt="none", ecolor="k", elinewidth=1, capsize=3)
        for row, (a, b) in enumerate(zip(p50, p99)):  # after the whisker, so the two never overlap
            ax.annotate(f"p50 {_ms(a)} / p99 {_ms(b)} ms", (max(a, b, left), row), xytext=(5, 0),
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
    return _save(fig, dest, inputs)


def _tuning_section(tuning: dict, plot: str = TUNING_PLOT) -> list[str]:
    chosen = tuning.get("chosen") or {}
    criteria = tuning.get("criteria") or {}
    head = (f"Criteria {', '.join(f'`{k} {v}`' for k, v in criteria.items())} on the tuning split "
            f"({(tuning.get('tuning_data') or {}).get('count', '?')} samples, disjoint from calibration and "
            f"evaluation): **{'met' if tuning.get('met') else 'NOT met'}** after {tuning.get('trials_run')} of "
            f"{tuning.get('budget')} trials ({tuning.get('seconds', 0):.0f} s). Chosen: trial {chosen.get('trial')}, "
            f"SmoothQuant alpha {chosen.get('alpha')}, {chosen.get('method')}"
            + (f" {chosen.get('percentile')}" if chosen.get("percentile") is not None else "")
            + f", {chosen.get('float_node_count', 0)} nodes in float.")
    metrics = list(criteria) or sorted({m for t in tuning["trials"] for m in t["metrics"]})
    rows = [[str(t["trial"]), t["phase"], _cell(t["alpha"]), t["method"] + (f" {t['percentile']}" if t["percentile"]
            is not None else ""), str(t["float_node_count"]), *(format_number(t["metrics"].get(m), m) for m in metrics),
             "✅" if t["passed"] else ""] for t in tuning["trials"]]
    table = _table(["trial", "phase", "alpha", "method", "float nodes", *metrics, "pass"], rows)
    out = ["## Tuning", "", head, "", f"![Tuning trials]({plot})", "", *table]
    ranking = tuning.get("ranking") or []
    if ranking:
        out += ["", "Worst nodes by the error each adds alone (fallback order):", "",
                *_table(["node", "torch module", "added SNR (dB)"],
                        [[f"`{r['node']}`", f"`{r['module']}`", f"{r['added_snr_db']:.1f}"] for r in ranking[:15]])]
    return out


def _accuracy_section(accuracy: dict) -> list[str]:
    metrics = list(dict.fromkeys(m for values in accuracy.values() for m in values))
    rows = [[f"`{variant}`", *(format_number(values.get(m), m) for m in metrics)]
            for variant, values in accuracy.items()]
    return ["## Accuracy", "", *_table(["variant", *metrics], rows)]


def _checks_table(checks: list[dict]) -> list[str]:
    rows = [[f"`{a['check']}`", format_number(a["value"], a["check"]), _cell(a["threshold"]),
             "✅ PASS" if a["passed"] else "❌ FAIL"] for a in checks]
    return _table(["check", "value", "threshold", "result"], rows, ["l", "r", "l", "l"])


def _acceptance_section(acceptance: list[dict]) -> list[str]:
    return ["## Acceptance", "", *_checks_table(acceptance)]


def _latency_section(rows: list[dict], latency_plot: str = LATENCY_PLOT,
                     throughput_plot: str = THROUGHPUT_PLOT) -> list[str]:
    batches = sorted({r["batch"] for r in rows})
    header = ["variant@backend"]
    for b in batches:
        header += [f"b{b} p50 / p90 / p99 ms", f"b{b} items/s"]
    table = []
    for series, points in _group(rows).items():
        by_batch = {p["batch"]: p for p in points}
        line = [f"`{series}`"]
        for b in batches:
            p = by_batch.get(b)
            line += ([f"{_ms(p['p50_ms'])} / {_ms(p['p90_ms'])} / {_ms(p['p99_ms'])}", _per_s(p["throughput_per_s"])]
                     if p else ["—", "—"])
        table.append(line)
    return ["## Latency", "", "Wall time of one call (host to host); throughput in items per second.", "",
            *_table(header, table), "", f"![Latency by batch size]({latency_plot})", "",
            f"![Throughput by batch size]({throughput_plot})"]


def _db(value: Any) -> str:
    return f"{value:.1f}" if _is_number(value) else "—"


def _size(size: Any) -> str:
    if not _is_number(size):
        return "—"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _exclude_command(report: dict, exclude: list[str]) -> str:
    model = report["artifacts"].get("fp32") or report["artifacts"].get("fp32.onnx") or "model.onnx"
    words = ["deploykit", "calibrate", model]
    if report.get("recipe"):
        words += ["--recipe", report["recipe"]]
    for node in exclude:
        words += ["--exclude", node]
    return " ".join(shlex.quote(w) for w in words)


def _parity_section(report: dict, plot: str | None) -> list[str]:
    parity = report.get("parity") or {}
    ver = report.get("verification") or {}
    source = ""
    if ver.get("inputs"):
        digest = f", sha256 `{ver['inputs_sha256'][:16]}…`" if ver.get("inputs_sha256") else ""
        source = f" (`{_cell(ver['inputs'])}`{digest})"
    intro = (f"Each variant run on each backend on the same saved inputs{source}, compared with "
             f"{_cell(ver.get('reference') or 'torch FP32')}.")
    out = ["## Accuracy per backend", "", intro, ""]
    rows = _parity_rows(parity)
    if rows:
        metrics = list(dict.fromkeys(m for _, _, values in rows for m in values))
        if "samples" in metrics:
            metrics = [m for m in metrics if m != "samples"] + ["samples"]
        out += [*_table(["variant@backend", *metrics],
                        [[f"`{v}@{b}`", *(format_number(values.get(m), m) for m in metrics)] for v, b, values in rows]),
                ""]
    if ver.get("backends_run"):
        out += ["Backends run: " + ", ".join(f"`{b}`" for b in ver["backends_run"]) + ".", ""]
    if "backends_skipped" in ver:
        skipped = ver["backends_skipped"]
        out += ["Backends skipped: " + ("; ".join(f"`{b}` ({_cell(r)})" for b, r in skipped.items()) if skipped
                                         else "none") + ".", ""]
    if plot:
        out += [f"![Parity by backend]({plot})", ""]
    checks = ver.get("checks") or []
    if checks:
        failed = [c["check"] for c in checks if not c["passed"]]
        out += ["### Parity checks", "",
                f"{len(checks) - len(failed)} of {len(checks)} checks passed"
                + (f"; failed: {', '.join(failed)}." if failed else "."), ""]
    if checks and checks == report.get("acceptance"):  # deploykit verify writes them as the acceptance too
        out += ["They are the checks of the Acceptance table above.", ""]
    elif checks:
        out += [*_checks_table(checks), ""]
    for key, loc in (ver.get("localization") or {}).items():
        nodes = sorted(loc.get("nodes") or [], key=lambda n: (not _is_number(n.get("added_snr_db")),
                                                              n.get("added_snr_db") or 0.0))  # worst (lowest) first
        out += [f"### Error localization: `{key}`", ""]
        if nodes:
            shown = nodes[:LOCALIZATION_ROWS]
            on = f" on {loc['samples']} samples" if isinstance(loc.get("samples"), int) else ""
            out += [f"Worst {len(shown)} of {len(nodes)} nodes by the error each adds{on}; accumulated: the error "
                    "of the model up to and including the node.", "",
                    *_table(["node", "op type", "torch module", "added SNR (dB)", "added cosine",
                             "accumulated SNR (dB)", "accumulated cosine"],
                            [[f"`{_cell(n['node'])}`", _cell(n.get("op_type")),
                              f"`{_cell(n['module'])}`" if n.get("module") else "—",
                              _db(n.get("added_snr_db")), format_number(n.get("added_cosine"), "cosine"),
                              _db(n.get("accumulated_snr_db")), format_number(n.get("accumulated_cosine"), "cosine")]
                             for n in shown], ["l", "l", "l", "r", "r", "r", "r"]), ""]
        if isinstance(loc.get("note"), str):
            out += [_cell(loc["note"]), ""]
        exclude = loc.get("exclude")
        if exclude:
            out += ["Suggested nodes to keep in float:", "", "```sh", _exclude_command(report, exclude), "```", ""]
        elif exclude is not None:
            out += ["No nodes suggested to keep in float.", ""]
    return out[:-1] if out[-1] == "" else out


def _targets_section(targets: dict, plot: str | None) -> list[str]:
    rows = []
    for name, target in targets.items():
        runtime = f"`{_cell(target.get('runtime'))}`"
        if not target.get("measurable"):
            reason = _cell(target.get("reason") or "no reason given")
            why = reason if "not measurable here" in str(reason) else f"not measurable here: {reason}"
            rows.append([f"`{name}`", runtime, why, "—", "—", "—", "—", "—"])
            continue
        latency = target.get("latency") or {}
        if not latency:
            rows.append([f"`{name}`", runtime, "no latency measured", _cell(target.get("threads")),
                         "—", "—", "—", "—"])
        budget = target.get("memory_budget_mib")
        for variant, e in latency.items():
            threads = e.get("threads") if e.get("threads") is not None else target.get("threads")
            peak = e.get("peak_rss_mib")
            memory = (f"{peak:.1f}" if _is_number(peak) else "—") + " / " + (f"{budget:.0f}" if _is_number(budget)
                                                                              else "—")
            within = e.get("within_memory_budget")
            rows.append([f"`{name}`", runtime, f"`{variant}`", _cell(threads),
                         _ms(e["p50_ms"]) if _is_number(e.get("p50_ms")) else "—",
                         _ms(e["p99_ms"]) if _is_number(e.get("p99_ms")) else "—", memory,
                         "—" if within is None else "✅" if within else "❌"])
    out = ["## Targets", "", "Batch-1 latency per deployment target, with the runtime and threads it would use; "
           "peak RSS of the whole process against the target's memory budget.", "",
           *_table(["target", "runtime", "variant", "threads", "p50 ms", "p99 ms", "peak RSS / budget MiB",
                    "within budget"], rows, ["l", "l", "l", "r", "r", "r", "r", "l"])]
    bullets = [f"- `{name}`: {_cell(note)}" for name, target in targets.items() for note in target.get("notes") or []]
    cores = {name: target["machine_cores"] for name, target in targets.items() if target.get("machine_cores")}
    if len(set(cores.values())) == 1:
        bullets.insert(0, f"- measured on a machine with {next(iter(cores.values()))} cores")
    elif cores:
        bullets.insert(0, "- cores of the machine measured on: " + ", ".join(f"`{n}` {c}" for n, c in cores.items()))
    if bullets:
        out += ["", *bullets]
    if plot:
        out += ["", f"![Latency by target]({plot})"]
    return out


def target_backend(target: dict) -> str:
    """The verify backend a target's runtime corresponds to (ORT targets here are CPUs)."""
    return "tensorrt" if str(target.get("runtime", "")).startswith("tensorrt") else "ort-cpu"


def _target_accuracy_section(targets: dict, parity: dict, checks: list[dict]) -> list[str]:
    """Each target's accuracy: its runtime's parity entries, or why there are none."""
    rows = []
    for name, target in targets.items():
        backend = target_backend(target)
        found = {k: v for k, v in parity.items() if k.endswith(f"@{backend}") and isinstance(v, dict)}
        if not found:
            rows.append([f"`{name}`", f"`{backend}`", f"not verified here ({backend} did not run)", "—", "—", "—"])
            continue
        label = f"`{backend}`" + (" (this machine's CPU, not the target's)"
                                  if backend == "ort-cpu" and not target.get("measurable") else "")
        for key, metrics in found.items():
            task = "nn_agreement" if "nn_agreement" in metrics else "top1" if "top1" in metrics else "top1_agreement"
            own = [c for c in checks if c.get("check", "").startswith(f"{key}.")]
            verdict = "—" if not own else ("✅ " if all(c["passed"] for c in own) else "❌ ") + \
                f"{sum(c['passed'] for c in own)}/{len(own)}"
            rows.append([f"`{name}`", label, f"`{key.split('@')[0]}`",
                         format_number(metrics.get("cosine_mean"), "cosine_mean"),
                         f"{task} {format_number(metrics.get(task), task)}", verdict])
    return ["### Accuracy on each target's runtime", "",
            "The target's runtime as verified on this machine (same model file, same saved inputs); a "
            "TensorRT target's figures need TensorRT, so they come from `device-verify` on the device.", "",
            *_table(["target", "backend", "variant", "cosine mean", "task metric", "checks"], rows,
                    ["l", "l", "l", "r", "l", "l"])]


def _bundles_section(bundles: dict) -> list[str]:
    rows = [[f"`{name}`", f"`{_cell(b['path'])}`", f"`{b['sha256']}`" if b.get("sha256") else "—",
             _size(b.get("size_bytes")), _cell(b.get("files"))] for name, b in bundles.items()]
    return ["## Edge bundles", "", *_table(["target", "path", "sha256", "size", "files"], rows,
                                           ["l", "l", "l", "r", "r"])]


class Rendering:
    """The files one report renders to: its markdown and plots, named after the report
    (``report.json`` -> ``report.md``, ``latency_by_batch.png``; ``X.json`` -> ``X.md``,
    ``X-latency_by_batch.png``). Plots are registered with a drawing function and written
    together with the markdown by :meth:`write`."""

    def __init__(self, report_json: str | Path, out_dir: str | Path | None = None):
        report_json = Path(report_json)
        self.report_json = report_json
        self.out = Path(out_dir) if out_dir is not None else report_json.parent
        self.stem = report_json.stem if report_json.suffix else report_json.name
        self.md_name = f"{self.stem}.md"
        self.plots: dict[str, Callable[[Path], Any]] = {}

    def name(self, plot: str) -> str:
        """The file name of ``plot`` for this report."""
        return plot if self.stem == DEFAULT_REPORT_STEM else f"{self.stem}-{plot}"

    def add(self, plot: str, draw: Callable[[Path], Any]) -> str:
        """Register ``draw(dest)`` as the writer of ``plot``; return its file name (for the link)."""
        name = self.name(plot)
        self.plots[name] = draw
        return name

    def paths(self) -> list[Path]:
        return [self.out / self.md_name, *(self.out / name for name in self.plots)]

    def write(self, md_text: str, *, report: dict | None = None, inputs: tuple[Path, ...] = ()) -> Path:
        """Write the markdown and every plot (and ``report`` as the report JSON itself, when given)
        in one group of atomic renames: all of them change, or none. Returns the markdown path."""
        dests = self.paths()
        resolved = [d.resolve() for d in [self.report_json, *dests]]
        if len(set(resolved)) != len(resolved):
            raise UserError(f"the report's name makes its rendered files ({self.md_name}) collide with it",
                            path=self.report_json, fix="name the report file with a .json suffix, e.g. report.json")
        if report is not None:
            dests.insert(0, self.report_json)
        with atomic_paths(*dests, inputs=inputs) as temps:
            temps = list(temps)
            if report is not None:
                write_json(temps.pop(0), report)
            temps[0].write_text(md_text, encoding="utf-8")
            for tmp, draw in zip(temps[1:], self.plots.values()):
                draw(tmp)
        return self.out / self.md_name


def render_markdown(report: dict, rendering: Rendering) -> str:
    """The markdown of ``report``; the plots it links are registered on ``rendering``."""
    title = f"# deploykit report: {report['model']}"
    meta = [f"**recipe** `{report['recipe']}`" if report["recipe"] else "**recipe** —",
            f"**target** `{report['target']}`"]
    if report.get("run"):
        meta.append(f"**run** `{report['run']}`")
    if report.get("created"):
        meta.append(f"**created** {report['created']}")
    if report.get("deploykit_version"):
        meta.append(f"**deploykit** {report['deploykit_version']}")
    md = [title, "", " · ".join(meta), ""]

    acceptance = report.get("acceptance") or []
    if acceptance:
        failed = [a["check"] for a in acceptance if not a["passed"]]
        md += [f"**Acceptance: {'❌ FAILED' if failed else '✅ passed'}** "
               f"({len(acceptance) - len(failed)} of {len(acceptance)} checks passed"
               + (f"; failed: {', '.join(failed)})" if failed else ")"), ""]

    if isinstance(report.get("study"), dict) and report["study"].get("table"):
        from deploykit.study import study_section

        md += study_section(report, rendering)
    if report["accuracy"]:
        md += [*_accuracy_section(report["accuracy"]), ""]
    cosines = {v: d["cosine"] for v, d in (report.get("distributions") or {}).items() if d.get("cosine")}
    if cosines:
        cosine_plot = rendering.add(COSINE_PLOT, lambda dest: plot_cosine(cosines, dest))
        md += ["### Cosine distribution", "",
               "Per-sample `1 − cosine` against the reference, log scale (cosines near 1 are unreadable "
               "on a linear axis).", "", f"![Cosine distribution]({cosine_plot})", ""]
    if acceptance:
        md += [*_acceptance_section(acceptance), ""]

    rows = format_latency_table(report)
    if rows:
        md += [*_latency_section(rows, rendering.add(LATENCY_PLOT, lambda dest: plot_latency(rows, dest)),
                                 rendering.add(THROUGHPUT_PLOT, lambda dest: plot_throughput(rows, dest))), ""]

    parity = report.get("parity") or {}
    if parity or report.get("verification"):
        plotted = any(_is_number(m.get("cosine_mean")) or _is_number(m.get("snr_db")) for m in parity.values())
        plot = rendering.add(PARITY_PLOT, lambda dest: plot_parity(parity, dest)) if plotted else None
        md += [*_parity_section(report, plot), ""]
    targets = report.get("targets") or {}
    if targets:
        md += [*_targets_section(targets, rendering.add(TARGETS_PLOT, lambda dest: plot_targets(targets, dest))), ""]
        md += [*_target_accuracy_section(targets, parity, (report.get("verification") or {}).get("checks") or []), ""]
    if report.get("bundles"):
        md += [*_bundles_section(report["bundles"]), ""]

    tuning = report.get("tuning")
    if isinstance(tuning, dict) and tuning.get("trials"):
        md += [*_tuning_section(tuning, rendering.add(TUNING_PLOT, lambda dest: plot_tuning(tuning, dest))), ""]

    for key, heading in (("data", "Data"), ("export", "Export"), ("calibration", "Calibration"),
                         ("bench", "Bench settings")):
        if report.get(key):
            md += [f"## {heading}", "", *_kv_table(report[key]), ""]
    if report.get("timings_s"):
        timings = dict(report["timings_s"])
        timings["total"] = round(sum(timings.values()), 2)
        md += ["## Timings (s)", "", *_table(["stage", "seconds"],
                                             [[f"`{k}`", f"{v:.2f}"] for k, v in timings.items()]), ""]
    if report["environment"]:
        md += ["## Environment", "", *_kv_table(report["environment"]), ""]
    if report["artifacts"]:
        md += ["## Artifacts", "", *_table(["name", "path"], [[f"`{k}`", f"`{v}`"]
                                                               for k, v in report["artifacts"].items()], ["l", "l"]), ""]
    if report.get("notes"):
        md += ["## Notes", "", *(f"- {n}" for n in report["notes"]), ""]

    return "\n".join(md).rstrip() + "\n"


def render_report(report_json: str | Path, out_dir: str | Path | None = None) -> Path:
    """Render the markdown and PNG plots of ``report_json`` (``report.json`` -> ``report.md``,
    ``X.json`` -> ``X.md`` and ``X-*.png``), all written together; return the markdown path."""
    report_json = Path(report_json)
    report = read_json(report_json, what="report")
    validate_report(report, path=report_json)
    rendering = Rendering(report_json, out_dir)
    return rendering.write(render_markdown(report, rendering), inputs=(report_json,))


def save_and_render_report(report_json: str | Path, report: dict) -> Path:
    """Write ``report`` to ``report_json`` together with its markdown and plots next to it,
    in one group of atomic renames; return the report path."""
    report_json = Path(report_json)
    validate_report(report, path=report_json)
    rendering = Rendering(report_json)
    rendering.write(render_markdown(report, rendering), report=report)
    return report_json




__all__ = ["validate_report", "merge_report", "render_report", "save_and_render_report",
           "Rendering", "format_latency_table", "format_number",
           "plot_latency", "plot_throughput", "plot_cosine", "plot_parity", "plot_targets", "LATENCY_KEY",
           "PARITY_KEY"]
