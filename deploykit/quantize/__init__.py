"""Static INT8 as explicit QuantizeLinear/DequantizeLinear (the only INT8 TensorRT 11 takes).

deploykit collects activation statistics itself (``deploykit.calib.calibrators``: robust to
the attention mask's -inf / finfo.min values, deterministic), optionally smooths outlier
channels into the weights first (SmoothQuant, ``deploykit.quantize.smoothquant``), and hands
the ranges to ONNX Runtime's ``QDQQuantizer``, which places the Q/DQ pairs and quantizes the
weights per channel. Tensors that carry mask sentinels or non-finite values are never
quantized: every quantizable node that touches one stays in float and is listed.

Presets name the target's INT8 form:

``gpu-trt``  symmetric int8 activations (zero point 0) x per-channel int8 weights on
             MatMul/Gemm inputs; optionally residual Adds and LayerNorm inputs. TensorRT
             fuses DQ -> MatMul (-> bias Add) into int8 GEMMs. deploykit's attention ops
             (neighborhood, linear) get Q -> op -> DQ, their INT8 plugin form
             (``deploykit.quantize.plugin_int8``).
``cpu-ort``  asymmetric uint8 activations x per-channel int8 weights on MatMul/Gemm: what
             ONNX Runtime's x86 integer kernels run fastest.
``paper-w8a8``  the setting of Bondarenko et al. (2023), to compare like with like: symmetric
             per-tensor int8 weights, asymmetric per-tensor uint8 activations with running
             min-max ranges (momentum 0.9) on Linear outputs (every bias Add's output),
             LayerNorm inputs and outputs, residual sums, softmax input and output. A
             research setting (every activation rounded), not a deployment preset.

``calibrate`` runs one configuration, or with ``tune.enabled`` the accuracy-driven search
(``deploykit.quantize.tune``): calibration method x SmoothQuant alpha x falling back the
nodes with the worst quantization error to float, until the targets are met.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import deploykit
from deploykit.calib.calibrators import METHODS, CalibrationConfig, RangeCollector, TensorRange
from deploykit.data import Split
from deploykit.errors import UserError
from deploykit.io import atomic_paths, json_text, refuse_overwriting_inputs, sha256_file
from deploykit.onnx_utils import get_metadata, load_onnx, set_metadata
from deploykit.plugins import DOMAIN, INT8_FORMS
from deploykit.quantize.plugin_int8 import fold_into_plugins
from deploykit.quantize.graph import constant_names, is_float, iterate_activations, value_types
from deploykit.quantize.record import ranges_path_for

ACTIVATION_TYPES = ("int8", "uint8")
PRESETS: dict[str, dict[str, Any]] = {
    "gpu-trt": {"activation_type": "int8", "activation_symmetric": True, "op_types": ["MatMul", "Gemm"],
                "method": "percentile", "per_channel": True, "plugin_int8": True},
    "cpu-ort": {"activation_type": "uint8", "activation_symmetric": False, "op_types": ["MatMul", "Gemm"],
                "method": "percentile", "per_channel": True, "plugin_int8": False},
    # Q/DQ on the inputs of MatMul (LayerNorm, GELU and softmax outputs, Q/K/V), Softmax (its
    # input), LayerNormalization (residual sums) and Add, plus the *outputs* of Adds: the
    # bias Add closes every Linear, so each Linear output is rounded once, as in the paper.
    "paper-w8a8": {"activation_type": "uint8", "activation_symmetric": False,
                   "op_types": ["MatMul", "Gemm", "Add", "Softmax", "LayerNormalization"],
                   "output_op_types": ["Add"], "method": "running-minmax", "per_channel": False,
                   "plugin_int8": False},
}


@dataclass
class SmoothQuantConfig:
    alpha: float | None = None          # None: no smoothing
    targets: str = "ln-fed"             # ln-fed (Linears fed by a LayerNorm) | all (every MatMul)


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
    max_float_nodes: int | None = None  # give up falling back beyond this many nodes


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
    batch_size: int = 16
    sentinel_abs: float = 1e30
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
        if self.op_types is not None and not self.op_types:
            raise UserError("quantize.op_types is empty", fix="list the op types to quantize, e.g. [MatMul, Gemm]")
        if self.batch_size < 1:
            raise UserError("quantize.batch_size must be >= 1", fix="set a positive batch size")
        alpha = self.smoothquant.alpha
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise UserError(f"quantize.smoothquant.alpha {alpha} is outside [0, 1]", fix="use e.g. 0.5 to 0.9")
        for m in self.tune.methods:
            if m not in METHODS:
                raise UserError(f"unknown method '{m}' in quantize.tune.methods", fix=f"use {', '.join(METHODS)}")
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


# ----------------------------------------------------------------------------- node selection
def _residual_adds(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Adds of two activations (not a bias or mask constant): the residual connections."""
    constants = constant_names(model)
    return [n for n in model.graph.node
            if n.op_type == "Add" and len(n.input) == 2 and not constants.intersection(n.input)]


def select_nodes(model: onnx.ModelProto, config: QuantConfig) -> list[onnx.NodeProto]:
    names = [n.name for n in model.graph.node]
    for wanted in list(config.nodes_to_exclude) + list(config.nodes_to_quantize):
        if wanted not in names:
            import difflib

            close = difflib.get_close_matches(wanted, names, n=3, cutoff=0.5)
            raise UserError(f"node '{wanted}' is not in the model",
                            fix=f"did you mean {', '.join(close)}?" if close else
                            "use node names of the ONNX graph (e.g. as shown by Netron or onnx.load)")
    extra = {n.name for n in _residual_adds(model)} if config.residual_adds else set()
    op_types = set(config.op_types or []) | ({"LayerNormalization"} if config.layernorm else set())
    if config.plugin_int8:
        op_types |= set(INT8_FORMS)
    chosen = []
    for node in model.graph.node:
        if node.op_type not in op_types and node.name not in extra:
            continue
        if node.op_type in INT8_FORMS and node.domain != DOMAIN:
            continue
        if node.name in config.nodes_to_exclude:
            continue
        if config.nodes_to_quantize and node.name not in config.nodes_to_quantize:
            continue
        chosen.append(node)
    return chosen


def tensors_to_calibrate(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> list[str]:
    """Float activations (not weights or constants) entering or leaving the chosen nodes."""
    constants = constant_names(model)
    types = value_types(model)
    seen: dict[str, None] = {}
    for node in nodes:
        for name in list(node.input) + list(node.output):
            if name and name not in constants and is_float(types, name):
                seen.setdefault(name, None)
    return list(seen)


# ----------------------------------------------------------------------------- preparation
@dataclass
class Prepared:
    """A (possibly smoothed) FP32 graph with its calibration statistics collected: every
    method's ranges and any set of float nodes can be built from it without new passes."""
    model: onnx.ModelProto                      # shape-inferred, smoothed if alpha is set
    config: QuantConfig                         # resolved
    nodes: list[onnx.NodeProto]                 # selected for quantization
    collector: RangeCollector
    masked_tensors: list[str]
    mask_float_nodes: list[str]                 # nodes kept float because they touch a mask
    smoothing: list[dict[str, Any]] = field(default_factory=list)
    smooth_stats: dict[str, np.ndarray] | None = None   # per-channel max|x|, reusable for another alpha

    def ranges(self, method: str | None = None, percentile: float | None = None) -> dict[str, TensorRange]:
        return self.collector.compute(self.config.calibration_config(method, percentile))


def load_for_quantization(model_path: Path) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(model as stored, shape-inferred copy); refuses models that already hold Q/DQ."""
    model = load_onnx(model_path)
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        raise UserError("the model is already quantized (it has Q/DQ nodes)", path=model_path,
                        fix="calibrate the FP32 export, not an INT8 model")
    return model, _shape_inferred(model, model_path)


# protobuf refuses to serialise a model of 2 GiB or more in one piece.
_IN_MEMORY_LIMIT = 2**31 - 1


def _shape_inferred(model: onnx.ModelProto, model_path: Path) -> onnx.ModelProto:
    """A shape-inferred copy of ``model``, marked as ORT's quantizer expects (``onnx.infer``).

    In memory when the model fits in one protobuf; a larger one goes through a private
    temporary folder that is removed on every exit path. Nothing is written beside the input
    (ORT's own helper writes ``<model>-inferred.onnx`` there, which could delete a user's file
    of that name and collides when two calibrations of one model run at once)."""
    from onnxruntime.quantization.quant_utils import add_infer_metadata

    if model.ByteSize() < _IN_MEMORY_LIMIT:
        inferred = onnx.shape_inference.infer_shapes(model)
    else:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="deploykit-infer-") as tmp:
            out = Path(tmp) / "inferred.onnx"
            onnx.shape_inference.infer_shapes_path(str(model_path), str(out))
            inferred = onnx.load(str(out))
    add_infer_metadata(inferred)
    return inferred


def prepare(inferred: onnx.ModelProto, split: Split, config: QuantConfig, *, alpha: float | None = None,
            smooth_stats: dict[str, np.ndarray] | None = None, threads: int | None = None,
            where: str | Path = "") -> Prepared:
    """Smooth (if ``alpha``), select nodes, collect statistics over ``split``."""
    model, smoothing = inferred, []
    if alpha is not None:
        from deploykit.quantize.smoothquant import smooth

        model, smoothing, smooth_stats = smooth(inferred, split, alpha, targets=config.smoothquant.targets,
                                                exclude_nodes=tuple(config.nodes_to_exclude),
                                                batch_size=config.batch_size, threads=threads, stats=smooth_stats)
        model = onnx.shape_inference.infer_shapes(model)
    nodes = select_nodes(model, config)
    if not nodes:
        raise UserError(f"no node of type {config.op_types} to quantize", path=where,
                        fix="check quantize.op_types / nodes_to_quantize against the graph")
    tensors = tensors_to_calibrate(model, nodes)
    # Histograms (pass 2) serve every method but minmax; tuning may try any of them.
    histograms = config.method not in ("minmax", "running-minmax") or config.tune.enabled
    collector = RangeCollector(config.calibration_config("percentile" if histograms else "minmax"))
    for values in iterate_activations(model, tensors, split, config.batch_size, threads,
                                      description="calibrating: ranges"):
        for name, value in values.items():
            collector.observe(name, value)
    if histograms:
        for values in iterate_activations(model, tensors, split, config.batch_size, threads,
                                          description="calibrating: histograms"):
            for name, value in values.items():
                collector.observe_second(name, value)
    ranges = collector.compute(config.calibration_config("minmax"))
    masked = sorted(name for name, r in ranges.items() if r.masked)
    mask_set = set(masked)
    mask_float = sorted(n.name for n in nodes if mask_set.intersection(list(n.input) + list(n.output)))
    return Prepared(model, config, nodes, collector, masked, mask_float, smoothing, smooth_stats)


def _qtype(name: str):
    from onnxruntime.quantization import QuantType

    return {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[name]


def build_qdq(prepared: Prepared, ranges: dict[str, TensorRange], float_nodes: list[str] = ()) -> onnx.ModelProto:
    """Q/DQ model from ``prepared`` with ``ranges``; ``float_nodes`` (and mask-touching nodes) stay float."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    config = prepared.config
    keep_float = set(float_nodes) | set(prepared.mask_float_nodes)
    quantize = [n.name for n in prepared.nodes if n.name not in keep_float]
    if not quantize:
        model = onnx.ModelProto()
        model.CopyFrom(prepared.model)
        return model
    data = {name: TensorData(lowest=np.float32(r.lo), highest=np.float32(r.hi))
            for name, r in ranges.items() if not r.masked}
    model = onnx.ModelProto()
    model.CopyFrom(prepared.model)
    op_types = sorted({n.op_type for n in prepared.nodes})
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # ORT's quantizer logs advice meant for quantize_static users
    try:
        quantizer = QDQQuantizer(
            model, config.per_channel, False, _qtype("int8"), _qtype(config.activation_type),
            TensorsData(CalibrationMethod.MinMax, data), quantize,
            sorted(keep_float | set(config.nodes_to_exclude)), op_types,
            {"ActivationSymmetric": bool(config.activation_symmetric), "WeightSymmetric": True,
             # One Q/DQ pair per consuming node: a node kept in float then really reads the
             # float tensor even when a quantized node shares its input.
             "DedicatedQDQPair": True,
             # Q/DQ on the inputs of the ops that run in INT8, not on their outputs (ORT's
             # default adds both): TensorRT's placement, and no extra rounding of e.g. the
             # outlier-heavy FFN output before the residual Add.
             # deploykit's attention ops keep their output pair: it becomes Q -> op -> DQ.
             "OpTypesToExcludeOutputQuantization": [t for t in op_types if t not in (config.output_op_types or [])
                                                    and t not in INT8_FORMS]},
        )
        quantizer.quantize_model()
    finally:
        root.setLevel(level)
    quantizer.model.topological_sort()  # what ORT's own save step does before writing
    result = quantizer.model.model
    _restore_float_inputs(result, keep_float)
    if config.plugin_int8:
        fold_into_plugins(result)
    return result


def _restore_float_inputs(model: onnx.ModelProto, float_nodes: set[str]) -> None:
    """Give nodes that must stay float their float inputs back.

    ORT makes a dedicated Q/DQ pair per reader only when more than one *quantized* node
    reads a tensor; with a single quantized reader it rewires every reader of the tensor
    to the shared DequantizeLinear, float readers included.
    """
    from deploykit.quantize.graph import producers

    prod = producers(model)
    for node in model.graph.node:
        if node.name not in float_nodes:
            continue
        for k, name in enumerate(node.input):
            dq = prod.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = prod.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[k] = q.input[0]


# ----------------------------------------------------------------------------- calibrate
@dataclass
class CalibrationResult:
    path: Path
    ranges_path: Path
    config: QuantConfig
    ranges: dict[str, TensorRange]
    quantized_nodes: list[str]
    float_nodes: list[str]            # selected but kept in float (mask-touching, or fallen back by tuning)
    fallback_nodes: list[str]         # of those, the ones tuning fell back
    masked_tensors: list[str]
    qdq_counts: dict[str, int]
    seconds: float
    data_sha256: str
    smoothing: list[dict[str, Any]] = field(default_factory=list)
    tuning: dict[str, Any] | None = None
    plugin_int8_nodes: list[str] = field(default_factory=list)   # attention ops in their INT8 form

    def summary(self) -> dict[str, Any]:
        c = self.config
        out = {
            "path": str(self.path), "ranges": str(self.ranges_path), "preset": c.preset, "method": c.method,
            "percentile": c.percentile if c.method == "percentile" else None,
            "smoothquant_alpha": c.smoothquant.alpha, "smoothquant_targets": c.smoothquant.targets,
            "smoothed_groups": len(self.smoothing),
            "smoothing_folds": {k: sum(1 for g in self.smoothing if g["fold"] == k)
                                for k in ("layernorm", "linear", "mul")},
            "op_types": c.op_types, "residual_adds": c.residual_adds, "layernorm": c.layernorm,
            "per_channel": c.per_channel, "activation_type": c.activation_type,
            "activation_symmetric": c.activation_symmetric,
            "calibrated_tensors": len(self.ranges), "masked_tensors": self.masked_tensors,
            "quantized_nodes": len(self.quantized_nodes), "float_nodes": self.float_nodes,
            "fallback_nodes": self.fallback_nodes, "float_fallback_count": len(self.fallback_nodes),
            "plugin_int8": c.plugin_int8, "plugin_int8_nodes": self.plugin_int8_nodes,
            "qdq": self.qdq_counts, "seconds": round(self.seconds, 2), "data_sha256": self.data_sha256,
        }
        if self.tuning is not None:
            out["tuning"] = {k: v for k, v in self.tuning.items() if k != "trials"}
        return out


def calibrate(model_path: str | Path, split: Split, out_path: str | Path, config: QuantConfig | None = None,
              *, threads: int | None = None, tuning_split: Split | None = None,
              default_preset: str = "gpu-trt") -> CalibrationResult:
    """Calibrate ``model_path`` on ``split`` and write the Q/DQ model to ``out_path``.

    With ``config.tune.enabled`` the accuracy-driven search runs first, scored on
    ``tuning_split`` against the FP32 model's own outputs. The ranges, with the calibration
    data's hash, go to ``<out_path stem>.ranges.json``.
    """
    config = (config or QuantConfig()).resolved(default_preset)
    model_path, out_path = Path(model_path), Path(out_path)
    refuse_overwriting_inputs(out_path, (model_path,))
    start = time.perf_counter()
    model, inferred = load_for_quantization(model_path)
    tuning = None
    fallback: list[str] = []
    if config.tune.enabled:
        if tuning_split is None:
            raise UserError("quantize.tune is enabled but no tuning data was given",
                            fix="give a tuning split (deploykit run and calibrate --tune make one)")
        from deploykit.quantize.tune import tune

        outcome = tune(model_path, inferred, split, tuning_split, config, threads=threads)
        config, prepared, fallback, tuning = outcome.config, outcome.prepared, outcome.float_nodes, outcome.log
    else:
        prepared = prepare(inferred, split, config, alpha=config.smoothquant.alpha, threads=threads, where=model_path)
    ranges = prepared.ranges(config.method, config.percentile)   # the tuned choice, if tuning ran
    quantized = build_qdq(prepared, ranges, fallback)
    custom = sorted({n.op_type for n in quantized.graph.node if n.domain == DOMAIN})
    plugin_nodes = sorted(n.name for n in quantized.graph.node
                          if n.domain == DOMAIN and n.op_type in INT8_FORMS.values())
    set_metadata(quantized, {**get_metadata(model), "variant": "int8", **({"custom_ops": custom} if custom else {}),
                             "version": deploykit.__version__,
                             "calibration": {"preset": config.preset, "method": config.method,
                                             "smoothquant_alpha": config.smoothquant.alpha,
                                             "float_fallback": len(fallback),
                                             "data_sha256": split.sha256, "samples": split.count}})
    onnx.checker.check_model(quantized, full_check=bool(custom))   # full: types through the local functions
    qdq = {op: sum(1 for n in quantized.graph.node if n.op_type == op) for op in ("QuantizeLinear", "DequantizeLinear")}
    float_nodes = sorted(set(prepared.mask_float_nodes) | set(fallback))
    quantized_nodes = [n.name for n in prepared.nodes if n.name not in float_nodes]
    ranges_path = ranges_path_for(out_path)
    # The model and its ranges are one result: both are renamed into place together, or neither.
    with atomic_paths(out_path, ranges_path, inputs=(model_path,)) as (tmp_model, tmp_ranges):
        onnx.save_model(quantized, str(tmp_model))
        tmp_ranges.write_text(json_text({
            "model": str(model_path), "model_sha256": sha256_file(model_path),
            "quantized_model": str(out_path), "quantized_model_sha256": sha256_file(tmp_model),
            "data": {"sha256": split.sha256, "samples": split.count},
            "config": config.summary(), "smoothing": prepared.smoothing,
            "float_nodes": float_nodes, "tensors": {k: r.to_dict() for k, r in ranges.items()}}), encoding="utf-8")
    result = CalibrationResult(path=out_path, ranges_path=ranges_path, config=config, ranges=ranges,
                               quantized_nodes=quantized_nodes, float_nodes=float_nodes, fallback_nodes=fallback,
                               masked_tensors=prepared.masked_tensors, qdq_counts=qdq,
                               seconds=time.perf_counter() - start, data_sha256=split.sha256,
                               smoothing=prepared.smoothing, tuning=tuning, plugin_int8_nodes=plugin_nodes)
    return result
