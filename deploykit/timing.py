"""The one timing loop every latency figure comes from (``deploykit bench``, ``bench --target``,
``device-verify``). It imports only numpy, so the edge-budget child process that times a model
alone can use it without loading torch.

Warm-up runs, then timed runs until both ``iterations`` runs and ``min_seconds`` have passed
(or ``max_seconds`` is spent, with at least 3 runs). Latency is wall time of one ``infer`` call
(host to host); throughput is items per second over the timed runs.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np


def time_loop(runner, feeds: dict[str, np.ndarray], *, warmup: int, iterations: int, min_seconds: float,
              max_seconds: float) -> dict[str, Any]:
    for _ in range(warmup):
        runner.infer(feeds)
    times = time_calls(runner, feeds, iterations, min_seconds, max_seconds, min_calls=3)
    batch = int(next(iter(feeds.values())).shape[0])
    return latency_entry(np.asarray(times) * 1e3, batch, runner.threads)


def latency_entry(ms: np.ndarray, batch: int, threads: Any) -> dict[str, Any]:
    """p50/p90/p99, mean and throughput of one configuration's call times (milliseconds)."""
    return {"batch": batch, "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()),
            "throughput_per_s": float(batch * len(ms) / (ms.sum() / 1e3)), "iterations": int(len(ms)),
            "threads": threads}


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB: its own ``VmHWM`` (``ru_maxrss`` where there
    is no /proc; on Linux a child started by ``subprocess`` inherits its parent's ``ru_maxrss``)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)   # bytes on macOS, KiB on Linux


def time_calls(runner, feeds: dict[str, np.ndarray], iterations: int, min_seconds: float,
               max_seconds: float, *, min_calls: int = 1) -> list[float]:
    """Seconds of each timed ``infer`` call: at least ``iterations`` calls and ``min_seconds``,
    stopping at ``max_seconds`` once ``min_calls`` calls are done."""
    times: list[float] = []
    started = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        runner.infer(feeds)
        times.append(time.perf_counter() - t0)
        spent = time.perf_counter() - started
        if (len(times) >= iterations and spent >= min_seconds) or (spent >= max_seconds and len(times) >= min_calls):
            return times


def summarize(rounds: list[list[float]], batch: int, threads: Any) -> dict[str, Any]:
    """A latency entry from the calls of every round (p50/p90/p99 over all of them) plus each
    round's own p50 (what ratios and their spread are taken from)."""
    ms = np.concatenate([np.asarray(r) for r in rounds]) * 1e3
    return {**latency_entry(ms, batch, threads), "rounds": len(rounds),
            "round_p50_ms": [float(np.percentile(np.asarray(r) * 1e3, 50)) for r in rounds]}
