"""Bias correction (Nagel et al., 2019, empirical form) for the quantized Linears of a Q/DQ model.

Quantization shifts a Linear's output on average: clipping and rounding of its input, and the
rounding of its weights, do not cancel out over the data. For ``y = x W + b`` quantized as
``Q(x) Wq + b``, the expected shift per output channel is ``E[x] W - E[Q(x)] Wq`` (the
expectation of a linear map is the map of the expectation), measured here over the
calibration data with the model's own Q/DQ scales; adding it to ``b`` makes the quantized
Linear's output mean match the float one. Only Linears whose MatMul output feeds a constant
1-D bias Add are corrected (the bias is where the shift can go without a new op).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from deploykit.data import Split
from deploykit.onnx_utils import unique_name
from deploykit.quantize.graph import consumers, iterate_activations, producers


def dequantized_weight(dq: onnx.NodeProto, inits: dict[str, np.ndarray]) -> np.ndarray | None:
    q = inits.get(dq.input[0])
    if q is None or len(dq.input) < 2 or dq.input[1] not in inits:
        return None
    scale = inits[dq.input[1]].astype(np.float64)
    zero = inits[dq.input[2]].astype(np.float64) if len(dq.input) > 2 and dq.input[2] in inits else 0.0
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    if scale.ndim == 1 and q.ndim == 2:
        shape = [1, 1]
        shape[axis] = -1
        scale = scale.reshape(shape)
        zero = zero.reshape(shape) if np.ndim(zero) else zero
    return (q.astype(np.float64) - zero) * scale


def _fake_quant(x: np.ndarray, scale: float, zero: float, dtype: np.dtype) -> np.ndarray:
    info = np.iinfo(dtype)
    return (np.clip(np.rint(x / scale) + zero, info.min, info.max) - zero) * scale   # rint: ties to even, as ORT


def _linears(qdq: onnx.ModelProto):
    """(MatMul, float input tensor, its Q node, dequantized weight, bias Add, bias name) per
    quantized Linear with a constant bias."""
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    prod, users = producers(qdq), consumers(qdq)
    for node in qdq.graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2:
            continue
        dq_x, dq_w = prod.get(node.input[0]), prod.get(node.input[1])
        if dq_x is None or dq_w is None or dq_x.op_type != "DequantizeLinear" or dq_w.op_type != "DequantizeLinear":
            continue
        q_x = prod.get(dq_x.input[0])
        weight = dequantized_weight(dq_w, inits)
        if q_x is None or q_x.op_type != "QuantizeLinear" or weight is None or weight.ndim != 2:
            continue
        readers = users.get(node.output[0], [])
        if len(readers) != 1 or readers[0].op_type != "Add":
            continue
        add = readers[0]
        bias = [i for i in add.input if i in inits and inits[i].ndim == 1 and inits[i].shape[0] == weight.shape[1]]
        if len(bias) != 1:
            continue
        yield node, q_x, weight, add, bias[0], inits


def correct_biases(qdq: onnx.ModelProto, float_model: onnx.ModelProto, split: Split, *,
                   float_weights: dict[str, np.ndarray] | None = None, batch_size: int = 16,
                   threads: int | None = None) -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
    """A copy of ``qdq`` whose quantized Linears' biases absorb the mean output shift that
    quantization adds on ``split``; ``float_model`` is the graph ``qdq`` was quantized from
    (same tensor and node names). Returns (model, one record per corrected Linear)."""
    out = onnx.ModelProto()
    out.CopyFrom(qdq)
    linears = list(_linears(out))
    if not linears:
        return out, []
    float_inits = {i.name: i for i in float_model.graph.initializer}
    float_nodes = {n.name: n for n in float_model.graph.node}
    tensors = sorted({q.input[0] for _, q, *_ in linears})
    sums: dict[str, np.ndarray] = {}
    qsums: dict[tuple[str, str], np.ndarray] = {}
    counts: dict[str, int] = {}
    params = {}
    for node, q, *_rest in linears:
        inits = _rest[-1]
        scale = float(inits[q.input[1]])
        zero = float(inits[q.input[2]]) if len(q.input) > 2 and q.input[2] in inits else 0.0
        dtype = inits[q.input[2]].dtype if len(q.input) > 2 and q.input[2] in inits else np.dtype(np.uint8)
        params[node.name] = (scale, zero, dtype)
    for values in iterate_activations(float_model, tensors, split, batch_size, threads,
                                      description="bias correction: input means"):
        for name, value in values.items():
            x = value.astype(np.float64).reshape(-1, value.shape[-1])
            sums[name] = sums.get(name, 0.0) + x.sum(axis=0)
            counts[name] = counts.get(name, 0) + x.shape[0]
            for node, q, *_ in linears:
                if q.input[0] == name:
                    key = (node.name, name)
                    qsums[key] = qsums.get(key, 0.0) + _fake_quant(x, *params[node.name]).sum(axis=0)
    records = []
    for node, q, weight_q, add, bias_name, inits in linears:
        name = q.input[0]
        float_node = float_nodes.get(node.name)
        if float_node is None or counts.get(name, 0) == 0:
            continue
        w = (float_weights or {}).get(node.name)
        if w is None:
            w_init = float_inits.get(float_node.input[1])
            if w_init is None:
                continue
            w = numpy_helper.to_array(w_init).astype(np.float64)
        mean_x, mean_qx = sums[name] / counts[name], qsums[(node.name, name)] / counts[name]
        shift = mean_x @ w - mean_qx @ weight_q
        bias = inits[bias_name].astype(np.float64) + shift
        new_name = unique_name(out, f"{bias_name}_bias_corrected")
        out.graph.initializer.append(numpy_helper.from_array(bias.astype(inits[bias_name].dtype), new_name))
        add.input[:] = [new_name if i == bias_name else i for i in add.input]
        records.append({"node": node.name, "shift_abs_max": float(np.abs(shift).max()),
                        "shift_rms": float(np.sqrt(np.mean(shift ** 2)))})
    used = {i for n in out.graph.node for i in n.input}
    keep = [i for i in out.graph.initializer if i.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    return out, records
