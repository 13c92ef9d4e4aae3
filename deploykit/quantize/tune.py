"""Accuracy-driven search for a static INT8 model that meets its targets with the fewest
float nodes.

Scored on a tuning split (disjoint from calibration *and* evaluation) against the FP32
model's own outputs, every trial builds a Q/DQ model and checks the criteria:

1. **Configuration grid**: SmoothQuant alpha (``None`` = off) x calibration method
   (percentile at each listed percentile, entropy, mse). Statistics are collected once
   per alpha; each method's ranges come from the same histograms. The first configuration
   that meets every criterion wins (it needs no float node); otherwise the best-scoring one
   goes on.
2. **Fallback**: the best configuration's quantized nodes are ranked by the error each adds
   on its own (``deploykit.quantize.debug.node_errors``), worst first, and the k worst are
   kept in float for k = 1, 2, 4, ... until the criteria hold, then k is narrowed by
   bisection to the smallest passing k found.

The score of a trial is its smallest normalised margin over the criteria
(``(value - threshold) / (1 - threshold)`` for ``>=`` rules), so "best" means "closest to
passing everything". Every trial is logged. The search stops at the trial budget and then
returns the best trial seen, marked as not meeting the target.

neural-compressor's tuning machinery is not used: its 3.x tuner drives its own torch-side
quantization, while this search space is Q/DQ placement in an ONNX graph.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from deploykit.acceptance import parse_rule, passes
from deploykit.data import Split, iterate_batches
from deploykit.metrics import output_reducer, task_metrics
from deploykit.onnx_utils import get_metadata
from deploykit.progress import say
from deploykit.quantize.config import QuantConfig
from deploykit.quantize.graph import cpu_session
from deploykit.quantize.qdq import Prepared, build_qdq, prepare


@dataclass
class Trial:
    index: int
    phase: str                       # grid | fallback
    alpha: float | None
    method: str
    percentile: float | None
    float_nodes: list[str]
    metrics: dict[str, float]
    passed: bool
    score: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"trial": self.index, "phase": self.phase, "alpha": self.alpha, "method": self.method,
                "percentile": self.percentile, "float_node_count": len(self.float_nodes),
                "float_nodes": self.float_nodes, "metrics": {k: None if v is None else round(v, 6) for k, v in self.metrics.items()},
                "passed": self.passed, "score": round(self.score, 6), "seconds": round(self.seconds, 2)}


@dataclass
class TuneOutcome:
    config: QuantConfig              # the chosen method / percentile / alpha filled in
    prepared: Prepared
    float_nodes: list[str]
    log: dict[str, Any] = field(default_factory=dict)


def criteria_score(metrics: dict[str, float], criteria: dict[str, str]) -> tuple[bool, float]:
    """(all criteria met, smallest normalised margin)."""
    margins = []
    for metric, rule in criteria.items():
        op, threshold = parse_rule(rule)
        value = metrics.get(metric)
        if value is None:
            return False, -np.inf
        span = max(abs(1.0 - threshold), 1e-6) if op in (">=", ">") else max(abs(threshold), 1e-6)
        margins.append((value - threshold) / span if op in (">=", ">") else (threshold - value) / span)
    ok = all(passes(metrics.get(m), r) for m, r in criteria.items())
    return ok, float(min(margins)) if margins else 0.0


class _Scorer:
    """Scores Q/DQ models on the tuning split against the FP32 outputs."""

    def __init__(self, fp32: onnx.ModelProto, split: Split, task: str, threads: int | None, batch_size: int = 32):
        self.split, self.task, self.threads, self.batch_size = split, task, threads, batch_size
        self.reference = None
        self.reference = self.run(fp32)

    def run(self, model: onnx.ModelProto) -> np.ndarray:
        session = cpu_session(model, self.threads)
        names = [i.name for i in session.get_inputs()]
        reduce = output_reducer(self.task, self.split.feeds, self.reference)   # a causal LM's per-batch record
        outs = []
        for i, f in enumerate(iterate_batches(self.split.feeds, self.batch_size)):
            out = session.run(None, {n: f[n] for n in names})[0]
            outs.append(out if reduce is None else reduce(f, out, i * self.batch_size))
        return np.concatenate(outs)

    def __call__(self, model: onnx.ModelProto) -> dict[str, float]:
        return task_metrics(self.task, self.reference, self.run(model), self.split.labels)


def _grid(config: QuantConfig) -> list[tuple[str, float | None]]:
    grid: list[tuple[str, float | None]] = []
    for method in config.tune.methods:
        if method == "percentile":
            grid += [("percentile", p) for p in config.tune.percentiles]
        else:
            grid.append((method, None))
    return grid


class _Search:
    """The trials run so far and the best one seen, with the prepared graph it was built from."""

    def __init__(self, scorer: _Scorer, criteria: dict[str, str], budget: int):
        self.scorer, self.criteria, self.budget = scorer, criteria, budget
        self.trials: list[Trial] = []
        self.best: tuple[Trial, Prepared] | None = None

    def spent(self) -> bool:
        return len(self.trials) >= self.budget

    def record(self, phase, alpha, method, pct, float_nodes, prepared) -> Trial:
        t0 = time.perf_counter()
        model = build_qdq(prepared, prepared.ranges(method, pct), float_nodes)
        metrics = self.scorer(model)
        ok, score = criteria_score(metrics, self.criteria)
        trial = Trial(len(self.trials) + 1, phase, alpha, method, pct if method == "percentile" else None,
                      list(float_nodes), metrics, ok, score, time.perf_counter() - t0)
        self.trials.append(trial)
        best = self.best
        key = (trial.passed, -len(trial.float_nodes) if trial.passed else 0, trial.score)
        if best is None or key > (best[0].passed, -len(best[0].float_nodes) if best[0].passed else 0, best[0].score):
            self.best = (trial, prepared)
        say(f"  trial {trial.index:>2} {phase:8s} alpha={alpha} {method}{'' if pct is None else f' {pct}'} "
            f"float={len(float_nodes)}: " + ", ".join(f"{k} {metrics[k]:.4f}" for k in self.criteria if k in metrics)
            + (" PASS" if ok else ""))
        return trial


def _grid_phase(search: _Search, inferred: onnx.ModelProto, calibration: Split, config: QuantConfig,
                threads: int | None) -> None:
    """Phase 1: the configuration grid; stops at the first configuration that passes unaided."""
    smooth_stats = None
    done = False
    for alpha in config.tune.alphas:
        if done or search.spent():
            break
        prepared = prepare(inferred, calibration, config, alpha=alpha, smooth_stats=smooth_stats, threads=threads)
        if alpha is not None and smooth_stats is None:
            smooth_stats = prepared.smooth_stats
        for method, pct in _grid(config):
            if search.spent():
                break
            if search.record("grid", alpha, method, pct, [], prepared).passed:
                done = True
                break


def _fallback_phase(search: _Search, tuning: Split, max_float_nodes: int | None,
                    threads: int | None) -> dict[str, Any]:
    """Phase 2: fall back the worst nodes of the best configuration (grow k, then narrow it);
    the node ranking, for the log."""
    from deploykit.quantize.debug import node_errors

    grid_best, prepared = search.best
    if grid_best.passed or search.spent():
        return {}
    alpha, method, pct = grid_best.alpha, grid_best.method, grid_best.percentile
    qdq = build_qdq(prepared, prepared.ranges(method, pct))
    ranking_split = Split("ranking", {k: v[:64] for k, v in tuning.feeds.items()}, tuning.sha256)
    selectable = {n.name for n in prepared.nodes} - set(prepared.mask_float_nodes)
    ranked = [e for e in node_errors(prepared.model, qdq, ranking_split, threads=threads) if e.node in selectable]
    order = [e.node for e in ranked]
    fallback_info = {"ranking": [{"node": e.node, "module": e.module, "added_snr_db": round(e.added_snr_db, 2)}
                                 for e in ranked]}
    limit = min(len(order), max_float_nodes if max_float_nodes is not None else len(order))
    passing: int | None = None
    failing = 0
    k = 1
    while k <= limit and not search.spent():       # grow: 1, 2, 4, ...
        if search.record("fallback", alpha, method, pct, order[:k], prepared).passed:
            passing = k
            break
        failing = k
        k = min(k * 2, limit) if k < limit else limit + 1
    while passing is not None and passing - failing > 1 and not search.spent():   # narrow
        mid = (passing + failing) // 2
        if search.record("fallback", alpha, method, pct, order[:mid], prepared).passed:
            passing = mid
        else:
            failing = mid
    return fallback_info


def tune(model_path: Path, inferred: onnx.ModelProto, calibration: Split, tuning: Split, config: QuantConfig,
         *, threads: int | None = None) -> TuneOutcome:
    start = time.perf_counter()
    tc = config.tune
    task = get_metadata(inferred).get("task", "text-embedding")
    search = _Search(_Scorer(inferred, tuning, task, threads), tc.criteria, tc.budget)
    _grid_phase(search, inferred, calibration, config, threads)
    fallback_info = _fallback_phase(search, tuning, tc.max_float_nodes, threads)
    trials = search.trials

    chosen, prepared = search.best
    out_config = copy.deepcopy(config)
    out_config.method = chosen.method
    if chosen.percentile is not None:
        out_config.percentile = chosen.percentile
    out_config.smoothquant.alpha = chosen.alpha
    log = {"criteria": dict(tc.criteria), "met": chosen.passed, "budget": tc.budget, "trials_run": len(trials),
           "chosen": chosen.to_dict(), "tuning_data": tuning.summary(), "seconds": round(time.perf_counter() - start, 1),
           "trials": [t.to_dict() for t in trials], **fallback_info}
    if not chosen.passed:
        say(f"  tuning: the criteria were not met within {tc.budget} trials; using the best trial "
            f"(#{chosen.index})")
    return TuneOutcome(out_config, prepared, list(chosen.float_nodes), log)
