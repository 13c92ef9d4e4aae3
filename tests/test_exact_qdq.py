"""Q/DQ models whose target is not ONNX Runtime's CPU kernels (gpu-trt, paper-w8a8) are scored
in the graph's exact integer arithmetic on every CPU; cpu-ort models and latency runs keep
ORT's fused kernels."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deploykit.data import DataSpec, make_splits
from deploykit.onnx_utils import set_metadata
from deploykit.quantize import QuantConfig, SmoothQuantConfig, calibrate
from deploykit.quantize.graph import cpu_session
from deploykit.runners import OrtRunner, make_runner, scores_exact

K, N = 256, 8


def _qdq_matmul(preset: str | None) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """x -> Q(int8, scale 1/127) -> DQ -> MatMul(DQ(int8 weight, per-column scale)): inputs near
    +-1 quantize to +-127, and so do the weights. ORT's u8s8 kernels shift x to uint8 (255)
    and add products in 16-bit pairs: 2 * 255 * 127 = 64,770 > 32,767, which saturates where
    the CPU has no VNNI. (The int8 weights and their scales, returned for the reference.)"""
    rng = np.random.default_rng(0)
    qw = np.where(rng.random((K, N)) < 0.5, 127, -127).astype(np.int8)
    qw[:, 0] = 127                                    # a column of all-maximum weights
    sw = rng.uniform(0.01, 0.02, N).astype(np.float32)
    sx = np.float32(1.0 / 127)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
         helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
         helper.make_node("DequantizeLinear", ["qw", "sw", "zw"], ["w"], axis=1),
         helper.make_node("MatMul", ["xd", "w"], ["y"])],
        "qdq_matmul", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", N])],
        [numpy_helper.from_array(np.array(sx, np.float32), "sx"), numpy_helper.from_array(np.array(0, np.int8), "zx"),
         numpy_helper.from_array(qw, "qw"), numpy_helper.from_array(sw, "sw"),
         numpy_helper.from_array(np.zeros(N, np.int8), "zw")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    if preset:
        set_metadata(model, {"variant": "int8", "calibration": {"preset": preset}})
    return model, qw, sw


def _exact_reference(x: np.ndarray, qw: np.ndarray, sw: np.ndarray) -> np.ndarray:
    """The Q/DQ graph's meaning: int8 x int8 products summed in int64, then scaled."""
    qx = np.clip(np.rint(x * 127), -128, 127).astype(np.int64)
    return (qx @ qw.astype(np.int64)) * (sw.astype(np.float64) / 127)


def _inputs() -> np.ndarray:
    rng = np.random.default_rng(1)
    return np.where(rng.random((4, K)) < 0.5, 1.0, 0.99).astype(np.float32)   # all near +1: x -> 127 or 126


def test_exact_scoring_is_the_integer_arithmetic_of_the_graph(tmp_path):
    model, qw, sw = _qdq_matmul("gpu-trt")
    x = _inputs()
    expected = _exact_reference(x, qw, sw)
    exact = cpu_session(model, 1, exact_qdq=True).run(None, {"x": x})[0]
    # fp32 DequantizeLinear and MatMul of integers times scales: only fp32 rounding, at most a
    # few ulps of the output's scale over 256 products
    np.testing.assert_allclose(exact, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    path = tmp_path / "gpu-trt.onnx"
    onnx.save(model, str(path))
    runner = OrtRunner(path, threads=1)
    assert runner.exact_qdq and scores_exact(path)
    np.testing.assert_allclose(runner.infer({"x": x}), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("preset,exact", [("gpu-trt", True), ("paper-w8a8", True), ("cpu-ort", False), (None, False)])
def test_the_recorded_preset_decides_the_arithmetic_and_latency_runs_stay_fused(tmp_path, preset, exact):
    model, _, _ = _qdq_matmul(preset)
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    assert scores_exact(path) is exact
    assert OrtRunner(path, threads=1).exact_qdq is exact
    assert make_runner("ort-cpu", model_path=path, threads=1).exact_qdq is exact
    assert make_runner("ort-cpu", model_path=path, threads=1, for_latency=True).exact_qdq is False
    assert OrtRunner(path, threads=1, exact_qdq=True).exact_qdq is True


@pytest.fixture(scope="module")
def splits(tiny_bundle):
    return make_splits(tiny_bundle, DataSpec(source="docstrings", calibration=16, evaluation=24, seed=0, tuning=16))


def test_calibrated_models_record_their_scoring_and_verify_names_it(tiny_bundle, tiny_onnx, splits, tmp_path,
                                                                    monkeypatch):
    from deploykit.quantize import TuneConfig
    from deploykit.stages import verify_backends
    from deploykit.verify import run_split

    config = QuantConfig(smoothquant=SmoothQuantConfig(targets="all"), embeddings=False,
                         tune=TuneConfig(enabled=True, criteria={"cosine_mean": ">= 0.0"}, budget=1, samples=16))
    result = calibrate(tiny_onnx, splits.calibration, tmp_path / "trt.onnx", config, tuning_split=splits.tuning)
    assert result.tuning["scoring"] == "exact Q/DQ" and scores_exact(tmp_path / "trt.onnx")
    calibrate(tiny_onnx, splits.calibration, tmp_path / "cpu.onnx", QuantConfig(preset="cpu-ort", embeddings=False))
    assert not scores_exact(tmp_path / "cpu.onnx")

    reference = run_split(OrtRunner(tiny_onnx), splits.evaluation)
    variants = {"fp32": tiny_onnx, "int8": tmp_path / "trt.onnx", "int8-cpu": tmp_path / "cpu.onnx"}
    monkeypatch.setattr("deploykit.probes.int8_pairs_saturate", lambda facts=None: True)   # a CPU without VNNI
    out = verify_backends(tiny_bundle, variants, reference, splits.evaluation, backends=["ort-cpu"], rules={},
                          localize_failures=False)
    assert out["verification"]["exact_qdq"] == ["int8@ort-cpu"]
    assert out["verification"]["fused_qdq_saturating"] == ["int8-cpu@ort-cpu"]     # not the FP32, not the exact one
    monkeypatch.setattr("deploykit.probes.int8_pairs_saturate", lambda facts=None: False)
    again = verify_backends(tiny_bundle, {"int8-cpu": tmp_path / "cpu.onnx"}, reference, splits.evaluation,
                            backends=["ort-cpu"], rules={}, localize_failures=False)
    assert "fused_qdq_saturating" not in again["verification"] and "exact_qdq" not in again["verification"]
    exact = run_split(OrtRunner(tmp_path / "trt.onnx", exact_qdq=True), splits.evaluation)
    np.testing.assert_array_equal(out["outputs"]["int8@ort-cpu"], exact)   # the same session settings


def test_saturation_is_expected_only_on_x86_without_vnni_or_amx():
    from deploykit.probes import int8_pairs_saturate

    x86 = {"machine": "x86_64", "flags_known": True}
    assert int8_pairs_saturate({**x86, "flags": ["avx2"]})
    assert not int8_pairs_saturate({**x86, "flags": ["avx2", "avx512_vnni"]})
    assert not int8_pairs_saturate({**x86, "flags": ["avx2", "avx_vnni"]})
    assert not int8_pairs_saturate({**x86, "flags": [], "flags_known": False})   # unknown: not claimed
    assert not int8_pairs_saturate({"machine": "aarch64", "flags_known": True, "flags": []})
