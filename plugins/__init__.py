"""deploykit's custom attention ops, one folder each (installed as ``deploykit.plugins``).

Each op folder holds ``reference.py``, the op's PyTorch semantics and the single source of
truth every other implementation (ONNX decomposition, Triton kernel, TensorRT plugin) is
tested against.
"""

from __future__ import annotations

import functools

DOMAIN = "deploykit"                 # ONNX domain of every deploykit node
PLUGIN_NAMESPACE = "deploykit"       # the TensorRT plugin namespace the nodes name

# Each op's INT8 form: same attributes, inputs (q, k, v, key_mask, q_scale, k_scale, v_scale,
# y_scale) with q, k, v and the output symmetric int8 (zero point 0, per-tensor scales). It is
# what ``deploykit calibrate`` writes between a QuantizeLinear and a DequantizeLinear.
INT8_FORMS = {
    "NeighborhoodAttention1D": "NeighborhoodAttention1DInt8",
    "NeighborhoodAttention2D": "NeighborhoodAttention2DInt8",
    "LinearAttention": "LinearAttentionInt8",
}


def script_env():
    """(onnxscript, the opset-18 ops, the deploykit opset) for writing ONNX functions."""
    import onnxscript
    from onnxscript import opset18 as op
    from onnxscript.values import Opset

    return onnxscript, op, Opset(DOMAIN, 1)


@functools.lru_cache(maxsize=None)
def function_protos() -> tuple:
    """Every op's ONNX local functions (decompositions ORT runs, and the helpers they call).

    Built once per process: onnxscript compiles them from this package's source."""
    from deploykit.plugins.linear_attention.onnx_function import function_protos as linear_functions
    from deploykit.plugins.neighborhood_attention.onnx_function import function_protos as na_functions

    return (*na_functions(), *linear_functions())


def attach_functions(model) -> list[str]:
    """Add to ``model`` the local function of every ``deploykit`` node type it uses, with
    the helper functions those call. Returns the custom op types found."""
    used = sorted({n.op_type for n in model.graph.node if n.domain == DOMAIN})
    if not used:
        return []
    available = {f.name: f for f in function_protos() if f.domain == DOMAIN}
    have = {f.name for f in model.functions if f.domain == DOMAIN}
    pending = list(used)
    while pending:
        name = pending.pop()
        if name in have or name not in available:
            continue
        proto = available[name]
        model.functions.append(proto)            # protobuf copies: the cached proto stays untouched
        have.add(name)
        pending += [n.op_type for n in proto.node if n.domain == DOMAIN]
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.add(domain=DOMAIN, version=1)
    return used
