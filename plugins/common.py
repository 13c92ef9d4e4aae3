"""Names every deploykit op shares: the ONNX domain, the TensorRT plugin namespace, the INT8
forms and the onnxscript environment the ops' ONNX functions are written in.

A leaf: the op folders import it, and ``deploykit.plugins`` re-exports it.
"""

from __future__ import annotations

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
