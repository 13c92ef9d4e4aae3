"""Latency measured interleaved in rounds: ratios to FP32 per round, their spread, and a verdict
that says "inconclusive" when the rounds disagree."""

from __future__ import annotations

import time

import numpy as np

from deploykit.bench import BenchConfig, add_ratios, bench
from deploykit.data import Split


class _Sleeper:
    """A runner whose call takes ``seconds`` (sleep: stable to well under a millisecond)."""

    backend = "ort-cpu"
    threads = 1

    def __init__(self, seconds: float):
        self.seconds, self.calls = seconds, 0

    def infer(self, feeds):
        self.calls += 1
        time.sleep(self.seconds)
        return {}


def _split() -> Split:
    feeds = {"input_ids": np.ones((4, 16), np.int64), "attention_mask": np.ones((4, 16), np.int64)}
    return Split(name="evaluation", feeds=feeds, sha256="0" * 64)


def test_rounds_interleave_and_a_clear_difference_is_conclusive():
    fast, slow = _Sleeper(0.002), _Sleeper(0.006)
    config = BenchConfig(batches=[1, 2], seq_len=16, warmup=1, iterations=6, min_seconds=0.0, rounds=3)
    latency = bench([("fp32", fast), ("int8", slow)], _split(), config)
    entry = latency["int8@ort-cpu/b1"]
    assert entry["rounds"] == 3 and len(entry["round_p50_ms"]) == 3 and entry["iterations"] == 6
    assert fast.calls == slow.calls == 2 * (1 + 6)          # warm-up + 2 calls x 3 rounds, per batch
    # 6 ms over 2 ms: sleep overshoots by well under 1 ms, so the ratio lies in (2, 4)
    assert 2.0 < entry["ratio_to_fp32"] < 4.0 and entry["conclusive"]
    assert entry["ratio_spread"][0] <= entry["ratio_to_fp32"] <= entry["ratio_spread"][1]
    assert "ratio_to_fp32" not in latency["fp32@ort-cpu/b1"]


def test_rounds_that_disagree_are_inconclusive():
    latency = {"fp32@ort-cpu/b1": {"round_p50_ms": [10.0, 10.0, 10.0]},
               "int8@ort-cpu/b1": {"round_p50_ms": [8.0, 12.0, 9.0]},
               "int8@ort-cuda/b1": {"round_p50_ms": [1.0]}}           # no FP32 on that backend: no ratio
    add_ratios(latency)
    entry = latency["int8@ort-cpu/b1"]
    assert entry["ratio_to_fp32"] == 0.9 and entry["ratio_spread"] == [0.8, 1.2] and not entry["conclusive"]
    assert "ratio_to_fp32" not in latency["int8@ort-cuda/b1"]


def test_the_report_says_when_a_comparison_is_inconclusive():
    from deploykit.report.markdown import _ratio_section

    md = "\n".join(_ratio_section({"int8@ort-cpu/b1": {"ratio_to_fp32": 0.9, "ratio_spread": [0.8, 1.2],
                                                      "conclusive": False, "rounds": 3},
                                   "int8@ort-cpu/b8": {"ratio_to_fp32": 0.6, "ratio_spread": [0.55, 0.7],
                                                      "conclusive": True, "rounds": 3}}))
    assert "| `int8@ort-cpu/b8` | 0.60× | 0.55–0.70 | 3 | faster |" in md
    assert "inconclusive" in md and "cannot say" in md and "`int8@ort-cpu/b1`" in md
