"""Accuracy-driven search for a static INT8 model that meets its targets with the fewest
float nodes.

Scored on a tuning split (disjoint from calibration *and* evaluation) against the FP32
model's own outputs, every trial builds a Q/DQ model and checks the criteria:

1. **Configuration grid**: SmoothQuant alpha (``None`` = off) x calibration method
   (percentile at each listed percentile, entropy, mse). Statistics are collected once
   per alpha; each method's ranges come from the same histograms. The first configuration
   that meets every criterion wins (it needs no float node); otherwise the best-scoring one
   goes on.
2. **Refinement** (``tune.refine``, in order, each kept only when it raises the score): the
   attention probabilities offset to [−1, 1] before P·V, SmoothQuant centring each channel
   (``channel-shift``), GPTQ rounding of the int8 weights (``weight-rounding``), a calibration
   method per tensor,
   bias correction, a SmoothQuant strength per group kind.
3. **Fallback**: the best configuration's quantized nodes are ranked by the error each adds
   on its own (``deploykit.quantize.debug.node_errors``), worst first, and the k worst are
   kept in float for k = 1, 2, 4, ... until the criteria hold, then k is narrowed by
   bisection to the smallest passing k found. k stops at ``max_float_fraction`` of the
   quantizable nodes (default one in eight) and at ``max_float_nodes``: beyond that the
   result is reported as not meeting the criteria, never as a "pass" that is mostly float.
   A trial with no node left in int8 never passes.

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
from deploykit.data import Split, iterate_batches, map_batches
from deploykit.metrics import output_reducer, task_metrics
from deploykit.onnx_utils import get_metadata
from deploykit.presets import EXACT_QDQ_PRESETS
from deploykit.progress import say
from deploykit.quantize.config import GROUP_KINDS, QuantConfig, TuneConfig
from deploykit.quantize.graph import cpu_session, float_op_types
from deploykit.quantize.qdq import Prepared, build_model, float_reference, prepare


@dataclass
class Candidate:
    """One configuration the search builds: smoothing strength (one value or one per group
    kind), calibration method (with per-tensor exceptions) and bias correction."""
    alpha: float | dict[str, float | None] | None
    method: str
    percentile: float | None
    tensor_methods: dict[str, str] = field(default_factory=dict)
    bias_correction: bool = False
    offset: bool = False                # P·V with the probabilities offset (deploykit.quantize.probabilities)
    shift: bool = False                 # SmoothQuant centres each channel first (smoothquant.shift)
    weight_rounding: str = "nearest"    # or gptq (deploykit.quantize.rounding)

    def but(self, **changes: Any) -> Candidate:
        out = copy.deepcopy(self)
        for k, v in changes.items():
            setattr(out, k, v)
        return out

    def label(self) -> str:
        alpha = (",".join(f"{k}={v}" for k, v in self.alpha.items()) if isinstance(self.alpha, dict)
                 else str(self.alpha))
        return (f"alpha={alpha} {self.method}{'' if self.percentile is None else f' {self.percentile}'}"
                + (f" +{len(self.tensor_methods)} tensor methods" if self.tensor_methods else "")
                + (" +bias" if self.bias_correction else "") + (" +pv-offset" if self.offset else "")
                + (" +shift" if self.shift else "") + (" +gptq" if self.weight_rounding == "gptq" else ""))


def build(prepared: Prepared, candidate: Candidate, float_nodes: list[str] = (), *,
          threads: int | None = None) -> onnx.ModelProto:
    """The Q/DQ model of ``candidate`` from ``prepared`` (its alpha already applied)."""
    ranges = prepared.ranges(candidate.method, candidate.percentile, candidate.tensor_methods)
    return build_model(prepared, ranges, float_nodes, bias_correction=candidate.bias_correction, threads=threads,
                       weight_rounding=candidate.weight_rounding)


def build_with_reference(prepared: Prepared, candidate: Candidate, *,
                         threads: int | None = None) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """``candidate``'s Q/DQ model with no node in float, and the float graph it is quantized
    from (what per-node errors compare to)."""
    ranges = prepared.ranges(candidate.method, candidate.percentile, candidate.tensor_methods)
    reference = float_reference(prepared, ranges)
    return build_model(prepared, ranges, bias_correction=candidate.bias_correction, threads=threads,
                       reference=reference, weight_rounding=candidate.weight_rounding), reference[0]


@dataclass
class Trial:
    index: int
    phase: str                       # grid | pv-offset | channel-shift | weight-rounding | tensor-method | bias-correction | group-alpha | sensitivity | fallback
    candidate: Candidate
    float_nodes: list[str]
    metrics: dict[str, float]
    passed: bool
    score: float
    seconds: float
    float_op_types: dict[str, int] = field(default_factory=dict)

    @property
    def alpha(self):
        return self.candidate.alpha

    @property
    def method(self) -> str:
        return self.candidate.method

    @property
    def percentile(self) -> float | None:
        return self.candidate.percentile if self.candidate.method == "percentile" else None

    def to_dict(self) -> dict[str, Any]:
        c = self.candidate
        return {"trial": self.index, "phase": self.phase, "alpha": c.alpha, "method": c.method,
                "percentile": self.percentile, "tensor_methods": dict(c.tensor_methods),
                "bias_correction": c.bias_correction, "probability_offset": c.offset, "channel_shift": c.shift,
                "weight_rounding": c.weight_rounding, "float_node_count": len(self.float_nodes),
                "float_nodes": self.float_nodes, "float_op_types": self.float_op_types,
                "metrics": {k: None if v is None else round(v, 6) for k, v in self.metrics.items()},
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
    """Scores Q/DQ models on the tuning split against the FP32 outputs; with ``exact_qdq``
    (a preset whose target is not ORT's CPU kernels) in the graph's exact arithmetic, so the
    choice does not depend on whether this CPU's int8 kernels saturate."""

    def __init__(self, fp32: onnx.ModelProto, split: Split, task: str, threads: int | None, batch_size: int = 32,
                 *, exact_qdq: bool = False):
        self.split, self.task, self.threads, self.batch_size = split, task, threads, batch_size
        self.exact_qdq = exact_qdq
        self.reference = None
        self.reference = self.run(fp32)

    def run(self, model: onnx.ModelProto) -> np.ndarray:
        session = cpu_session(model, self.threads, exact_qdq=self.exact_qdq)
        names = [i.name for i in session.get_inputs()]
        reduce = output_reducer(self.task, self.split.feeds, self.reference)   # a causal LM's per-batch record
        return map_batches(lambda f: session.run(None, {n: f[n] for n in names})[0],
                           iterate_batches(self.split.feeds, self.batch_size), self.batch_size, reduce)

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

    def __init__(self, scorer: _Scorer, criteria: dict[str, str], budget: int, threads: int | None):
        self.scorer, self.criteria, self.budget, self.threads = scorer, criteria, budget, threads
        self.trials: list[Trial] = []
        self.best: tuple[Trial, Prepared] | None = None
        self.info: dict[str, Any] = {}       # what the refinement phases measured, for the log

    def spent(self) -> bool:
        return len(self.trials) >= self.budget

    @staticmethod
    def _key(trial: Trial) -> tuple:
        return (trial.passed, -len(trial.float_nodes) if trial.passed else 0, trial.score)

    def record(self, phase: str, candidate: Candidate, float_nodes: list[str], prepared: Prepared) -> Trial:
        t0 = time.perf_counter()
        model = build(prepared, candidate, float_nodes, threads=self.threads)
        metrics = self.scorer(model)
        ok, score = criteria_score(metrics, self.criteria)
        if not {n.name for n in prepared.nodes} - set(float_nodes) - set(prepared.mask_float_nodes):
            ok = False                     # nothing left in int8: an FP32 model, not a pass
        trial = Trial(len(self.trials) + 1, phase, copy.deepcopy(candidate), list(float_nodes), metrics, ok, score,
                      time.perf_counter() - t0, float_op_types(prepared.nodes, float_nodes))
        self.trials.append(trial)
        if self.best is None or self._key(trial) > self._key(self.best[0]):
            self.best = (trial, prepared)
        say(f"  trial {trial.index:>2} {phase:15s} {candidate.label()} float={len(float_nodes)}: "
            + ", ".join(f"{k} {metrics[k]:.4f}" for k in self.criteria if k in metrics) + (" PASS" if ok else ""))
        return trial


def _grid_phase(search: _Search, inferred: onnx.ModelProto, calibration: Split, config: QuantConfig,
                threads: int | None) -> dict[Any, Prepared]:
    """Phase 1: the configuration grid; stops at the first configuration that passes unaided.
    Returns the prepared graphs by alpha (their channel statistics serve later alphas)."""
    prepared_by_alpha: dict[Any, Prepared] = {}
    smooth_stats = None
    for alpha in config.tune.alphas:
        if search.spent() or (search.best is not None and search.best[0].passed):
            break
        offset = bool(config.probability_offset)
        shift = bool(config.smoothquant.shift) and alpha is not None
        prepared = _prepared_for(prepared_by_alpha, inferred, calibration, config, threads, alpha,
                                 offset=offset, shift=shift, stats=smooth_stats)
        if alpha is not None and smooth_stats is None:
            smooth_stats = prepared.smooth_stats
        for method, pct in _grid(config):
            if search.spent():
                break
            candidate = Candidate(alpha, method, pct, offset=offset, shift=shift,
                                  weight_rounding=config.weight_rounding)
            if search.record("grid", candidate, [], prepared).passed:
                break
    return prepared_by_alpha


def _alpha_key(alpha, offset: bool, shift: bool = False) -> Any:
    """The key of a prepared graph: its smoothing strength(s), whether P·V is offset and
    whether the smoothing centres channels."""
    return (tuple(sorted(alpha.items())) if isinstance(alpha, dict) else alpha, bool(offset), bool(shift))


def _prepared_for(prepared_by_alpha: dict[Any, Prepared], inferred: onnx.ModelProto, calibration: Split,
                  config: QuantConfig, threads: int | None, alpha, *, offset: bool, shift: bool,
                  stats: dict[str, np.ndarray] | None) -> Prepared:
    """The prepared graph of (``alpha``, ``offset``, ``shift``), prepared on first use from the
    channel statistics ``stats`` when given (they serve every alpha and either shift)."""
    key = _alpha_key(alpha, offset, shift)
    if key not in prepared_by_alpha:
        prepared_by_alpha[key] = prepare(inferred, calibration, config, alpha=alpha, smooth_stats=stats,
                                         threads=threads, offset=offset, shift=shift)
    return prepared_by_alpha[key]


def _group_alpha_phase(search: _Search, inferred: onnx.ModelProto, calibration: Split, config: QuantConfig,
                       threads: int | None, prepared_by_alpha: dict[Any, Prepared]) -> None:
    """Coordinate search over the SmoothQuant strength of each group kind (attention-in,
    attention-out, mlp-in, mlp-out), starting from the best grid alpha; a change is kept
    when it raises the score."""
    from deploykit.quantize.smoothquant import find_groups

    kinds = sorted({g.kind for g in find_groups(inferred, config.smoothquant.targets,
                                                tuple(config.nodes_to_exclude))}, key=GROUP_KINDS.index)
    if not kinds:
        return
    best, _ = search.best
    base = best.candidate
    current = base.alpha if isinstance(base.alpha, dict) else {k: base.alpha for k in kinds}
    stats = next((p.smooth_stats for p in prepared_by_alpha.values() if p.smooth_stats), None)
    for kind in kinds:
        for value in config.tune.group_alphas:
            if search.spent() or search.best[0].passed:
                return
            if value == current.get(kind):
                continue
            alpha = {**current, kind: value}
            prepared = _prepared_for(prepared_by_alpha, inferred, calibration, config, threads, alpha,
                                     offset=base.offset, shift=base.shift, stats=stats)
            stats = stats or prepared.smooth_stats
            before = search.best[0]
            trial = search.record("group-alpha", base.but(alpha=alpha), [], prepared)
            if search.best[0] is trial and trial is not before:
                current, base = alpha, trial.candidate


def _offset_phase(search: _Search, inferred: onnx.ModelProto, calibration: Split, config: QuantConfig,
                  threads: int | None, prepared_by_alpha: dict[Any, Prepared]) -> None:
    """The best configuration with the attention probabilities offset (P·V as ½(2P−1)·V + ½ΣV,
    :mod:`deploykit.quantize.probabilities`); kept when it raises the score. Only symmetric int8
    activations gain from it: uint8 already spans [0, 1] with 256 levels."""
    best, prepared = search.best
    if best.passed or search.spent() or best.candidate.offset:
        return
    if config.activation_type != "int8" or not config.activation_symmetric:
        search.info["probability_offset"] = "skipped: activations are not symmetric int8"
        return
    offset = _prepared_for(prepared_by_alpha, inferred, calibration, config, threads, best.candidate.alpha,
                           offset=True, shift=best.candidate.shift, stats=prepared.smooth_stats)
    if not offset.offsets:
        search.info["probability_offset"] = "skipped: no softmax · V product in the graph"
        return
    search.record("pv-offset", best.candidate.but(offset=True), [], offset)


def _shift_phase(search: _Search, inferred: onnx.ModelProto, calibration: Split, config: QuantConfig,
                 threads: int | None, prepared_by_alpha: dict[Any, Prepared]) -> None:
    """The best configuration with SmoothQuant centring each channel before scaling it
    (:mod:`deploykit.quantize.shift`); kept when it raises the score."""
    best, prepared = search.best
    if best.passed or search.spent() or best.candidate.shift:
        return
    if best.candidate.alpha is None:
        search.info["channel_shift"] = "skipped: the best configuration is not smoothed"
        return
    shifted = _prepared_for(prepared_by_alpha, inferred, calibration, config, threads, best.candidate.alpha,
                            offset=best.candidate.offset, shift=True, stats=prepared.smooth_stats)
    search.record("channel-shift", best.candidate.but(shift=True), [], shifted)


def _rounding_phase(search: _Search) -> None:
    """The best configuration with its int8 weights rounded by GPTQ on the calibration inputs
    (:mod:`deploykit.quantize.rounding`); kept when it raises the score."""
    best, prepared = search.best
    if best.passed or search.spent() or best.candidate.weight_rounding == "gptq":
        return
    if best.candidate.bias_correction:
        search.info["weight_rounding"] = "skipped: bias correction is on (the two do not combine)"
        return
    search.record("weight-rounding", best.candidate.but(weight_rounding="gptq"), [], prepared)


def _tensor_method_phase(search: _Search, config: QuantConfig, tuning: Split, threads: int | None) -> None:
    """Each activation tensor takes the range of the candidate method that adds the least
    error where it is read: for every method of the grid (and minmax), the error each
    quantized node adds on its own (:func:`deploykit.quantize.debug.node_errors`, as noise
    power relative to the node's output), summed over the tensor's readers. Kept when the
    combined choice raises the score."""
    from deploykit.quantize.debug import node_errors, quantized_nodes

    best, prepared = search.best
    if best.passed or search.spent():
        return
    split = _head(tuning, config.tune.refine_samples)
    specs = [("minmax", None)] + [m for m in _grid(config) if m != ("minmax", None)]
    noise: dict[str, dict[str, float]] = {}          # tensor -> spec -> summed relative noise
    for method, pct in specs:
        spec = spec_of(method, pct)
        candidate = best.candidate.but(method=method, percentile=pct, tensor_methods={}, bias_correction=False)
        qdq, reference = build_with_reference(prepared, candidate, threads=threads)
        readers: dict[str, list[str]] = {}
        for node, mapping, _ in quantized_nodes(qdq):
            for src in mapping.values():
                if src:
                    readers.setdefault(node.name, []).append(src)
        for e in node_errors(reference, qdq, split, threads=threads):
            for tensor in readers.get(e.node, []):
                noise.setdefault(tensor, {}).setdefault(spec, 0.0)
                noise[tensor][spec] += 10.0 ** (-e.added_snr_db / 10.0)
    base = best.candidate
    base_spec = spec_of(base.method, base.percentile)
    chosen = choose_tensor_methods(noise, base_spec)
    search.info["tensor_method_noise"] = {t: {k: float(f"{v:.6g}") for k, v in by_spec.items()}
                                          for t, by_spec in sorted(noise.items())}
    search.info["tensor_method_base"] = base_spec
    if chosen:
        search.record("tensor-method", base.but(tensor_methods=chosen), [], prepared)


def spec_of(method: str, percentile: float | None) -> str:
    """A method as ``QuantConfig.tensor_methods`` writes it: ``mse``, ``percentile:99.99``."""
    return method if percentile is None or method != "percentile" else f"{method}:{percentile}"


def choose_tensor_methods(noise: dict[str, dict[str, float]], base: str) -> dict[str, str]:
    """Per tensor, the method of least added noise where it beats ``base`` (ties keep ``base``)."""
    chosen = {}
    for tensor, by_spec in sorted(noise.items()):
        spec = min(by_spec, key=lambda k: (by_spec[k], k != base, k))
        if spec != base and by_spec[spec] < by_spec.get(base, np.inf):
            chosen[tensor] = spec
    return chosen


def _bias_phase(search: _Search) -> None:
    best, prepared = search.best
    if best.passed or search.spent() or best.candidate.bias_correction:
        return
    if best.candidate.weight_rounding == "gptq":
        search.info["bias_correction"] = "skipped: the weights are GPTQ-rounded (the two do not combine)"
        return
    search.record("bias-correction", best.candidate.but(bias_correction=True), [], prepared)


def _head(split: Split, n: int) -> Split:
    return Split(split.name, {k: v[:n] for k, v in split.feeds.items()}, split.sha256)


def fallback_cap(selectable: int, max_float_nodes: int | None, max_float_fraction: float) -> int:
    """How many nodes the fallback may keep in float: ``max_float_fraction`` of the ``selectable``
    ones (rounded down, at least 1), and no more than ``max_float_nodes`` when set."""
    cap = max(1, int(np.floor(max_float_fraction * selectable + 1e-9)))
    return min(cap, selectable, max_float_nodes if max_float_nodes is not None else cap)


def node_kinds(model: onnx.ModelProto, names: list[str]) -> dict[str, str]:
    """Each named node's kind, from the graph: a Linear's SmoothQuant group kind (attention-in,
    attention-out, mlp-in, mlp-out), ``attention-values`` for a softmax · V product,
    ``activation-product`` for another MatMul of two activations, else its op type."""
    from deploykit.quantize.probabilities import probability_matmuls
    from deploykit.quantize.smoothquant import find_groups

    kind = {n: g.kind for g in find_groups(model, "all") for n in g.nodes}
    values = {n.name for n in probability_matmuls(model)}
    op = {n.name: n.op_type for n in model.graph.node}
    return {n: kind.get(n) or ("attention-values" if n in values else
                               "activation-product" if op.get(n) == "MatMul" else op.get(n, "?")) for n in names}


def _output_noise(metrics: dict[str, float]) -> float:
    """The output error a trial left, as 1 − cosine_mean (every task reports it): for small
    errors it is half the noise power relative to the signal, so it adds over independent nodes."""
    return max(1.0 - float(metrics.get("cosine_mean", 1.0)), 0.0)


def output_ranking(search: _Search, prepared: Prepared, candidate: Candidate, ranked: list,
                   inferred: onnx.ModelProto) -> tuple[list[dict[str, Any]], list[dict[str, Any]], float]:
    """The nodes of ``ranked`` (per-node errors, worst added first) in the order of the output
    error each is estimated to carry: each kind's nodes are kept in float together once, and
    what that removes at the output is split among them by their added errors' mean squares.
    Returns (node, kind, output_share) rows in that order, one row per kind, and the output error."""
    kinds = node_kinds(inferred, [e.node for e in ranked])
    members: dict[str, list] = {}
    for e in ranked:
        members.setdefault(kinds[e.node], []).append(e)
    base = _output_noise(search.best[0].metrics)
    estimate, groups = {}, []
    for kind, errs in members.items():
        t0 = time.perf_counter()
        metrics = search.scorer(build(prepared, candidate, [e.node for e in errs], threads=search.threads))
        removed = max(base - _output_noise(metrics), 0.0)
        total = sum(e.added_mse for e in errs) or 1.0
        estimate.update({e.node: removed * e.added_mse / total for e in errs})
        groups.append({"kind": kind, "nodes": len(errs), "cosine_mean_in_float": round(metrics["cosine_mean"], 6),
                       "output_noise_removed": removed, "seconds": round(time.perf_counter() - t0, 1)})
        say(f"  fallback ranking: {kind} ({len(errs)} nodes) in float: cosine {metrics['cosine_mean']:.5f}")
    position = {e.node: i for i, e in enumerate(ranked)}
    order = sorted(position, key=lambda n: (-estimate[n], position[n]))
    return ([{"node": n, "kind": kinds[n], "output_share": estimate[n] / max(base, 1e-12)} for n in order],
            groups, base)


def _fallback_phase(search: _Search, tuning: Split, tc: TuneConfig, threads: int | None,
                    inferred: onnx.ModelProto) -> dict[str, Any]:
    """Phase 3: fall back the nodes of the best configuration in the order of
    ``tc.fallback_ranking`` (the first ``tc.sensitivity_candidates`` of them re-ranked by the
    score each one alone in float reaches), growing k, then narrowing it; the ranking, for the log."""
    from deploykit.quantize.debug import node_errors

    best, prepared = search.best
    if best.passed or search.spent():
        return {}
    candidate = best.candidate
    qdq, reference = build_with_reference(prepared, candidate, threads=threads)
    selectable = {n.name for n in prepared.nodes} - set(prepared.mask_float_nodes)
    cap = fallback_cap(len(selectable), tc.max_float_nodes, tc.max_float_fraction)
    if cap == 0:
        return {"fallback_cap": 0}
    ranked = [e for e in node_errors(reference, qdq, _head(tuning, tc.refine_samples), threads=threads)
              if e.node in selectable]
    order = [e.node for e in ranked]
    fallback_info = {"fallback_cap": cap, "fallback_ranking": tc.fallback_ranking,
                     "ranking": [{"node": e.node, "op_type": e.op_type, "module": e.module,
                                  "added_snr_db": round(e.added_snr_db, 2)} for e in ranked]}
    if tc.fallback_ranking == "output" and ranked:
        shares, groups, noise = output_ranking(search, prepared, candidate, ranked, inferred)
        rows = {r["node"]: r for r in fallback_info["ranking"]}
        fallback_info.update(ranking=[{**rows[r["node"]], **r} for r in shares], ranking_groups=groups,
                             ranking_output_noise=noise)
        order = [r["node"] for r in shares]
    sensitivity = tc.sensitivity_candidates
    if sensitivity and not search.spent():
        # End-to-end sensitivity of the worst few: the score with each one alone in float.
        scores = {}
        for node in order[:sensitivity]:
            if search.spent():
                break
            trial = search.record("sensitivity", candidate, [node], prepared)
            scores[node] = trial.score
            if trial.passed:
                return fallback_info
        order = sorted(scores, key=lambda n: (-scores[n], order.index(n))) + [n for n in order if n not in scores]
        fallback_info["sensitivity"] = [{"node": n, "score": round(scores[n], 6)} for n in order if n in scores]
    limit = min(len(order), cap)
    passing: int | None = None
    failing = 0
    k = 1
    probed = {r["node"] for r in fallback_info.get("sensitivity", [])}
    if order and order[0] in probed:
        failing, k = 1, 2                          # k = 1 was a sensitivity trial, and it failed
    while k <= limit and not search.spent():       # grow: 1, 2, 4, ...
        if search.record("fallback", candidate, order[:k], prepared).passed:
            passing = k
            break
        failing = k
        k = min(k * 2, limit) if k < limit else limit + 1
    if passing is None and failing >= limit:
        fallback_info["fallback_capped"] = True
        say(f"  fallback: the criteria need more than {limit} float nodes, the most allowed "
            f"(quantize.tune.max_float_nodes / max_float_fraction); not falling back further")
    while passing is not None and passing - failing > 1 and not search.spent():   # narrow
        mid = (passing + failing) // 2
        if search.record("fallback", candidate, order[:mid], prepared).passed:
            passing = mid
        else:
            failing = mid
    return fallback_info


def tune(model_path: Path, inferred: onnx.ModelProto, calibration: Split, tuning: Split, config: QuantConfig,
         *, threads: int | None = None) -> TuneOutcome:
    start = time.perf_counter()
    tc = config.tune
    task = get_metadata(inferred).get("task", "text-embedding")
    scorer = _Scorer(inferred, tuning, task, threads, exact_qdq=config.preset in EXACT_QDQ_PRESETS)
    search = _Search(scorer, tc.criteria, tc.budget, threads)
    prepared_by_alpha = _grid_phase(search, inferred, calibration, config, threads)
    phase_seconds = {"grid": round(time.perf_counter() - start, 1)}
    for step in tc.refine:
        if search.best[0].passed or search.spent():
            break
        t0 = time.perf_counter()
        if step == "probability-offset":
            _offset_phase(search, inferred, calibration, config, threads, prepared_by_alpha)
        elif step == "channel-shift":
            _shift_phase(search, inferred, calibration, config, threads, prepared_by_alpha)
        elif step == "weight-rounding":
            _rounding_phase(search)
        elif step == "group-alpha":
            _group_alpha_phase(search, inferred, calibration, config, threads, prepared_by_alpha)
        elif step == "tensor-method":
            _tensor_method_phase(search, config, tuning, threads)
        elif step == "bias-correction":
            _bias_phase(search)
        phase_seconds[step] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    fallback_info = _fallback_phase(search, tuning, tc, threads, inferred)
    phase_seconds["fallback"] = round(time.perf_counter() - t0, 1)
    trials = search.trials

    chosen, prepared = search.best
    c = chosen.candidate
    out_config = copy.deepcopy(config)
    out_config.method = c.method
    if c.percentile is not None:
        out_config.percentile = c.percentile
    out_config.smoothquant.alpha = c.alpha
    out_config.tensor_methods = dict(c.tensor_methods)
    out_config.bias_correction = c.bias_correction
    out_config.probability_offset = c.offset
    out_config.smoothquant.shift = c.shift
    out_config.weight_rounding = c.weight_rounding
    log = {"criteria": dict(tc.criteria), "met": chosen.passed, "budget": tc.budget, "trials_run": len(trials),
           "chosen": chosen.to_dict(), "tuning_data": tuning.summary(),
           "scoring": "exact Q/DQ" if scorer.exact_qdq else "ONNX Runtime's fused CPU kernels",
           "seconds": round(time.perf_counter() - start, 1),
           "phase_seconds": phase_seconds, "trials": [t.to_dict() for t in trials], **search.info, **fallback_info}
    if not chosen.passed:
        why = (f"with at most {fallback_info['fallback_cap']} float nodes" if fallback_info.get("fallback_capped")
               else f"within {tc.budget} trials" if search.spent() else f"in {len(trials)} trials")
        say(f"  tuning: the criteria were not met {why}; using the best trial (#{chosen.index})")
    return TuneOutcome(out_config, prepared, list(chosen.float_nodes), log)
