"""The files one report renders to, and writing them together.

Rendering writes ``report.md`` and PNG plots next to the report or into ``out_dir``, all in one
group of atomic renames; it never writes onto report.json (unless asked to save the report with
them). The rendered files follow the report's name: ``report.json`` gives ``report.md`` and
``latency_by_batch.png`` …, any other ``X.json`` gives ``X.md`` and ``X-latency_by_batch.png`` …,
so two reports in one folder never write over each other's files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from deploykit.errors import UserError
from deploykit.io import atomic_paths, write_json

DEFAULT_REPORT_STEM = "report"   # report.json renders report.md and unprefixed plot names


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


__all__ = ["Rendering", "DEFAULT_REPORT_STEM"]
