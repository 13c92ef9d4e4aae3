"""Quantization presets: each target's INT8 form (see :mod:`deploykit.quantize`), by name.

A leaf: nothing of deploykit is imported, so target profiles can check a preset name
without loading the quantizer."""

from __future__ import annotations

from typing import Any

# Default calibration methods chosen by measurement (bench/calibration_methods.py; see
# docs/quantization.md): on the naive path (no smoothing, no fallback) mse has the best mean
# rank over the pretrained models measured for both gpu-trt and cpu-ort, and is never far
# from the best; percentile 99.99 clips informative LayerNorm outliers on MiniLM-L6.
# paper-w8a8 keeps the outlier paper's own estimator, since it reproduces that setting.
PRESETS: dict[str, dict[str, Any]] = {
    "gpu-trt": {"activation_type": "int8", "activation_symmetric": True, "op_types": ["MatMul", "Gemm"],
                "method": "mse", "per_channel": True, "plugin_int8": True,
                # embedding tables as int8 rows: DequantizeLinear(axis=0) -> Gather, TensorRT's form
                "embeddings": "dq-gather"},
    "cpu-ort": {"activation_type": "uint8", "activation_symmetric": False, "op_types": ["MatMul", "Gemm"],
                "method": "mse", "per_channel": True, "plugin_int8": False,
                # Gather int8 rows -> Cast -> Mul by their scales: reads only the rows it needs
                # (docs/int8-embeddings.md has the measurement against the other forms)
                "embeddings": "gather-mul"},
    # Q/DQ on the inputs of MatMul (LayerNorm, GELU and softmax outputs, Q/K/V), Softmax (its
    # input), LayerNormalization (residual sums) and Add, plus the *outputs* of Adds: the
    # bias Add closes every Linear, so each Linear output is rounded once, as in the paper.
    "paper-w8a8": {"activation_type": "uint8", "activation_symmetric": False,
                   "op_types": ["MatMul", "Gemm", "Add", "Softmax", "LayerNormalization"],
                   "output_op_types": ["Add"], "method": "running-minmax", "per_channel": False,
                   "plugin_int8": False, "embeddings": False},   # the paper keeps embeddings float
}


# Presets whose INT8 runs elsewhere than ONNX Runtime's CPU kernels: their Q/DQ models are
# scored on this CPU with the Q/DQ pairs left as ops (DequantizeLinear -> float MatMul), the
# graph's exact integer semantics, which TensorRT's int8 GEMMs (int32 accumulation) reproduce.
# ORT's fused u8s8 kernels are exact only with VNNI (or ARM dot products): on an AVX2-only
# x86 CPU their 16-bit pair sums saturate: MPNet's gpu-trt model scored 20.8 dB fused against
# 22.4 dB exact on such a CPU (bench/qdq_scoring.py). cpu-ort is scored fused: that is what it
# deploys to.
EXACT_QDQ_PRESETS = frozenset({"gpu-trt", "paper-w8a8"})
# The ONNX Runtime session entry that keeps Q/DQ pairs as ops (no QDQ fusion; other
# optimizations, weight DequantizeLinear folding included, still apply).
EXACT_QDQ_SESSION_CONFIG = {"session.disable_quant_qdq": "1"}
