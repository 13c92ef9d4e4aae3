"""What the stages of a run read and add to, and the report they end in.

A :class:`RunContext` is one run of the stage sequence (``deploykit.stages``): ``deploykit run``
has one; a study has one for its shared setup and one per variant (whose folder is
``runs/<name>/<variant>/``). :class:`RunResult` is what a finished run hands back.
"""

from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import deploykit
from deploykit.data import DataSplits, Split
from deploykit.recipe import Recipe
from deploykit.runners import TorchRunner
from deploykit.verify import run_split


@dataclass
class RunResult:
    run_dir: Path
    report_path: Path
    report: dict[str, Any]
    accepted: bool


@dataclass
class RunContext:
    """One pass through the stages: its folder, model, data, what the stages produced, and timings."""
    rec: Recipe
    run_dir: Path
    bundle: Any = None                                   # the torch model (deploykit.models.base.ModelBundle)
    splits: DataSplits | None = None
    data_paths: dict[str, Path] = field(default_factory=dict)     # saved splits by name
    models: dict[str, Path] = field(default_factory=dict)         # ONNX models by variant (fp32, int8, ...)
    artifacts: dict[str, str] = field(default_factory=dict)       # the report's artifacts section
    timings: dict[str, float] = field(default_factory=dict)       # seconds by stage
    report: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] | None = None
    exported: Any = None                                 # deploykit.export.ExportResult
    calibration: Any = None                              # deploykit.quantize.CalibrationResult
    target_notes: dict[str, list[str]] = field(default_factory=dict)
    reference: np.ndarray | None = None                  # torch FP32 outputs on the evaluation split
    verified: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, Any] = field(default_factory=dict)
    threads: int | None = None                           # the bench's threads
    targets: dict[str, Any] = field(default_factory=dict)
    clock: float = field(default_factory=time.perf_counter)

    def lap(self, key: str) -> None:
        """Record the seconds since the previous lap (or the start) under ``key``."""
        now = time.perf_counter()
        self.timings[key] = round(now - self.clock, 2)
        self.clock = now


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def run_environment() -> dict[str, Any]:
    from deploykit.doctor import environment

    return environment()


def new_report(model: str, recipe: str | None, target: str) -> dict[str, Any]:
    return {"model": model, "recipe": recipe, "target": target, "created": _now(),
            "deploykit_version": deploykit.__version__, "artifacts": {}, "accuracy": {}, "latency": {},
            "environment": run_environment()}


def save_report(path: Path, report: dict[str, Any]) -> Path:
    """Validate and write ``report`` to ``path`` together with its markdown and plots next to it
    (``report.json`` -> ``report.md``; ``X.json`` -> ``X.md``, ``X-*.png``), all or none."""
    from deploykit import study_report
    from deploykit.report import save_and_render_report

    study_report.register()                  # a study's report renders with its section
    return save_and_render_report(path, report)


def parity_feeds(split: Split) -> list[dict[str, np.ndarray]]:
    """Two real batches (8 rows, then 1) to check an export against torch with."""
    from deploykit.data import iterate_batches

    return [dict(next(iterate_batches(split.feeds, size))) for size in (8, 1)]


def reference_outputs(bundle, split: Split, batch_size: int) -> np.ndarray:
    from deploykit.metrics import output_reducer

    return run_split(TorchRunner(bundle), split, batch_size=batch_size, description="reference (torch fp32)",
                     reduce=output_reducer(bundle.task, split.feeds))
