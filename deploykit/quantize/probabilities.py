"""Attention probabilities in the whole int8 range: ``P·V = ½·(2P − 1)·V + ½·Σ_k V``.

With symmetric int8 activations (TensorRT's only form) the softmax output P ∈ [0, 1] uses
just the 128 non-negative levels: a probability below 1/254 of the largest rounds to zero.
Rewriting the product as

    Y = ½ · ((2P − 1) · V) + ½ · ReduceSum(V, axis=-2)

is exact in real arithmetic, and ``P' = 2P − 1`` spans [−1, 1], so the MatMul's int8 input
has 255 levels over the probabilities: the step halves, as with uint8 on ORT's CPU kernels.
The MatMul keeps its node name, so fallback and exclusion lists still address it. After Q/DQ
placement the ReduceSum reads the same dequantized V as the MatMul (ORT's quantizer wires a
float reader of a tensor with one quantized reader to that reader's DequantizeLinear, and
``tests/test_probabilities.py`` holds it to that): a masked key (P = 0, so P' = −1 exactly) then cancels
exactly, whatever V's rounding.

Only a MatMul reading a Softmax over its last axis and an activation (not a weight) is
rewritten, and only where V's rank is known to be at least 2.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from deploykit.onnx_utils import name_allocator
from deploykit.quantize.graph import constant_names, producers


def _rank(model: onnx.ModelProto, name: str) -> int | None:
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            return len(vi.type.tensor_type.shape.dim)
    return None


def _softmax_axis(node: onnx.NodeProto) -> int:
    for a in node.attribute:
        if a.name == "axis":
            return int(a.i)
    return -1          # opset >= 13 default


def probability_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMuls of softmax probabilities (over the last axis) by an activation V of rank >= 2."""
    prod = producers(model)
    constants = constant_names(model)
    out = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        p = prod.get(node.input[0])
        if p is None or p.op_type != "Softmax" or node.input[1] in constants:
            continue
        rank_p = _rank(model, node.input[0])
        axis = _softmax_axis(p)
        if not (axis == -1 or (rank_p is not None and axis == rank_p - 1)):
            continue
        rank_v = _rank(model, node.input[1])
        if rank_v is None or rank_v < 2:
            continue
        out.append(node)
    return out


def offset_probabilities(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
    """A copy of ``model`` with every :func:`probability_matmuls` product rewritten; one
    record per rewrite (node, the offset input, the ReduceSum node)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    targets = {n.name for n in probability_matmuls(out)}
    if not targets:
        return out, []
    g = out.graph
    name = name_allocator(out)           # unique among the graph's names and those made here

    two, one, half, axes = name("pv_offset_two"), name("pv_offset_one"), name("pv_offset_half"), name("pv_offset_axes")
    g.initializer.extend([numpy_helper.from_array(np.array(2.0, np.float32), two),
                          numpy_helper.from_array(np.array(1.0, np.float32), one),
                          numpy_helper.from_array(np.array(0.5, np.float32), half),
                          numpy_helper.from_array(np.array([-2], np.int64), axes)])
    nodes, records = [], []
    for node in g.node:
        if node.name not in targets:
            nodes.append(node)
            continue
        p, v = node.input[0], node.input[1]
        y = node.output[0]
        base = node.name or y
        doubled, shifted = name(f"{base}_p2"), name(f"{base}_p_offset")
        partial, colsum, total = name(f"{base}_offset_out"), name(f"{base}_v_sum"), name(f"{base}_sum")
        sum_node = name(f"{base}_v_reducesum")
        nodes += [helper.make_node("Mul", [p, two], [doubled], name=name(f"{base}_p_double")),
                  helper.make_node("Sub", [doubled, one], [shifted], name=name(f"{base}_p_shift"))]
        node.input[0] = shifted
        node.output[0] = partial
        nodes += [node,
                  helper.make_node("ReduceSum", [v, axes], [colsum], name=sum_node, keepdims=1),
                  helper.make_node("Add", [partial, colsum], [total], name=name(f"{base}_offset_add")),
                  helper.make_node("Mul", [total, half], [y], name=name(f"{base}_offset_half"))]
        records.append({"node": node.name, "offset_input": shifted, "values": v, "reducesum": sum_node})
    del g.node[:]
    g.node.extend(nodes)
    return onnx.shape_inference.infer_shapes(out), records
