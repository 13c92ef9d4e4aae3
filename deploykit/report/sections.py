"""Sections of report.md that modules outside the report package render.

A module that writes its own top-level key into report.json (a study writes ``study``) can
render that key's part of report.md without the report package importing it::

    register_section("study", study_section, applies=lambda study: isinstance(study, dict)
                     and bool(study.get("table")))

``renderer(report, rendering)`` returns the markdown lines of its section (ending with an empty
line) and registers the plots it links on ``rendering``
(:class:`deploykit.report.rendering.Rendering`). :func:`deploykit.report.markdown.render_markdown`
calls each registered renderer whose key is in the report and whose ``applies(report[key])`` is
true, in registration order, after the acceptance summary and before the accuracy table (where
the study section has always been); the report's own sections keep their fixed order after them.
Registering a key again replaces its renderer and keeps its place.

The report package imports none of the modules that register sections. The study's section
lives in :mod:`deploykit.study_report`, whose ``register()`` every path that saves or renders a
report calls first (:func:`deploykit.context.save_report`, through which every stage and run
saves, and the ``deploykit report`` command), so report.md is the same whichever module asked
for it. A report rendered directly through this package without that call leaves the section out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from deploykit.report.rendering import Rendering

SectionRenderer = Callable[[dict[str, Any], Rendering], list[str]]


@dataclass(frozen=True)
class Section:
    key: str                              # the report.json key the section renders
    render: SectionRenderer               # (report, rendering) -> markdown lines
    applies: Callable[[Any], bool]        # report[key] -> whether to render it


_SECTIONS: dict[str, Section] = {}


def register_section(key: str, renderer: SectionRenderer, *, applies: Callable[[Any], bool] = bool) -> None:
    """Render ``renderer(report, rendering)`` into report.md for every report whose ``key`` is
    present and ``applies(report[key])`` (default: not empty)."""
    _SECTIONS[key] = Section(key, renderer, applies)


def sections() -> list[Section]:
    """The registered sections, in registration order."""
    return list(_SECTIONS.values())


def render_sections(report: dict[str, Any], rendering: Rendering) -> list[str]:
    """The markdown lines of every registered section that applies to ``report``."""
    md: list[str] = []
    for section in sections():
        if section.key in report and section.applies(report[section.key]):
            md += section.render(report, rendering)
    return md


__all__ = ["register_section", "sections", "render_sections", "Section", "SectionRenderer"]
