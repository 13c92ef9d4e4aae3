"""Latency and throughput per variant, backend and batch size, on the saved evaluation inputs.

Per batch size, every runner gets its warm-up runs, then the runners are timed *interleaved* in
``rounds`` rounds (the order rotating each round), each round giving each runner its share of
``iterations`` and ``min_seconds``: a machine that slows down for a while slows every variant,
not just the one being timed. Latency is wall time of one ``infer`` call (host to host) over all
rounds; throughput is items per second. Each variant's ratio to FP32 on the same backend is
taken per round; the report gives its median and its spread across rounds, and calls the
comparison inconclusive when the rounds disagree on which is faster. Thread counts are
explicit and recorded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from deploykit.data import Split
from deploykit.errors import UserError
from deploykit.progress import track
from deploykit.timing import summarize, time_calls, time_loop


@dataclass
class BenchConfig:
    batches: list[int] = field(default_factory=lambda: [1, 8, 32])
    seq_len: int = 128
    warmup: int = 3
    iterations: int = 20
    min_seconds: float = 1.0
    max_seconds: float = 20.0
    threads: int | None = None
    rounds: int = 5

    def validate(self) -> None:
        if not self.batches or any(b < 1 for b in self.batches):
            raise UserError("bench.batches must be positive batch sizes", fix="e.g. batches: [1, 8, 32]")
        if not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise UserError(f"bench.seq_len must be a positive number of tokens, not {self.seq_len!r}",
                            fix="e.g. seq_len: 128")
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise UserError(f"bench.rounds must be a positive number of rounds, not {self.rounds!r}",
                            fix="e.g. rounds: 5")
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
    """Time each ``(variant, runner)`` pair at every batch size, interleaved in rounds; returns
    report ``latency`` entries keyed ``<variant>@<backend>/b<batch>``."""
    config = config or BenchConfig()
    config.validate()
    latency: dict[str, Any] = {}
    jobs = [(b, r) for b in config.batches for r in range(config.rounds)]
    per_round = max(1, -(-config.iterations // config.rounds))
    round_min = config.min_seconds / config.rounds
    round_max = config.max_seconds / config.rounds
    times: dict[tuple[str, int], list[list[float]]] = {}
    for batch, r in track(jobs, total=len(jobs), description=f"benchmarking ({config.rounds} rounds)"):
        feeds = bench_feeds(split, batch, config.seq_len)
        order = runners[r % len(runners):] + runners[:r % len(runners)] if runners else []
        for name, runner in order:
            key = (f"{name}@{runner.backend}", batch)
            if r == 0:
                times[key] = []
                for _ in range(config.warmup):
                    runner.infer(feeds)
            times[key].append(time_calls(runner, feeds, per_round, round_min, round_max))
    threads = {f"{name}@{runner.backend}": runner.threads for name, runner in runners}
    for (series, batch), rounds in times.items():
        latency[f"{series}/b{batch}"] = summarize(rounds, batch, threads[series])
    add_ratios(latency)
    return latency


def add_ratios(latency: dict[str, Any]) -> None:
    """Each variant's p50 over FP32's on the same backend and batch, per round: the median as
    ``ratio_to_fp32``, the range as ``ratio_spread``; ``conclusive`` when every round agrees."""
    for key, entry in latency.items():
        series, _, batch = key.partition("/")
        variant, _, backend = series.partition("@")
        base = latency.get(f"fp32@{backend}/{batch}")
        if variant != "fp32" and base:
            compare_rounds(entry, base)


def compare_rounds(entry: dict[str, Any], base: dict[str, Any]) -> None:
    """``entry``'s per-round p50 over ``base``'s (FP32's, timed in the same rounds): the median
    as ``ratio_to_fp32``, the range as ``ratio_spread``; ``conclusive`` when every round agrees
    on which is faster."""
    ratios = [a / b for a, b in zip(entry.get("round_p50_ms") or [], base.get("round_p50_ms") or []) if b > 0]
    if not ratios:
        return
    entry["ratio_to_fp32"] = float(np.median(ratios))
    entry["ratio_spread"] = [float(min(ratios)), float(max(ratios))]
    entry["conclusive"] = bool(min(ratios) > 1.0 or max(ratios) < 1.0) if len(ratios) > 1 else False


def bench_settings(config: BenchConfig, threads: int) -> dict[str, Any]:
    settings = asdict(config)
    settings["threads"] = threads
    return settings
