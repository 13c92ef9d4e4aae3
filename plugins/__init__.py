"""deploykit's custom attention ops, one folder each (installed as ``deploykit.plugins``).

Each op folder holds ``reference.py``, the op's PyTorch semantics and the single source of
truth every other implementation (ONNX decomposition, Triton kernel, TensorRT plugin) is
tested against.
"""

from __future__ import annotations

import functools

from deploykit.plugins.common import DOMAIN, INT8_FORMS, PLUGIN_NAMESPACE, script_env

__all__ = ["DOMAIN", "INT8_FORMS", "PLUGIN_NAMESPACE", "attach_functions", "function_protos", "script_env"]


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
