"""Q -> op -> DQ around deploykit's attention ops: the form in which a plugin takes INT8.

Calibration sees only the float op (its ONNX function runs in ORT like any node): its float
inputs q, k, v and its output get ranges, and ORT's quantizer places the usual fake-quant
pairs, ``Q -> DQ -> op -> Q -> DQ``. :func:`fold_into_plugins` then moves the inner DQs and
the Q into the op, which becomes its INT8 form (``deploykit.plugins.INT8_FORMS``):

    Q(q) ─┐
    Q(k) ─┼─> NeighborhoodAttention1DInt8(q8, k8, v8, key_mask, q_scale, k_scale, v_scale, y_scale) -> DQ
    Q(v) ─┘

The scales are the very initializers the Q/DQ nodes use (one source), and the INT8 form's
ONNX function is ``DQ -> float op -> Q``, so ONNX Runtime computes exactly what the
fake-quant graph computed. TensorRT sees int8 tensors enter and leave the plugin, which is
how a plugin runs INT8 I/O in an explicitly quantized network (the plugin, not TensorRT,
owns the DQ/Q it absorbed). A node is folded only when it matches: symmetric int8 per-tensor
Q/DQ on all of q, k, v and on its output.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from deploykit.plugins import DOMAIN, INT8_FORMS, attach_functions
from deploykit.quantize.graph import consumers, initializers, producers


def _per_tensor_int8(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    """A Q or DQ with a scalar scale and an int8 zero point of 0 (TensorRT's INT8)."""
    if len(node.input) < 3 or node.input[1] not in inits or node.input[2] not in inits:
        return False
    zero = inits[node.input[2]]
    return (numpy_helper.to_array(inits[node.input[1]]).size == 1 and zero.data_type == onnx.TensorProto.INT8
            and not np.any(numpy_helper.to_array(zero)))


def fold_into_plugins(model: onnx.ModelProto) -> list[str]:
    """Rewrite every matching ``DQ -> op -> Q`` into the op's INT8 form, in place; returns the
    names of the folded nodes."""
    prod, users, inits = producers(model), consumers(model), initializers(model)
    graph_outputs = {o.name for o in model.graph.output}
    removed: set[int] = set()
    stale: set[str] = set()
    folded = []
    for node in model.graph.node:
        if node.domain != DOMAIN or node.op_type not in INT8_FORMS or len(node.input) < 4:
            continue
        pairs = []
        for name in node.input[:3]:
            dq = prod.get(name)
            q = prod.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is None or q.op_type != "QuantizeLinear" or not _per_tensor_int8(q, inits) \
                    or not _per_tensor_int8(dq, inits) or dq.input[1] != q.input[1]:
                break
            pairs.append((q, dq))
        y = node.output[0]
        readers = users.get(y, [])
        if len(pairs) != 3 or y in graph_outputs or len(readers) != 1 or readers[0].op_type != "QuantizeLinear":
            continue
        qy = readers[0]
        dqs = users.get(qy.output[0], [])
        if not _per_tensor_int8(qy, inits) or not dqs or any(d.op_type != "DequantizeLinear" for d in dqs):
            continue
        node.op_type = INT8_FORMS[node.op_type]
        scales = [q.input[1] for q, _ in pairs] + [qy.input[1]]
        node.input[:] = [q.output[0] for q, _ in pairs] + [node.input[3]] + scales
        node.output[0] = qy.output[0]
        removed.add(id(qy))
        for q, dq in pairs:
            if all(id(u) == id(node) for u in users.get(dq.output[0], [])):
                removed.add(id(dq))
                stale.add(dq.output[0])
        # The output's DequantizeLinear takes over the float name the op's output had, so the
        # tensor names of the INT8 graph still match the FP32 graph's (per-node error analysis).
        if len(dqs) == 1:
            old = dqs[0].output[0]
            for reader in users.get(old, []):
                reader.input[:] = [y if name == old else name for name in reader.input]
            for out in model.graph.output:
                if out.name == old:
                    out.name = y
            dqs[0].output[0] = y
            stale.add(old)
        else:
            stale.add(y)
        folded.append(node.name)
    if folded:
        keep = [n for n in model.graph.node if id(n) not in removed]
        del model.graph.node[:]
        model.graph.node.extend(keep)
        kept_info = [vi for vi in model.graph.value_info if vi.name not in stale]
        del model.graph.value_info[:]
        model.graph.value_info.extend(kept_info)
        attach_functions(model)
    return folded
