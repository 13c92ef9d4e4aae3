"""Per-node quantization error and the debug-quant command."""

from __future__ import annotations

import json
import math

import onnx
import pytest

from deploykit.data import Split
from deploykit.errors import UserError
from deploykit.quantize import QuantConfig, SmoothQuantConfig, calibrate
from deploykit.quantize.debug import float_counterpart, node_errors, quantized_nodes


@pytest.fixture(scope="module")
def smoothed_int8(tiny_onnx, tiny_splits, tmp_path_factory):
    out = tmp_path_factory.mktemp("dq") / "model.int8.onnx"
    calibrate(tiny_onnx, tiny_splits.calibration, out,
              QuantConfig(method="mse", smoothquant=SmoothQuantConfig(alpha=0.8, targets="all")))
    return out


def test_every_quantized_matmul_is_ranked_worst_first_with_module_names(tiny_onnx, smoothed_int8, tiny_splits):
    qdq = onnx.load(str(smoothed_int8))
    float_model = float_counterpart(onnx.load(str(tiny_onnx)), smoothed_int8.with_name("model.int8.ranges.json"))
    split = Split("d", {k: v[:16] for k, v in tiny_splits.evaluation.feeds.items()}, "x")
    errors = node_errors(float_model, qdq, split)
    assert {e.node for e in errors} == {n.name for n, _, _ in quantized_nodes(qdq)}
    # Every MatMul, and the word-embedding Gather, which reads its int8 rows through a DequantizeLinear.
    dq_out = {n.output[0] for n in qdq.graph.node if n.op_type == "DequantizeLinear"}
    gathers = sum(1 for n in qdq.graph.node if n.op_type == "Gather" and n.input[0] in dq_out)
    assert gathers == 1
    assert sum(1 for n in qdq.graph.node if n.op_type == "MatMul") + gathers == len(errors)
    snrs = [e.added_snr_db for e in errors]
    assert snrs == sorted(snrs)
    assert all(math.isfinite(e.added_snr_db) and 0 < e.added_cosine <= 1 + 1e-9 for e in errors)
    # 8-bit quantization of one MatMul: roughly 6 dB per bit -> 25..50 dB on a random tiny BERT
    assert 15 < snrs[len(snrs) // 2] < 60
    modules = [e.module for e in errors]
    assert any(m and m.startswith("model.encoder.layer.") and m.endswith(".attention.self.query") for m in modules)


def test_unsmoothed_fp32_model_alone_cannot_explain_a_smoothed_int8(tiny_onnx, smoothed_int8, tiny_splits):
    split = Split("d", {k: v[:4] for k, v in tiny_splits.evaluation.feeds.items()}, "x")
    with pytest.raises(UserError, match="lacks tensors"):
        node_errors(onnx.load(str(tiny_onnx)), onnx.load(str(smoothed_int8)), split)


def test_debug_quant_command_writes_json_and_plot(tiny_onnx, smoothed_int8, tmp_path):
    from deploykit.data import DataSpec
    from deploykit.pipeline import debug_quant

    result = debug_quant(tiny_onnx, smoothed_int8, tmp_path, source=None, data="docstrings",
                         spec=DataSpec(calibration=32, evaluation=64), samples=8, top=5)
    saved = json.loads((tmp_path / "debug_quant.json").read_text())
    assert saved["nodes"] == result["nodes"] and saved["samples"] == 8
    assert (tmp_path / "debug_quant.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
