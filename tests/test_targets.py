"""Deployment targets: the built-in profiles, user files, and the model/engine checks that
refuse what a target cannot run (each a one-line error, exit code 2)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).parent))

from deploykit.errors import UserError  # noqa: E402
from deploykit.targets import check_engine, check_model, get_target, load_targets, model_needs  # noqa: E402


def test_builtin_targets_state_runtime_arch_and_precisions():
    targets = load_targets()
    assert {"h100", "a100", "l4", "jetson-orin", "jetson-thor", "edge-cpu-x86", "edge-cpu-arm"} <= set(targets)
    orin = targets["jetson-orin"]
    assert orin.compute_capability == "8.7" and orin.arch == "aarch64" and orin.int8_calibrator
    assert orin.runtime.accepts("10.3.0") and not orin.runtime.accepts("10.15")
    assert "fp8" not in orin.precisions and "fp8" in targets["l4"].precisions       # FP8 from sm_89
    assert all(t.sparse_2_4 == t.is_gpu for t in targets.values())                   # sm_80+ GPUs only here
    assert not targets["h100"].int8_calibrator and targets["edge-cpu-x86"].preset == "cpu-ort"


def fp8_model() -> onnx.ModelProto:
    """x -> Q(fp8 e4m3) -> DQ -> MatMul: what an FP8 plan would hold."""
    w = onnx.numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    scale = onnx.numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zero = helper.make_tensor("z", TensorProto.FLOAT8E4M3FN, [], [0.0])
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq"),
             helper.make_node("MatMul", ["xd", "w"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w, scale, zero])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def test_fp8_model_is_refused_for_sm87_and_fits_sm89():
    model = fp8_model()
    assert "fp8" in model_needs(model).precisions
    with pytest.raises(UserError, match="fp8.*jetson-orin.*sm_87.*FP8 needs sm_89"):
        check_model(model, get_target("jetson-orin"))
    assert check_model(model, get_target("l4")) == []


def test_ort_uint8_activations_are_refused_for_tensorrt(tiny_onnx, tiny_splits, tmp_path):
    from deploykit.quantize import QuantConfig, calibrate

    cpu = calibrate(tiny_onnx, tiny_splits.calibration, tmp_path / "cpu.onnx", QuantConfig(preset="cpu-ort")).path
    gpu = calibrate(tiny_onnx, tiny_splits.calibration, tmp_path / "gpu.onnx", QuantConfig(preset="gpu-trt")).path
    with pytest.raises(UserError, match="TensorRT.*symmetric int8"):
        check_model(cpu, get_target("h100"))
    assert check_model(gpu, get_target("h100")) == []
    assert check_model(cpu, get_target("edge-cpu-x86")) == []
    notes = check_model(gpu, get_target("edge-cpu-x86"))              # runs, but not the fast CPU form
    assert len(notes) == 1 and "cpu-ort" in notes[0]
    assert check_model(tiny_onnx, get_target("jetson-orin")) == []


def test_engine_for_another_gpu_or_tensorrt_is_refused():
    h100 = {"compute_capability": "9.0", "tensorrt": "10.15.1", "gpu": "NVIDIA H100"}
    check_engine(h100, get_target("h100"))
    with pytest.raises(UserError, match="sm_90.*sm_87.*do not move"):
        check_engine(h100, get_target("jetson-orin"))
    with pytest.raises(UserError, match="TensorRT 10.3.0.*tensorrt >= 10.15"):
        check_engine({**h100, "tensorrt": "10.3.0"}, get_target("h100"))
    with pytest.raises(UserError, match="not TensorRT engines"):
        check_engine(h100, get_target("edge-cpu-arm"))


def test_user_targets_file_extends_and_bad_files_name_themselves(tmp_path, monkeypatch):
    mine = tmp_path / "targets.yaml"
    mine.write_text("rtx-4090:\n  arch: x86_64\n  runtime: {name: tensorrt, min_version: '10.15'}\n"
                    "  compute_capability: '8.9'\n  precisions: [fp32, fp16, int8, fp8]\n  preset: gpu-trt\n")
    monkeypatch.setenv("DEPLOYKIT_TARGETS", str(mine))
    targets = load_targets()
    assert targets["rtx-4090"].source == str(mine) and "h100" in targets
    bad = tmp_path / "bad.yaml"
    bad.write_text("x:\n  arch: x86_64\n  runtime: {name: tensorrt, min_version: '10.15'}\n"
                   "  compute_capability: '8.9'\n  precisions: [fp33]\n  preset: gpu-trt\n")
    with pytest.raises(UserError, match="unknown precisions") as err:
        load_targets(bad)
    assert str(bad) in err.value.one_line()
    with pytest.raises(UserError, match="did you mean"):
        get_target("rtx-4080")


def test_cli_lists_and_checks(tmp_path):
    from test_cli import assert_user_error, deploykit

    out = deploykit("targets", "--json", cwd=tmp_path)
    assert '"jetson-orin"' in out.stdout and '"compute_capability": "8.7"' in out.stdout
    path = tmp_path / "fp8.onnx"
    onnx.save(fp8_model(), str(path))
    assert_user_error(deploykit("targets", "--check", str(path), "--target", "jetson-orin", cwd=tmp_path,
                                check_rc=None), "FP8 needs sm_89")
    ok = deploykit("targets", "--check", str(path), "--target", "h100", cwd=tmp_path)
    assert "fits target h100" in ok.stdout
