"""Cells and rows of report.md, shared by the markdown and the plots: numbers and values as
table cells, latency entries and parity entries as rows."""

from __future__ import annotations

import math
from typing import Any

from deploykit.report.schema import LATENCY_FIELDS, LATENCY_KEY, PARITY_KEY


def format_number(value: Any, metric: str = "") -> str:
    """A readable cell: cosines with 6 decimals, tiny or huge numbers in scientific notation."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return format_cell(value)
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


def format_ms(value: float) -> str:
    """Milliseconds with 3 significant-ish digits."""
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.1f}"


def format_per_s(value: float) -> str:
    """A rate per second, thousands separated."""
    return f"{value:,.1f}" if value < 1000 else f"{value:,.0f}"


def format_cell(value: Any) -> str:
    """Any JSON value as one markdown table cell (``|`` escaped, lists shortened)."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return format_number(value)
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value):     # records: one "k v, k v" group each
            shown = "; ".join(_record(v) for v in value[:6])
            return f"{len(value)} records: {shown}; …" if len(value) > 6 else shown
        shown = ", ".join(format_cell(v) for v in value[:6])
        return f"{len(value)} items: {shown}, …" if len(value) > 6 else (shown or "(none)")
    if isinstance(value, dict):
        return _record(value) or "(none)"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _record(data: dict) -> str:
    """``{"shape": [8, 49], "max_abs_diff": 1.6e-07}`` -> ``shape 8×49, max_abs_diff 1.600e-07``."""
    parts = []
    for key, value in data.items():
        if key == "shape" and isinstance(value, list) and all(isinstance(v, int) for v in value):
            parts.append(f"{key} {'×'.join(map(str, value))}")
        else:
            parts.append(f"{key} {format_number(value, key) if isinstance(value, (int, float)) else format_cell(value)}")
    return ", ".join(parts)


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


def group_series(rows: list[dict]) -> dict[str, list[dict]]:
    """Latency rows by their ``series``, in first-seen order."""
    series: dict[str, list[dict]] = {}
    for row in rows:
        series.setdefault(row["series"], []).append(row)
    return series


def parity_rows(parity: dict) -> list[tuple[str, str, dict]]:
    """``(variant, backend, metrics)`` grouped by variant (first-seen order), backends in first-seen order."""
    rows = [(m["variant"], m["backend"], metrics) for key, metrics in parity.items()
            if (m := PARITY_KEY.match(key))]
    variants = list(dict.fromkeys(r[0] for r in rows))
    return sorted(rows, key=lambda r: variants.index(r[0]))



__all__ = ["format_number", "format_ms", "format_per_s", "format_cell", "format_latency_table", "group_series",
           "parity_rows"]
