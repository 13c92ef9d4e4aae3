"""Latency and throughput per variant, backend and batch size, on the saved evaluation inputs.

Each configuration gets warm-up runs, then timed runs until both ``iterations`` runs and
``min_seconds`` have passed (or ``max_seconds`` is spent, with at least 3 runs). Latency is
wall time of one ``infer`` call (host to host); throughput is items per second over the
timed runs. Thread counts are explicit and recorded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from deploykit.data import Split
from deploykit.errors import UserError
from deploykit.progress import track
from deploykit.timing import time_loop


@dataclass
class BenchConfig:
    batches: list[int] = field(default_factory=lambda: [1, 8, 32])
    seq_len: int = 128
    warmup: int = 3
    iterations: int = 20
    min_seconds: float = 1.0
    max_seconds: float = 20.0
    threads: int | None = None

    def validate(self) -> None:
        if not self.batches or any(b < 1 for b in self.batches):
            raise UserError("bench.batches must be positive batch sizes", fix="e.g. batches: [1, 8, 32]")
        if not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise UserError(f"bench.seq_len must be a positive number of tokens, not {self.seq_len!r}",
                            fix="e.g. seq_len: 128")
        if self.iterations < 1 or self.warmup < 0:
            raise UserError("bench.iterations must be >= 1 and bench.warmup >= 0", fix="fix the bench settings")


def bench_feeds(split: Split, batch: int, seq_len: int) -> dict[str, np.ndarray]:
    """``batch`` rows of the split (cycled if needed), text cut or checked to ``seq_len``."""
    rows = np.arange(batch) % split.count
    feeds = {}
    for name, arr in split.feeds.items():
        x = arr[rows]
        if name in ("input_ids", "attention_mask", "token_type_ids"):
            if seq_len > x.shape[1]:
                raise UserError(f"bench sequence {seq_len} is longer than the saved inputs ({x.shape[1]})",
                                fix="raise model.options.max_length or lower bench.seq_len")
            x = x[:, :seq_len]
        feeds[name] = np.ascontiguousarray(x)
    return feeds


def time_runner(runner, feeds: dict[str, np.ndarray], config: BenchConfig) -> dict[str, Any]:
    return time_loop(runner, feeds, warmup=config.warmup, iterations=config.iterations,
                     min_seconds=config.min_seconds, max_seconds=config.max_seconds)


def bench(runners: list[tuple[str, Any]], split: Split, config: BenchConfig | None = None) -> dict[str, Any]:
    """Time each ``(variant, runner)`` pair at every batch size; returns report ``latency`` entries.

    Keys are ``<variant>@<backend>/b<batch>``.
    """
    config = config or BenchConfig()
    config.validate()
    jobs = [(name, runner, b) for name, runner in runners for b in config.batches]
    latency: dict[str, Any] = {}
    for name, runner, batch in track(jobs, total=len(jobs), description="benchmarking"):
        latency[f"{name}@{runner.backend}/b{batch}"] = time_runner(runner, bench_feeds(split, batch, config.seq_len),
                                                                   config)
    return latency


def bench_settings(config: BenchConfig, threads: int) -> dict[str, Any]:
    settings = asdict(config)
    settings["threads"] = threads
    return settings
