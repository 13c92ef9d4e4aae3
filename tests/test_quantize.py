"""Static INT8 with explicit Q/DQ: placement, per-channel weights, symmetric activations,
robustness to the attention mask, inputs never overwritten."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from deploykit.errors import UserError
from deploykit.quantize import QuantConfig, calibrate
from deploykit.runners import OrtRunner
from deploykit.verify import embedding_metrics, run_split

INTEGER_OPS = {"QLinearMatMul", "MatMulInteger", "QLinearConv", "ConvInteger", "DynamicQuantizeLinear"}


@pytest.fixture(scope="module")
def int8_model(tiny_onnx, tiny_splits, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "model.int8.onnx"
    result = calibrate(tiny_onnx, tiny_splits.calibration, out, QuantConfig(method="percentile"))
    return result, onnx.load(str(out))


def test_every_matmul_gets_qdq_with_per_channel_symmetric_weights(int8_model, tiny_onnx):
    result, model = int8_model
    ops = [n.op_type for n in model.graph.node]
    assert not INTEGER_OPS.intersection(ops), "INT8 must stay explicit Q/DQ, not integer operators"
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    fp32 = onnx.load(str(tiny_onnx))
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == sum(n.op_type == "MatMul" for n in fp32.graph.node)
    weight_checks = 0
    for node in matmuls:
        for k, name in enumerate(node.input):
            dq = producers.get(name)
            assert dq is not None and dq.op_type == "DequantizeLinear", f"{node.name} input {k} is not dequantized"
            q_input, scale, zero = (inits.get(x) for x in dq.input)
            if q_input is not None:  # a weight: int8, per output channel (axis 1 of a [K, N] MatMul weight)
                axis = next(a.i for a in dq.attribute if a.name == "axis")
                assert q_input.dtype == np.int8 and axis == 1
                assert scale.shape == (q_input.shape[1],)
                assert np.all(zero == 0)
                weight_checks += 1
            else:       # an activation: int8 with zero point 0 (symmetric: what TensorRT accepts)
                q = producers[dq.input[0]]
                assert q.op_type == "QuantizeLinear"
                zp = inits[q.input[2]]
                assert zp.dtype == np.int8 and np.all(zp == 0)
    assert weight_checks >= 8       # 2 layers x (Q, K, V, out, FFN in, FFN out)
    assert result.qdq_counts["QuantizeLinear"] > 0 and not result.float_nodes


def test_weights_roundtrip_within_half_a_step(int8_model, tiny_onnx):
    """Per-channel symmetric: |w - dq(q(w))| <= scale/2 for every weight of every channel."""
    _, model = int8_model
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    fp32_weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tiny_onnx)).graph.initializer}
    checked = 0
    for dq in (n for n in model.graph.node if n.op_type == "DequantizeLinear"):
        if dq.input[0] in inits and dq.input[0].endswith("_quantized"):
            original = fp32_weights[dq.input[0][: -len("_quantized")]]
            q, scale = inits[dq.input[0]].astype(np.float32), inits[dq.input[1]]
            assert np.all(np.abs(q * scale - original) <= scale / 2 + 1e-7)
            checked += 1
    assert checked >= 8


def test_quantized_model_stays_close_and_records_provenance(int8_model, tiny_onnx, tiny_splits):
    result, model = int8_model
    ref = run_split(OrtRunner(tiny_onnx), tiny_splits.evaluation)
    out = run_split(OrtRunner(result.path), tiny_splits.evaluation)
    metrics, _ = embedding_metrics(ref, out)
    # A random tiny BERT is far less outlier-prone than a trained one: 8-bit noise alone
    # keeps cosine above ~0.99; a wrong scale or axis drops it below 0.9.
    assert metrics["cosine_mean"] > 0.98
    ranges = json.loads(result.ranges_path.read_text())
    assert ranges["data"]["sha256"] == tiny_splits.calibration.sha256
    assert set(ranges["tensors"]) == set(result.ranges)
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["deploykit.variant"]) == "int8"


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_mask_path_does_not_crash_and_stays_float(tiny_onnx, tiny_splits, tmp_path, method):
    """Quantizing Add/Softmax/Where puts the attention mask (finfo.min) in calibration."""
    config = QuantConfig(method=method, op_types=["MatMul", "Add", "Softmax", "Where", "Mul"])
    result = calibrate(tiny_onnx, tiny_splits.calibration, tmp_path / "all.onnx", config)
    assert result.masked_tensors, "the additive attention mask must be detected"
    for name in result.masked_tensors:
        r = result.ranges[name]
        assert r.sentinel > 0 and np.isfinite([r.lo, r.hi]).all() and abs(r.lo) < 1e6
    assert result.float_nodes, "nodes touching the mask must stay in float"
    model = onnx.load(str(tmp_path / "all.onnx"))
    quantized_inputs = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert not quantized_inputs.intersection(result.masked_tensors)
    ref = run_split(OrtRunner(tiny_onnx), tiny_splits.evaluation)
    out = run_split(OrtRunner(tmp_path / "all.onnx"), tiny_splits.evaluation)
    assert embedding_metrics(ref, out)[0]["cosine_mean"] > 0.9


def test_calibration_is_reproducible_bit_for_bit(tiny_onnx, tiny_splits, tmp_path):
    config = QuantConfig(method="entropy")
    a = calibrate(tiny_onnx, tiny_splits.calibration, tmp_path / "a.onnx", config)
    b = calibrate(tiny_onnx, tiny_splits.calibration, tmp_path / "b.onnx", config)
    assert {k: v.to_dict() for k, v in a.ranges.items()} == {k: v.to_dict() for k, v in b.ranges.items()}
    inits_a = {i.name: i.SerializeToString() for i in onnx.load(str(tmp_path / "a.onnx")).graph.initializer}
    inits_b = {i.name: i.SerializeToString() for i in onnx.load(str(tmp_path / "b.onnx")).graph.initializer}
    assert inits_a == inits_b


def test_output_onto_input_is_refused_and_input_untouched(tiny_onnx, tiny_splits):
    before = tiny_onnx.read_bytes()
    with pytest.raises(UserError, match="overwrite an input"):
        calibrate(tiny_onnx, tiny_splits.calibration, tiny_onnx, QuantConfig())
    assert tiny_onnx.read_bytes() == before


def test_bad_settings_are_user_errors(tiny_onnx, tiny_splits, tmp_path):
    with pytest.raises(UserError, match="unknown calibration method"):
        calibrate(tiny_onnx, tiny_splits.calibration, tmp_path / "x.onnx", QuantConfig(method="kl"))
    with pytest.raises(UserError, match="not in the model"):  # with close-match suggestions when any
        calibrate(tiny_onnx, tiny_splits.calibration, tmp_path / "x.onnx",
                  QuantConfig(nodes_to_exclude=["no_such_node"]))
    with pytest.raises(UserError, match="already quantized"):
        q = tmp_path / "q.onnx"
        calibrate(tiny_onnx, tiny_splits.calibration, q, QuantConfig())
        calibrate(q, tiny_splits.calibration, tmp_path / "qq.onnx", QuantConfig())


def test_excluded_nodes_stay_float(tiny_onnx, tiny_splits, tmp_path):
    fp32 = onnx.load(str(tiny_onnx))
    victim = next(n.name for n in fp32.graph.node if n.op_type == "MatMul")
    calibrate(tiny_onnx, tiny_splits.calibration, tmp_path / "x.onnx", QuantConfig(nodes_to_exclude=[victim]))
    model = onnx.load(str(tmp_path / "x.onnx"))
    node = next(n for n in model.graph.node if n.name == victim)
    producers = {o: n for n in model.graph.node for o in n.output}
    assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in node.input)


def _quantize_inputs(model):
    """{op type of the node producing each QuantizeLinear input}."""
    producers = {o: n for n in model.graph.node for o in n.output}
    return {producers[n.input[0]].op_type for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] in producers}


def test_gpu_trt_quantizes_matmul_inputs_not_outputs(int8_model):
    _, model = int8_model
    assert "MatMul" not in _quantize_inputs(model), "a MatMul output must not be re-quantized"


def test_cpu_ort_preset_is_uint8_activations_int8_weights(tiny_onnx, tiny_splits, tmp_path):
    calibrate(tiny_onnx, tiny_splits.calibration, tmp_path / "cpu.onnx", QuantConfig(preset="cpu-ort"))
    model = onnx.load(str(tmp_path / "cpu.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    acts = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert acts and all(inits[q.input[2]].dtype == np.uint8 for q in acts)
    assert any(np.any(inits[q.input[2]] != 128) for q in acts), "asymmetric: zero points follow the data"
    weights = [inits[n.input[0]] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert weights and all(w.dtype == np.int8 for w in weights)


def test_residual_adds_and_layernorm_options_add_their_qdq(tiny_onnx, tiny_splits, tmp_path):
    calibrate(tiny_onnx, tiny_splits.calibration, tmp_path / "r.onnx",
              QuantConfig(residual_adds=True, layernorm=True))
    model = onnx.load(str(tmp_path / "r.onnx"))
    producers = {o: n for n in model.graph.node for o in n.output}
    dq_fed = {n.op_type for n in model.graph.node
              if any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in n.input)}
    assert {"MatMul", "Add", "LayerNormalization"} <= dq_fed
