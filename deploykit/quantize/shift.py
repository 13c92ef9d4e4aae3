"""What SmoothQuant's channel shift (``smoothquant.shift``, :mod:`deploykit.quantize.smoothquant`)
needs once the activation ranges are known, so that centring a channel only ever removes error.

Centring moves a channel's usual values off zero: a GELU channel that is nearly always about 0
sits at ``-c/s`` after the shift, for every token. Two errors that cancel out over tokens for
values at zero then add up instead, and mean pooling or the next LayerNorm keeps them:

* **rounding of the constant**: ``-c/s`` is not a point of the int8 grid, so every token rounds
  it the same way. :func:`snap_shifts` moves each channel's offset to the nearest multiple of
  the tensor's quantization step (and the MatMuls' biases by the same amount, so the float
  graph is unchanged), as an asymmetric quantizer keeps its zero point an integer.
* **the weight error on the constant**: the int8 MatMul computes ``x' Wq``, so the constant part
  of ``x'`` meets ``Wq - W`` on every token, while the bias compensates with the float ``W``.
  :func:`compensate_weights` compensates with the weight as it is stored, ``(c/s) Wq``, which
  makes ``Q(x') Wq + b + (c/s) Wq = (Q(x') + c/s) Wq + b``: the weight error then meets the
  true activation, as without the shift. (Bias correction measures this mean shift itself, so
  the two are not combined.)

Both act only on explicit shift ``Add`` nodes and on biases the smoothing records name.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from deploykit.calib.calibrators import TensorRange
from deploykit.quantize.graph import initializers, producers
from deploykit.quantize.smoothquant import replace_initializer, use_counts


def grid_step(r: TensorRange, symmetric: bool) -> float:
    """The int8 quantization step of ``r`` as ONNX Runtime's quantizer sets it: ``max|x| / 127``
    symmetric, ``(hi - lo) / 255`` (the range stretched to include 0) otherwise."""
    if symmetric:
        return max(abs(float(r.lo)), abs(float(r.hi))) / 127.0
    return (max(float(r.hi), 0.0) - min(float(r.lo), 0.0)) / 255.0


def _const_input(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> str | None:
    names = [i for i in node.input if i in inits]
    return names[0] if len(names) == 1 else None


def has_explicit_shifts(records: list[dict[str, Any]]) -> bool:
    return any(r.get("shift_node") for r in records)


def snap_shifts(model: onnx.ModelProto, records: list[dict[str, Any]], ranges: dict[str, TensorRange],
                symmetric: bool) -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
    """A copy of the smoothed float ``model`` whose explicit shift offsets lie on the int8 grid
    of the tensor they produce, the member MatMuls' biases moved to match (the function is
    unchanged); and the records with the snapped shifts (``reapply`` rebuilds this graph)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    records = copy.deepcopy(records)
    nodes = {n.name: n for n in out.graph.node}
    uses, arrays = use_counts(out), {}
    for record in records:
        add = nodes.get(record.get("shift_node") or "")
        if add is None:
            continue
        inits = initializers(out)
        r = ranges.get(add.output[0])
        const = _const_input(add, inits)
        if r is None or getattr(r, "masked", False) or const is None:
            continue
        step = grid_step(r, symmetric)
        if not np.isfinite(step) or step <= 0:
            continue
        offset = numpy_helper.to_array(inits[const]).astype(np.float64)
        snapped = step * np.round(offset / step)
        delta = snapped - offset
        if not np.any(delta):
            continue
        replace_initializer(out, add, const, snapped, f"{const}_snapped", uses, arrays)
        inits = initializers(out)
        for member in record["nodes"]:
            matmul, bias_add = nodes.get(member), nodes.get(record["bias_nodes"].get(member, ""))
            bias = _const_input(bias_add, inits) if bias_add is not None else None
            if matmul is None or bias is None or matmul.input[1] not in inits:
                raise ValueError(f"the smoothing record of {record['input']} does not match the graph at {member}")
            w = numpy_helper.to_array(inits[matmul.input[1]]).astype(np.float64)
            value = numpy_helper.to_array(inits[bias]).astype(np.float64) - delta @ w   # (x' + d) W - d W
            replace_initializer(out, bias_add, bias, value, f"{bias}_snapped", uses, arrays)
            inits = initializers(out)
        scales = np.asarray(record["scales"], np.float64)
        record["shift"] = [float(v) for v in -snapped * scales]                    # offset = -c / s
    return out, records


def centre(record: dict[str, Any]) -> np.ndarray:
    """``c / s`` of a shifted group's record: the constant its int8 MatMuls' biases add back
    beside the centred input ``x' = (x - c) / s``."""
    return np.asarray(record["shift"], np.float64) / np.asarray(record["scales"], np.float64)


def compensate_weights(qdq: onnx.ModelProto, float_model: onnx.ModelProto,
                       records: list[dict[str, Any]]) -> int:
    """In ``qdq`` (quantized from ``float_model``), give each shifted group's int8 MatMuls the
    bias ``b + (c/s) (Wq - W)``; returns how many biases changed."""
    from deploykit.quantize.bias import dequantized_weight

    prod = producers(qdq)
    nodes = {n.name: n for n in qdq.graph.node}
    float_nodes = {n.name: n for n in float_model.graph.node}
    float_inits = initializers(float_model)
    uses, arrays = use_counts(qdq), {}
    changed = 0
    for record in records:
        if not record.get("shift"):
            continue
        offset = centre(record)
        inits = initializers(qdq)
        for member in record["nodes"]:
            matmul, bias_add = nodes.get(member), nodes.get(record["bias_nodes"].get(member, ""))
            dq = prod.get(matmul.input[1]) if matmul is not None else None
            if dq is None or dq.op_type != "DequantizeLinear" or bias_add is None:
                continue                     # kept in float: the float compensation is exact
            needed = {i: numpy_helper.to_array(inits[i]) for i in list(dq.input) + list(bias_add.input) if i in inits}
            stored = dequantized_weight(dq, needed)
            bias = _const_input(bias_add, inits)
            source = float_nodes.get(member)
            if stored is None or bias is None or source is None or source.input[1] not in float_inits:
                continue
            w = numpy_helper.to_array(float_inits[source.input[1]]).astype(np.float64)
            value = needed[bias].astype(np.float64) + offset @ (stored - w)
            replace_initializer(qdq, bias_add, bias, value, f"{bias}_shift_exact", uses, arrays)
            inits = initializers(qdq)
            changed += 1
    return changed
