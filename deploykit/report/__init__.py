"""report.json contract, merging stage results, and report.md + plots (see ``render.py``)."""

from deploykit.report.render import (
    LATENCY_KEY,
    format_latency_table,
    format_number,
    merge_report,
    render_report,
    save_and_render_report,
    validate_report,
)

__all__ = ["validate_report", "merge_report", "render_report", "save_and_render_report", "format_latency_table", "format_number",
           "LATENCY_KEY"]
