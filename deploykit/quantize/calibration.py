"""``calibrate``: one static INT8 calibration from an FP32 ONNX file to its Q/DQ model and
ranges file, or with ``tune.enabled`` the accuracy-driven search first (:mod:`deploykit.quantize.tune`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

import deploykit
from deploykit.calib.calibrators import TensorRange
from deploykit.data import Split
from deploykit.errors import UserError
from deploykit.io import atomic_paths, json_text, refuse_overwriting_inputs, sha256_file
from deploykit.onnx_utils import get_metadata, set_metadata
from deploykit.plugins import DOMAIN, INT8_FORMS
from deploykit.quantize.config import QuantConfig
from deploykit.quantize.graph import float_op_types
from deploykit.quantize.qdq import build_model, float_reference, load_for_quantization, prepare
from deploykit.quantize.record import ranges_path_for


# ----------------------------------------------------------------------------- calibrate
def file_sizes(fp32: Path, int8: Path) -> dict[str, Any]:
    """Bytes of the FP32 and INT8 files (external data included) and INT8 as a share of FP32."""
    from deploykit.onnx_utils import model_bytes

    a, b = model_bytes(fp32), model_bytes(int8)
    return {"fp32_bytes": a, "int8_bytes": b, "int8_over_fp32": round(b / a, 4) if a else None}


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
    embeddings: list[dict[str, Any]] = field(default_factory=list)  # tables stored as int8 rows
    file_sizes: dict[str, Any] = field(default_factory=dict)       # FP32 and INT8 file bytes, their ratio
    float_op_types: dict[str, int] = field(default_factory=dict)     # of float_nodes, per op type
    float_node_ops: dict[str, str] = field(default_factory=dict)     # float node -> its op type
    selected_op_types: dict[str, int] = field(default_factory=dict)  # of every selected node, per op type
    bias_corrected: list[dict[str, Any]] = field(default_factory=list)
    probability_offsets: list[str] = field(default_factory=list)    # P·V MatMuls with P as 2P−1

    def float_line(self) -> str:
        """One line for the run summary: the nodes kept in float, per op type against all selected."""
        per_type = ", ".join(f"{op} {self.float_op_types.get(op, 0)}/{n}" for op, n in self.selected_op_types.items()
                             if self.float_op_types.get(op, 0))
        names = ", ".join(self.float_nodes[:6]) + (f", … ({len(self.float_nodes) - 6} more)"
                                                   if len(self.float_nodes) > 6 else "")
        return (f"{len(self.float_nodes)} kept float ({len(self.fallback_nodes)} fallen back by tuning)"
                + (f": {per_type}: {names}" if self.float_nodes else ""))

    def summary(self) -> dict[str, Any]:
        c = self.config
        out = {
            "path": str(self.path), "ranges": str(self.ranges_path), "preset": c.preset, "method": c.method,
            "percentile": c.percentile if c.method == "percentile" else None,
            "smoothquant_alpha": c.smoothquant.alpha, "smoothquant_targets": c.smoothquant.targets,
            "smoothquant_shift": bool(c.smoothquant.shift),
            "shifted_groups": sum(1 for g in self.smoothing if g.get("shift")),
            "smoothed_groups": len(self.smoothing),
            "smoothing_folds": {k: sum(1 for g in self.smoothing if g["fold"] == k)
                                for k in ("layernorm", "rmsnorm", "linear", "mul")},
            "op_types": c.op_types, "residual_adds": c.residual_adds, "layernorm": c.layernorm,
            "per_channel": c.per_channel, "activation_type": c.activation_type,
            "activation_symmetric": c.activation_symmetric,
            "calibrated_tensors": len(self.ranges), "masked_tensors": self.masked_tensors,
            "quantized_nodes": len(self.quantized_nodes), "float_nodes": self.float_nodes,
            "fallback_nodes": self.fallback_nodes, "float_fallback_count": len(self.fallback_nodes),
            "float_node_count": len(self.float_nodes), "float_op_types": self.float_op_types,
            "float_node_ops": self.float_node_ops,
            "float_by_op_type": {op: f"{self.float_op_types.get(op, 0)}/{n}"
                                 for op, n in self.selected_op_types.items()},
            "tensor_methods": c.tensor_methods, "bias_correction": bool(c.bias_correction),
            "weight_rounding": c.weight_rounding,
            "bias_corrected_nodes": len(self.bias_corrected),
            "probability_offset": bool(c.probability_offset), "probability_offset_nodes": self.probability_offsets,
            "plugin_int8": c.plugin_int8, "plugin_int8_nodes": self.plugin_int8_nodes,
            "embeddings": c.embeddings or False, "embedding_tables": self.embeddings,
            "file_sizes": self.file_sizes,
            "qdq": self.qdq_counts, "seconds": round(self.seconds, 2), "data_sha256": self.data_sha256,
        }
        if self.tuning is not None:
            out["tuning"] = {k: v for k, v in self.tuning.items() if k not in ("trials", "tensor_method_noise")}
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
    embeddings: list[dict[str, Any]] = []
    bias_records: list[dict[str, Any]] = []
    ranges = prepared.ranges(config.method, config.percentile, config.tensor_methods)   # the tuned choice, if tuning ran
    reference = float_reference(prepared, ranges)
    smoothing = reference[1]                           # with a channel shift: the offsets as snapped
    quantized = build_model(prepared, ranges, fallback, bias_correction=config.bias_correction, threads=threads,
                            embedding_log=embeddings, bias_log=bias_records, reference=reference)
    custom = sorted({n.op_type for n in quantized.graph.node if n.domain == DOMAIN})
    plugin_nodes = sorted(n.name for n in quantized.graph.node
                          if n.domain == DOMAIN and n.op_type in INT8_FORMS.values())
    set_metadata(quantized, {**get_metadata(model), "variant": "int8", **({"custom_ops": custom} if custom else {}),
                             "version": deploykit.__version__,
                             "calibration": {"preset": config.preset, "method": config.method,
                                             "smoothquant_alpha": config.smoothquant.alpha,
                                             "float_fallback": len(fallback),
                                             "embeddings": config.embeddings or False,
                                             "bias_correction": bool(config.bias_correction),
                                             "weight_rounding": config.weight_rounding,
                                             "probability_offset": len(prepared.offsets),
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
            "config": config.summary(), "smoothing": smoothing,
            "float_nodes": float_nodes, "tensors": {k: r.to_dict() for k, r in ranges.items()}}), encoding="utf-8")
    result = CalibrationResult(path=out_path, ranges_path=ranges_path, config=config, ranges=ranges,
                               quantized_nodes=quantized_nodes, float_nodes=float_nodes, fallback_nodes=fallback,
                               masked_tensors=prepared.masked_tensors, qdq_counts=qdq,
                               seconds=time.perf_counter() - start, data_sha256=split.sha256,
                               smoothing=smoothing, tuning=tuning, plugin_int8_nodes=plugin_nodes,
                               embeddings=embeddings, file_sizes=file_sizes(model_path, out_path),
                               float_op_types=float_op_types(prepared.nodes, float_nodes),
                               float_node_ops={n.name: n.op_type for n in prepared.nodes if n.name in float_nodes},
                               selected_op_types=float_op_types(prepared.nodes, [n.name for n in prepared.nodes]),
                               bias_corrected=bias_records,
                               probability_offsets=[r["node"] for r in prepared.offsets])
    return result
