"""Static INT8 as explicit QuantizeLinear/DequantizeLinear (the only INT8 TensorRT 11 takes).

deploykit collects activation ranges itself (``deploykit.calib.calibrators``: robust to the
attention mask's -inf / finfo.min values, seeded data, deterministic), then hands the ranges
to ONNX Runtime's ``QDQQuantizer``, which places the Q/DQ pairs and quantizes the weights
per channel. Tensors that carry mask sentinels or non-finite values are never quantized:
every quantizable node that touches one stays in float and is listed in the result.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import deploykit
from deploykit.calib.calibrators import METHODS, CalibrationConfig, RangeCollector, TensorRange
from deploykit.data import Split, iterate_batches
from deploykit.errors import UserError
from deploykit.io import atomic_path, refuse_overwriting_inputs, write_json
from deploykit.onnx_utils import get_metadata, graph_input_names, load_onnx, set_metadata
from deploykit.progress import track

ACTIVATION_TYPES = ("int8", "uint8")


@dataclass
class QuantConfig:
    method: str = "percentile"                 # minmax | percentile | entropy
    percentile: float = 99.99
    num_bins: int = 2048
    op_types: list[str] = field(default_factory=lambda: ["MatMul", "Gemm"])
    nodes_to_exclude: list[str] = field(default_factory=list)
    nodes_to_quantize: list[str] = field(default_factory=list)   # empty: every node of op_types
    per_channel: bool = True
    activation_type: str = "int8"              # int8 (TensorRT) | uint8 (x86 ORT)
    activation_symmetric: bool = True          # zero point 0: what TensorRT requires
    batch_size: int = 16
    sentinel_abs: float = 1e30

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown calibration method '{self.method}'", fix=f"use one of {', '.join(METHODS)}")
        if self.activation_type not in ACTIVATION_TYPES:
            raise UserError(f"unknown activation type '{self.activation_type}'", fix="use int8 or uint8")
        if not self.op_types:
            raise UserError("quantize.op_types is empty", fix="list the op types to quantize, e.g. [MatMul, Gemm]")
        if self.batch_size < 1:
            raise UserError("quantize.batch_size must be >= 1", fix="set a positive batch size")

    def calibration_config(self) -> CalibrationConfig:
        levels = 128 if self.activation_type == "int8" or self.activation_symmetric else 256
        return CalibrationConfig(method=self.method, percentile=self.percentile, num_bins=self.num_bins,
                                 symmetric=self.activation_symmetric, num_quant_levels=levels,
                                 sentinel_abs=self.sentinel_abs)


@dataclass
class CalibrationResult:
    path: Path
    ranges_path: Path
    config: QuantConfig
    ranges: dict[str, TensorRange]
    quantized_nodes: list[str]
    float_nodes: list[str]           # quantizable by op type but kept in float (mask sentinels / user)
    masked_tensors: list[str]
    qdq_counts: dict[str, int]
    seconds: float
    data_sha256: str

    def summary(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "ranges": str(self.ranges_path), "method": self.config.method,
            "percentile": self.config.percentile if self.config.method == "percentile" else None,
            "op_types": self.config.op_types, "per_channel": self.config.per_channel,
            "activation_type": self.config.activation_type, "activation_symmetric": self.config.activation_symmetric,
            "calibrated_tensors": len(self.ranges), "masked_tensors": self.masked_tensors,
            "quantized_nodes": len(self.quantized_nodes), "float_nodes": self.float_nodes,
            "qdq": self.qdq_counts, "seconds": round(self.seconds, 2), "data_sha256": self.data_sha256,
        }


def _is_float(value_types: dict[str, int], name: str) -> bool:
    return value_types.get(name) in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    types = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def select_nodes(model: onnx.ModelProto, config: QuantConfig) -> list[onnx.NodeProto]:
    names = [n.name for n in model.graph.node]
    for wanted in list(config.nodes_to_exclude) + list(config.nodes_to_quantize):
        if wanted not in names:
            import difflib

            close = difflib.get_close_matches(wanted, names, n=3, cutoff=0.5)
            raise UserError(f"node '{wanted}' is not in the model",
                            fix=f"did you mean {', '.join(close)}?" if close else
                            "use node names of the ONNX graph (e.g. as shown by Netron or onnx.load)")
    chosen = []
    for node in model.graph.node:
        if node.op_type not in config.op_types or node.name in config.nodes_to_exclude:
            continue
        if config.nodes_to_quantize and node.name not in config.nodes_to_quantize:
            continue
        chosen.append(node)
    return chosen


def tensors_to_calibrate(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> list[str]:
    """Float activations (not weights or constants) entering or leaving the chosen nodes."""
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    types = _value_types(model)
    seen: dict[str, None] = {}
    for node in nodes:
        for name in list(node.input) + list(node.output):
            if name and name not in constants and _is_float(types, name):
                seen.setdefault(name, None)
    return list(seen)


def _augmented_session(model: onnx.ModelProto, tensors: list[str], threads: int | None):
    import onnxruntime as ort

    from deploykit.runners import default_threads

    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    existing = {o.name for o in augmented.graph.output}
    inputs = set(graph_input_names(augmented))
    types = _value_types(model)
    for name in tensors:
        if name not in existing and name not in inputs:
            augmented.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # No graph fusion while collecting: every calibrated tensor must exist as computed.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(augmented.SerializeToString(), options, providers=["CPUExecutionProvider"])


def collect_ranges(model: onnx.ModelProto, tensors: list[str], split: Split, config: QuantConfig,
                   threads: int | None = None) -> dict[str, TensorRange]:
    session = _augmented_session(model, tensors, threads)
    input_names = [i.name for i in session.get_inputs()]
    missing = [n for n in input_names if n not in split.feeds]
    if missing:
        raise UserError(f"the calibration data lacks model input(s) {missing}; it has {sorted(split.feeds)}",
                        fix="calibrate with data prepared for this model")
    out_names = [o.name for o in session.get_outputs()]
    wanted = [t for t in tensors if t in out_names or t in input_names]
    collector = RangeCollector(config.calibration_config())
    n_batches = -(-split.count // config.batch_size)

    def one_pass(observe, label):
        for feeds in track(iterate_batches(split.feeds, config.batch_size), total=n_batches, description=label):
            outputs = dict(zip(out_names, session.run(out_names, {n: feeds[n] for n in input_names})))
            for name in wanted:
                observe(name, outputs[name] if name in outputs else feeds[name])

    one_pass(collector.observe, f"calibrating ({config.method}): ranges")
    if collector.needs_second_pass:
        one_pass(collector.observe_second, f"calibrating ({config.method}): histograms")
    return collector.compute()


def _qtype(name: str):
    from onnxruntime.quantization import QuantType

    return {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[name]


def quantize_with_ranges(model: onnx.ModelProto, ranges: dict[str, TensorRange], nodes: list[onnx.NodeProto],
                         float_nodes: list[str], config: QuantConfig) -> onnx.ModelProto:
    """Insert Q/DQ into ``model`` (shape-inferred; modified in place) with the given ranges."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    data = {name: TensorData(lowest=np.float32(r.lo), highest=np.float32(r.hi))
            for name, r in ranges.items() if not r.masked}
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # ORT's quantizer logs advice meant for quantize_static users
    try:
        quantizer = QDQQuantizer(
            model, config.per_channel, False, _qtype("int8"), _qtype(config.activation_type),
            TensorsData(CalibrationMethod.MinMax, data),
            [n.name for n in nodes if n.name not in float_nodes],  # nodes_to_quantize
            list(float_nodes) + list(config.nodes_to_exclude),       # nodes_to_exclude
            list(config.op_types),
            {"ActivationSymmetric": config.activation_symmetric, "WeightSymmetric": True,
             # One Q/DQ pair per consuming node: a node kept in float then really reads the
             # float tensor even when a quantized node shares its input.
             "DedicatedQDQPair": True},
        )
        quantizer.quantize_model()
    finally:
        root.setLevel(level)
    quantizer.model.topological_sort()  # what ORT's own save step does before writing
    return quantizer.model.model


def calibrate(model_path: str | Path, split: Split, out_path: str | Path, config: QuantConfig | None = None,
              *, threads: int | None = None) -> CalibrationResult:
    """Calibrate ``model_path`` on ``split`` and write the Q/DQ model to ``out_path``.

    The ranges, with the calibration data's hash, go to ``<out_path stem>.ranges.json``.
    """
    config = config or QuantConfig()
    config.validate()
    model_path, out_path = Path(model_path), Path(out_path)
    refuse_overwriting_inputs(out_path, (model_path,))
    start = time.perf_counter()
    model = load_onnx(model_path)
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        raise UserError("the model is already quantized (it has Q/DQ nodes)", path=model_path,
                        fix="calibrate the FP32 export, not an INT8 model")
    from onnxruntime.quantization.quant_utils import load_model_with_shape_infer

    inferred = load_model_with_shape_infer(model_path)
    nodes = select_nodes(inferred, config)
    if not nodes:
        raise UserError(f"no node of type {config.op_types} to quantize", path=model_path,
                        fix="check quantize.op_types / nodes_to_quantize against the graph")
    tensors = tensors_to_calibrate(inferred, nodes)
    ranges = collect_ranges(inferred, tensors, split, config, threads)
    masked = sorted(name for name, r in ranges.items() if r.masked)
    masked_set = set(masked)
    float_nodes = sorted(n.name for n in nodes if masked_set.intersection(list(n.input) + list(n.output)))
    quantized = quantize_with_ranges(inferred, ranges, nodes, float_nodes, config)
    meta = get_metadata(model)
    set_metadata(quantized, {**meta, "variant": config.activation_type,
                             "version": deploykit.__version__,
                             "calibration": {"method": config.method, "data_sha256": split.sha256,
                                             "samples": split.count}})
    onnx.checker.check_model(quantized)
    with atomic_path(out_path, inputs=(model_path,)) as tmp_path:
        onnx.save_model(quantized, str(tmp_path))
    qdq = {op: sum(1 for n in quantized.graph.node if n.op_type == op) for op in ("QuantizeLinear", "DequantizeLinear")}
    quantized_nodes = [n.name for n in nodes if n.name not in float_nodes]
    ranges_path = out_path.with_name(out_path.stem + ".ranges.json")
    result = CalibrationResult(path=out_path, ranges_path=ranges_path, config=config, ranges=ranges,
                               quantized_nodes=quantized_nodes, float_nodes=float_nodes, masked_tensors=masked,
                               qdq_counts=qdq, seconds=time.perf_counter() - start, data_sha256=split.sha256)
    write_json(ranges_path, {"model": str(model_path), "quantized_model": str(out_path),
                             "data": {"sha256": split.sha256, "samples": split.count},
                             "config": asdict(config), "tensors": {k: r.to_dict() for k, r in ranges.items()}},
               inputs=(model_path,))
    return result
