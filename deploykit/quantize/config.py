"""What a calibration is asked for: :class:`QuantConfig` (preset, method, node selection,
activation form), with its SmoothQuant and tuning parts; a preset fills in what the user left unset."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

from deploykit.calib.calibrators import METHODS, CalibrationConfig
from deploykit.errors import UserError
from deploykit.presets import PRESETS

ACTIVATION_TYPES = ("int8", "uint8")
# How the tuner orders the nodes it may keep in float (TuneConfig.fallback_ranking).
FALLBACK_RANKINGS = ("added", "output")
# Where a SmoothQuant group sits in its block (see deploykit.quantize.smoothquant).
GROUP_KINDS = ("attention-in", "attention-out", "mlp-in", "mlp-out")
# Steps the tuner tries on its best configuration before it falls any node back to float
# (see deploykit.quantize.tune); each is kept only when it raises the tuning score.
REFINE_STEPS = ("probability-offset", "channel-shift", "weight-rounding", "tensor-method", "bias-correction",
                "group-alpha")
WEIGHT_ROUNDINGS = ("nearest", "gptq")


@dataclass
class SmoothQuantConfig:
    # None: no smoothing; a number: one strength for every group; a mapping: one per group kind
    # (attention-in, attention-out, mlp-in, mlp-out; a kind left out or None is not smoothed)
    alpha: float | dict[str, float | None] | None = None
    targets: str = "ln-fed"             # ln-fed (Linears fed by a LayerNorm) | all (every MatMul)
    # Centre each channel before scaling it (x - c, c the middle of its range), the MatMuls'
    # biases absorbing c W: one-sided channels then use the whole symmetric int8 range.
    shift: bool = False


@dataclass
class TuneConfig:
    """Accuracy-driven search; criteria are checked on a tuning split disjoint from evaluation."""
    enabled: bool = False
    criteria: dict[str, str] = field(default_factory=lambda: {"cosine_mean": ">= 0.995",
                                                              "nn_agreement": ">= 0.95"})
    budget: int = 40                    # trials (one trial = build a Q/DQ model and score it)
    methods: list[str] = field(default_factory=lambda: ["percentile", "entropy", "mse"])
    percentiles: list[float] = field(default_factory=lambda: [99.9, 99.99, 99.999])
    alphas: list[float | None] = field(default_factory=lambda: [None, 0.5, 0.65, 0.8])
    samples: int = 500                  # size of the tuning split
    # The fallback stops at this many float nodes, and at max_float_fraction of the quantizable
    # ones (whichever is lower): a model mostly in float is not a W8A8 model, whatever its
    # accuracy, so the tuner reports the criteria as not met rather than "pass" that way.
    max_float_nodes: int | None = None
    max_float_fraction: float = 0.125
    # Tried in the listed order on the best configuration so far, before any fallback:
    #   probability-offset: P·V as ½(2P−1)·V + ½ΣV, so the int8 P spans [−1, 1]
    #                    (deploykit.quantize.probabilities; symmetric int8 activations only)
    #   channel-shift:   SmoothQuant centres each channel before scaling it (smoothquant.shift;
    #                    deploykit.quantize.shift)
    #   weight-rounding: int8 weights rounded by GPTQ on the calibration inputs instead of to
    #                    the nearest grid point (weight_rounding; deploykit.quantize.rounding)
    #   tensor-method:   each activation tensor's range from the method (of the grid's, or minmax)
    #                    that adds the least error at the output of the nodes reading it
    #   bias-correction: each quantized Linear's bias absorbs the mean output shift quantization adds
    #   group-alpha:     SmoothQuant strength per group kind (from group_alphas, None = off)
    refine: list[str] = field(default_factory=lambda: list(REFINE_STEPS))
    group_alphas: list[float | None] = field(default_factory=lambda: [None, 0.5, 0.65, 0.8, 0.9])
    refine_samples: int = 64            # tuning samples the per-node errors are measured on
    # Fallback order: the nodes adding the most error on their own (per-node added error), of
    # which the first `sensitivity_candidates` are re-ranked by what keeping each one alone in
    # float does to the criteria on the whole tuning split (one trial each; 0: added error only).
    sensitivity_candidates: int = 0
    # How the fallback orders the nodes before those trials:
    #   added:  by the error each node adds to its own output (noise relative to that output)
    #   output: by the share of the model output's error each node is estimated to carry: each
    #           group of nodes of one kind (Q/K/V, attention-out, FFN-in, FFN-out, Q·Kᵀ, P·V)
    #           is kept in float once and what that removes at the output (1 − cosine) is split
    #           among its nodes by the mean square of the error each adds (one build and one
    #           scoring of the tuning split per group, not counted as trials)
    fallback_ranking: str = "added"


@dataclass
class QuantConfig:
    preset: str | None = None                  # gpu-trt | cpu-ort | paper-w8a8 (None: gpu-trt)
    method: str | None = None                  # minmax | running-minmax | percentile | entropy | mse (None: the preset's)
    percentile: float = 99.99
    num_bins: int = 2048
    op_types: list[str] | None = None          # None: the preset's
    output_op_types: list[str] | None = None   # of those, the ones whose outputs get Q/DQ too (None: the preset's)
    residual_adds: bool = False                # also quantize residual Adds (two activation inputs)
    layernorm: bool = False                    # also quantize LayerNormalization inputs
    nodes_to_exclude: list[str] = field(default_factory=list)
    nodes_to_quantize: list[str] = field(default_factory=list)   # empty: every selected node
    per_channel: bool | None = None            # None: the preset's
    activation_type: str | None = None         # None: the preset's (int8 | uint8)
    activation_symmetric: bool | None = None   # None: the preset's
    plugin_int8: bool | None = None            # Q -> op -> DQ around deploykit attention ops (None: the preset's)
    # Gather-fed embedding tables as int8 with per-row scales (deploykit.quantize.embeddings):
    # true = the preset's form, false = keep them float, or a form (dq-gather | gather-mul |
    # gather-block). None: the preset's.
    embeddings: bool | str | None = None
    batch_size: int = 16
    sentinel_abs: float = 1e30
    bias_correction: bool = False              # Linear biases absorb the mean shift quantization adds
    # P·V as ½(2P−1)·V + ½ΣV so the softmax output spans the whole symmetric int8 range
    # (deploykit.quantize.probabilities); exact in float, half the rounding step on P.
    probability_offset: bool = False
    # nearest | gptq: int8 MatMul weights rounded to keep each Linear's output on the calibration
    # inputs (deploykit.quantize.rounding) rather than each weight, on the same scales
    weight_rounding: str = "nearest"
    tensor_methods: dict[str, str] = field(default_factory=dict)   # tensor -> "method" | "percentile:P"
    smoothquant: SmoothQuantConfig = field(default_factory=SmoothQuantConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def resolved(self, default_preset: str = "gpu-trt") -> QuantConfig:
        """A copy with the preset's defaults filled in where the user set nothing."""
        preset = self.preset or default_preset
        if preset not in PRESETS:
            raise UserError(f"unknown quantization preset '{preset}'", fix=f"use one of {', '.join(PRESETS)}")
        out = copy.deepcopy(self)
        out.preset = preset
        for key, value in PRESETS[preset].items():
            if getattr(out, key) is None:
                setattr(out, key, copy.deepcopy(value))
        if out.embeddings is True:
            out.embeddings = PRESETS[preset].get("embeddings") or "dq-gather"
        out.validate()
        return out

    def validate(self) -> None:
        if self.method is not None and self.method not in METHODS:
            raise UserError(f"unknown calibration method '{self.method}'", fix=f"use one of {', '.join(METHODS)}")
        if self.activation_type is not None and self.activation_type not in ACTIVATION_TYPES:
            raise UserError(f"unknown activation type '{self.activation_type}'", fix="use int8 or uint8")
        if self.plugin_int8 and (self.activation_type != "int8" or not self.activation_symmetric):
            raise UserError("quantize.plugin_int8 needs symmetric int8 activations (a plugin's INT8 form)",
                            fix="use the gpu-trt preset, or set plugin_int8: false")
        if isinstance(self.embeddings, str):
            from deploykit.quantize.embeddings import FORMS

            if self.embeddings not in FORMS:
                raise UserError(f"unknown quantize.embeddings form '{self.embeddings}'",
                                fix=f"use true, false or one of {', '.join(FORMS)}")
        if self.weight_rounding not in WEIGHT_ROUNDINGS:
            raise UserError(f"unknown quantize.weight_rounding '{self.weight_rounding}'",
                            fix=f"use {' or '.join(WEIGHT_ROUNDINGS)}")
        if self.weight_rounding == "gptq" and self.bias_correction:
            raise UserError("quantize.bias_correction and weight_rounding: gptq do not combine: GPTQ fits the "
                            "calibration inputs, so their mean shift no longer stands for new data",
                            fix="choose one of them (docs/quantization.md has both measured)")
        if self.op_types is not None and not self.op_types:
            raise UserError("quantize.op_types is empty", fix="list the op types to quantize, e.g. [MatMul, Gemm]")
        if self.batch_size < 1:
            raise UserError("quantize.batch_size must be >= 1", fix="set a positive batch size")
        alpha = self.smoothquant.alpha
        for kind, a in (alpha.items() if isinstance(alpha, dict) else [("", alpha)]):
            if kind and kind not in GROUP_KINDS:
                raise UserError(f"unknown SmoothQuant group kind '{kind}' in quantize.smoothquant.alpha",
                                fix=f"use {', '.join(GROUP_KINDS)}")
            if a is not None and not 0.0 <= a <= 1.0:
                raise UserError(f"quantize.smoothquant.alpha {a} is outside [0, 1]", fix="use e.g. 0.5 to 0.9")
        for a in self.tune.group_alphas:
            if a is not None and not 0.0 <= a <= 1.0:
                raise UserError(f"quantize.tune.group_alphas: {a} is outside [0, 1]", fix="use e.g. 0.5 to 0.9")
        for step in self.tune.refine:
            if step not in REFINE_STEPS:
                raise UserError(f"unknown step '{step}' in quantize.tune.refine", fix=f"use {', '.join(REFINE_STEPS)}")
        for tensor, spec in self.tensor_methods.items():
            method, _, pct = str(spec).partition(":")
            if method not in METHODS or (pct and method != "percentile"):
                raise UserError(f"quantize.tensor_methods: '{spec}' for {tensor} is not a method",
                                fix=f"use {', '.join(METHODS)} or percentile:<P>")
        for m in self.tune.methods:
            if m not in METHODS:
                raise UserError(f"unknown method '{m}' in quantize.tune.methods", fix=f"use {', '.join(METHODS)}")
        if not 0.0 < self.tune.max_float_fraction <= 1.0:
            raise UserError(f"quantize.tune.max_float_fraction {self.tune.max_float_fraction} is outside (0, 1]",
                            fix="use e.g. 0.125 (at most one node in eight falls back)")
        if self.tune.max_float_nodes is not None and self.tune.max_float_nodes < 0:
            raise UserError("quantize.tune.max_float_nodes is negative", fix="use 0 or more (0: no fallback)")
        if self.tune.fallback_ranking not in FALLBACK_RANKINGS:
            raise UserError(f"unknown quantize.tune.fallback_ranking '{self.tune.fallback_ranking}'",
                            fix=f"use {' or '.join(FALLBACK_RANKINGS)}")
        if self.tune.budget < 1 or self.tune.samples < 8:
            raise UserError("quantize.tune needs budget >= 1 and samples >= 8", fix="raise tune.budget / tune.samples")

    def calibration_config(self, method: str | None = None, percentile: float | None = None) -> CalibrationConfig:
        symmetric = bool(self.activation_symmetric)
        return CalibrationConfig(method=method or self.method,
                                 percentile=self.percentile if percentile is None else percentile,
                                 num_bins=self.num_bins, symmetric=symmetric,
                                 num_quant_levels=128 if symmetric else 256, sentinel_abs=self.sentinel_abs)

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("tune", "sentinel_abs", "num_bins")}
        if self.method != "percentile":
            out.pop("percentile")
        return out
