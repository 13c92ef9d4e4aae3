"""deploykit's custom attention ops, one folder each (installed as ``deploykit.plugins``).

Each op folder holds ``reference.py``, the op's PyTorch semantics and the single source of
truth every other implementation (ONNX decomposition, Triton kernel, TensorRT plugin) is
tested against.
"""

from __future__ import annotations

DOMAIN = "deploykit"                 # ONNX domain of every deploykit node
PLUGIN_NAMESPACE = "deploykit"       # the TensorRT plugin namespace the nodes name


def script_env():
    """(onnxscript, the opset-18 ops, the deploykit opset) for writing ONNX functions."""
    import onnxscript
    from onnxscript import opset18 as op
    from onnxscript.values import Opset

    return onnxscript, op, Opset(DOMAIN, 1)


def function_protos() -> list:
    """Every op's ONNX local functions (decompositions ORT runs), keyed by op name."""
    from deploykit.plugins.linear_attention.onnx_function import function_protos as linear_functions
    from deploykit.plugins.neighborhood_attention.onnx_function import function_protos as na_functions

    return [*na_functions(), *linear_functions()]


def attach_functions(model) -> list[str]:
    """Add the local functions of every ``deploykit`` node in ``model`` (and the helper
    functions they call). Returns the custom op types found."""
    used = sorted({n.op_type for n in model.graph.node if n.domain == DOMAIN})
    if not used:
        return []
    have = {(f.domain, f.name) for f in model.functions}
    for proto in function_protos():
        if (proto.domain, proto.name) not in have:
            model.functions.append(proto)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.add(domain=DOMAIN, version=1)
    return used
