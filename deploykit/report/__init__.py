"""The report: the report.json contract (``schema``), merging stage results into it (``merge``),
and report.md (``markdown``) with its plots (``plots``), written together (``rendering``).
Other modules add their own sections of report.md through ``sections``."""

from deploykit.report.formatting import format_latency_table, format_number
from deploykit.report.markdown import render_report, save_and_render_report
from deploykit.report.merge import merge_report
from deploykit.report.schema import LATENCY_KEY, validate_report
from deploykit.report.sections import register_section

__all__ = ["validate_report", "merge_report", "render_report", "save_and_render_report", "format_latency_table",
           "format_number", "LATENCY_KEY", "register_section"]
