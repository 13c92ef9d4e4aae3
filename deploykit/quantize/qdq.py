"""From an FP32 graph to a Q/DQ model: which nodes are quantized, their calibration statistics
(:func:`prepare`, optionally after SmoothQuant) and the Q/DQ placement by ONNX Runtime's
``QDQQuantizer`` (:func:`build_qdq`), with mask-touching and fallen-back nodes kept in float."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from deploykit.calib.calibrators import RangeCollector, TensorRange
from deploykit.data import Split
from deploykit.errors import UserError
from deploykit.onnx_utils import load_onnx
from deploykit.plugins import DOMAIN, INT8_FORMS
from deploykit.quantize.config import QuantConfig
from deploykit.quantize.graph import constant_names, is_float, iterate_activations, value_types
from deploykit.quantize.plugin_int8 import fold_into_plugins


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
    smooth_stats: dict[str, np.ndarray] | None = None   # per-channel [min, max], reusable for another alpha
    calibration: Split | None = None            # the data the statistics came from (bias correction)
    offsets: list[dict[str, Any]] = field(default_factory=list)   # P·V products rewritten (probabilities)
    # per MatMul input: the second moment its int8 weight meets (deploykit.quantize.rounding),
    # gathered on the first GPTQ build and shared by every later build of this graph
    weight_grams: dict[bool, dict[str, np.ndarray]] = field(default_factory=dict)   # by compensation

    def ranges(self, method: str | None = None, percentile: float | None = None,
               tensor_methods: dict[str, str] | None = None) -> dict[str, TensorRange]:
        """Every tensor's range by ``method``, except those ``tensor_methods`` gives their own
        (``"mse"``, ``"percentile:99.99"``, ...)."""
        out = self.collector.compute(self.config.calibration_config(method, percentile))
        by_spec: dict[str, list[str]] = {}
        for tensor, spec in (tensor_methods or {}).items():
            if tensor in out:
                by_spec.setdefault(spec, []).append(tensor)
        for spec, tensors in sorted(by_spec.items()):
            m, _, pct = spec.partition(":")
            other = self.collector.compute(self.config.calibration_config(m, float(pct) if pct else None))
            out.update({t: other[t] for t in tensors})
        return out


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


def prepare(inferred: onnx.ModelProto, split: Split, config: QuantConfig, *,
            alpha: float | dict[str, float | None] | None = None,
            smooth_stats: dict[str, np.ndarray] | None = None, threads: int | None = None,
            where: str | Path = "", offset: bool | None = None, shift: bool | None = None) -> Prepared:
    """Smooth (if ``alpha``; centring each channel if ``shift``, by default
    ``config.smoothquant.shift``), offset the attention probabilities (if ``offset``, by default
    ``config.probability_offset``), select nodes, collect statistics over ``split``."""
    model, smoothing, offsets = inferred, [], []
    if alpha is not None:
        from deploykit.quantize.smoothquant import smooth

        model, smoothing, smooth_stats = smooth(inferred, split, alpha, targets=config.smoothquant.targets,
                                                exclude_nodes=tuple(config.nodes_to_exclude),
                                                batch_size=config.batch_size, threads=threads, stats=smooth_stats,
                                                shift=config.smoothquant.shift if shift is None else shift)
        model = onnx.shape_inference.infer_shapes(model)
    if config.probability_offset if offset is None else offset:
        from deploykit.quantize.probabilities import offset_probabilities

        model, offsets = offset_probabilities(model)
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
    return Prepared(model, config, nodes, collector, masked, mask_float, smoothing, smooth_stats, split, offsets)


def _qtype(name: str):
    from onnxruntime.quantization import QuantType

    return {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[name]


def float_reference(prepared: Prepared, ranges: dict[str, TensorRange]
                    ) -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
    """The float graph the Q/DQ model of ``ranges`` is quantized from, and its smoothing
    records: ``prepared.model`` itself, or with SmoothQuant's channel shift the same function
    with each explicit offset on its tensor's int8 grid (:func:`deploykit.quantize.shift.snap_shifts`).
    Per-node errors and bias correction compare against this graph."""
    from deploykit.quantize.shift import has_explicit_shifts, snap_shifts

    if not has_explicit_shifts(prepared.smoothing):
        return prepared.model, prepared.smoothing
    return snap_shifts(prepared.model, prepared.smoothing, ranges, bool(prepared.config.activation_symmetric))


def build_qdq(prepared: Prepared, ranges: dict[str, TensorRange], float_nodes: list[str] = (),
              embedding_log: list[dict[str, Any]] | None = None, *,
              reference: tuple[onnx.ModelProto, list[dict[str, Any]]] | None = None,
              exact_shift_bias: bool = True, weight_rounding: str | None = None) -> onnx.ModelProto:
    """Q/DQ model from ``prepared`` with ``ranges``; ``float_nodes`` (and mask-touching nodes) stay
    float. With ``config.embeddings`` the embedding tables become int8 rows too; what was
    rewritten is appended to ``embedding_log``. It is quantized from ``reference`` (default
    :func:`float_reference`); with ``exact_shift_bias`` shifted groups' biases compensate with
    the int8 weights (:func:`deploykit.quantize.shift.compensate_weights`). ``weight_rounding``
    (default ``config.weight_rounding``) ``gptq`` re-rounds the int8 weights on the calibration
    inputs (:mod:`deploykit.quantize.rounding`), before the biases compensate with them."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    config = prepared.config
    base, records = reference or float_reference(prepared, ranges)
    keep_float = set(float_nodes) | set(prepared.mask_float_nodes)
    quantize = [n.name for n in prepared.nodes if n.name not in keep_float]
    if not quantize:
        model = onnx.ModelProto()
        model.CopyFrom(base)
        return _with_int8_embeddings(model, config, embedding_log)
    data = {name: TensorData(lowest=np.float32(r.lo), highest=np.float32(r.hi))
            for name, r in ranges.items() if not r.masked}
    model = onnx.ModelProto()
    model.CopyFrom(base)
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
    # shifted groups' biases compensate with the int8 weights, which then meet the uncentred input
    compensated = exact_shift_bias and any(r.get("shift") for r in records)
    if (weight_rounding or config.weight_rounding) == "gptq" and prepared.calibration is not None:
        from deploykit.quantize.rounding import round_weights

        round_weights(result, base, prepared.calibration, records=records if compensated else None,
                      grams=prepared.weight_grams.setdefault(compensated, {}), batch_size=config.batch_size)
    if compensated:
        from deploykit.quantize.shift import compensate_weights

        compensate_weights(result, base, records)
    if config.plugin_int8:
        fold_into_plugins(result)
    return _with_int8_embeddings(result, config, embedding_log)


def build_model(prepared: Prepared, ranges: dict[str, TensorRange], float_nodes: list[str] = (), *,
                bias_correction: bool = False, threads: int | None = None,
                embedding_log: list[dict[str, Any]] | None = None,
                bias_log: list[dict[str, Any]] | None = None,
                reference: tuple[onnx.ModelProto, list[dict[str, Any]]] | None = None,
                weight_rounding: str | None = None) -> onnx.ModelProto:
    """The Q/DQ model of one configuration: Q/DQ with ``ranges`` and ``float_nodes`` kept float
    (and int8 embedding tables where configured), then, with ``bias_correction``, biases
    corrected on the calibration data. What calibrate writes and what each tuning trial scores
    are built here alike. ``reference`` is :func:`float_reference` of ``ranges`` when the
    caller has it already."""
    reference = reference or float_reference(prepared, ranges)
    # bias correction measures the whole mean shift, the shifted groups' weight part included
    model = build_qdq(prepared, ranges, float_nodes, embedding_log, reference=reference,
                      exact_shift_bias=not bias_correction, weight_rounding=weight_rounding)
    if bias_correction:
        from deploykit.quantize.bias import correct_biases

        model, records = correct_biases(model, reference[0], prepared.calibration, threads=threads)
        if bias_log is not None:
            bias_log.extend(records)
    return model


def _with_int8_embeddings(model: onnx.ModelProto, config: QuantConfig,
                          log: list[dict[str, Any]] | None) -> onnx.ModelProto:
    if config.embeddings:
        from deploykit.quantize.embeddings import quantize_embeddings

        records = quantize_embeddings(model, str(config.embeddings))
        if log is not None:
            log.extend(records)
    return model


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
