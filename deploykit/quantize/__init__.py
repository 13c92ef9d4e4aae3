"""Static INT8 as explicit QuantizeLinear/DequantizeLinear (the only INT8 TensorRT 11 takes).

deploykit collects activation statistics itself (``deploykit.calib.calibrators``: robust to
the attention mask's -inf / finfo.min values, deterministic), optionally smooths outlier
channels into the weights first (SmoothQuant, ``deploykit.quantize.smoothquant``), and hands
the ranges to ONNX Runtime's ``QDQQuantizer``, which places the Q/DQ pairs and quantizes the
weights per channel. Tensors that carry mask sentinels or non-finite values are never
quantized: every quantizable node that touches one stays in float and is listed.

Presets name the target's INT8 form:

``gpu-trt``  symmetric int8 activations (zero point 0) x per-channel int8 weights on
             MatMul/Gemm inputs; optionally residual Adds and LayerNorm inputs. TensorRT
             fuses DQ -> MatMul (-> bias Add) into int8 GEMMs. deploykit's attention ops
             (neighborhood, linear) get Q -> op -> DQ, their INT8 plugin form
             (``deploykit.quantize.plugin_int8``).
``cpu-ort``  asymmetric uint8 activations x per-channel int8 weights on MatMul/Gemm: what
             ONNX Runtime's x86 integer kernels run fastest.
``paper-w8a8``  the setting of Bondarenko et al. (2023), to compare like with like: symmetric
             per-tensor int8 weights, asymmetric per-tensor uint8 activations with running
             min-max ranges (momentum 0.9) on Linear outputs (every bias Add's output),
             LayerNorm inputs and outputs, residual sums, softmax input and output. A
             research setting (every activation rounded), not a deployment preset.

``calibrate`` runs one configuration, or with ``tune.enabled`` the accuracy-driven search
(``deploykit.quantize.tune``): calibration method x SmoothQuant alpha x falling back the
nodes with the worst quantization error to float, until the targets are met.
"""

from __future__ import annotations

from deploykit.presets import PRESETS
from deploykit.quantize.calibration import CalibrationResult, calibrate
from deploykit.quantize.config import ACTIVATION_TYPES, QuantConfig, SmoothQuantConfig, TuneConfig
from deploykit.quantize.qdq import (Prepared, build_qdq, load_for_quantization, prepare, select_nodes,
                                    tensors_to_calibrate)

__all__ = ["ACTIVATION_TYPES", "PRESETS", "CalibrationResult", "Prepared", "QuantConfig", "SmoothQuantConfig",
           "TuneConfig", "build_qdq", "calibrate", "load_for_quantization", "prepare", "select_nodes",
           "tensors_to_calibrate"]
