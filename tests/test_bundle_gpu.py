"""deploykit.bundle_gpu: TensorRT calibration cache from deploykit's ranges, plugin PTX for a target GPU.

* The cache: header ``TRT-<version>-EntropyCalibration2``, one ``name: <big-endian float32 hex>``
  line per calibrated tensor with scale ``amax / 127``; names are the FP32 model's tensors.
* The PTX: the Triton kernel each deploykit node's TensorRT plugin compiles ahead of time,
  here for sm_87 (Jetson Orin) without a GPU; identical nodes share one file.
"""

from __future__ import annotations

import json
import re
import struct
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from deploykit.bundle_gpu import calibration_cache, plugin_ptx, read_calibration_cache, trt_version_number
from deploykit.errors import UserError


# ----------------------------------------------------------------------------- calibration cache
@pytest.fixture(scope="module")
def calibrated(tiny_onnx, tiny_splits, tmp_path_factory):
    """(ranges.json document, FP32 model) of a gpu-trt calibration of the tiny BERT."""
    from deploykit.quantize import QuantConfig, calibrate

    out = tmp_path_factory.mktemp("cache") / "model.int8.onnx"
    result = calibrate(tiny_onnx, tiny_splits.calibration, out, QuantConfig(method="minmax"))
    return json.loads(result.ranges_path.read_text()), onnx.load(str(tiny_onnx))


def _tensor_names(model: onnx.ModelProto) -> set[str]:
    return ({i.name for i in model.graph.input} | {o.name for o in model.graph.output}
            | {o for n in model.graph.node for o in n.output})


def test_cache_round_trips_scales_of_fp32_tensors(calibrated):
    doc, fp32 = calibrated
    text = calibration_cache(doc, "10.3.0", fp32_model=fp32)
    lines = text.splitlines()
    assert lines[0] == "TRT-100300-EntropyCalibration2"
    assert all(re.fullmatch(r".+: [0-9a-f]{8}", line) for line in lines[1:])
    scales = read_calibration_cache(text)
    tensors = doc["tensors"]
    expected = {name: r for name, r in tensors.items()
                if not r["masked"] and max(abs(r["lo"]), abs(r["hi"])) > 0}
    assert set(scales) == set(expected) and scales
    assert set(scales) <= _tensor_names(fp32)                     # FP32 network tensor names
    for name, r in expected.items():
        amax = max(abs(r["lo"]), abs(r["hi"]))
        assert scales[name] == float(np.float32(amax / 127.0)), name
        assert np.isclose(scales[name] * 127.0, amax, rtol=1e-6)
    masked = [name for name, r in tensors.items() if r["masked"]]
    assert not set(masked) & set(scales)                          # mask-sentinel tensors stay float
    # the bare "tensors" mapping gives the same cache
    assert calibration_cache(tensors, "10.3.0") == text


def test_cache_format_version_and_skips():
    text = calibration_cache({"a": {"lo": -2.54, "hi": 1.0}, "b": (0.0, 0.0), "c": (-np.inf, 1.0),
                              "d": {"lo": -1.0, "hi": 1.0, "masked": True}, "e": (0.0, 127.0)}, "8.6.1")
    assert text.splitlines() == ["TRT-8601-EntropyCalibration2", f"a: {struct.pack('>f', 2.54 / 127).hex()}",
                                 "e: 3f800000"]
    assert read_calibration_cache(text) == {"a": float(np.float32(2.54 / 127)), "e": 1.0}
    assert trt_version_number("10.3.0") == 100300 and trt_version_number("10.15") == 101500
    with pytest.raises(UserError, match="explicit Q/DQ"):
        calibration_cache({"a": (-1.0, 1.0)}, "11.0.0")
    with pytest.raises(UserError, match="smoothed"):
        calibration_cache({"tensors": {"a": {"lo": -1.0, "hi": 1.0}}, "smoothing": [{"input": "a"}]})
    with pytest.raises(UserError, match="header"):
        read_calibration_cache("a: 3f800000\n")


def test_cache_refuses_ranges_of_another_model(calibrated):
    doc, _ = calibrated
    other = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]))
    with pytest.raises(UserError, match="none of the calibrated tensors"):
        calibration_cache(doc, fp32_model=other)


# ----------------------------------------------------------------------------- plugin PTX
class NABlock(torch.nn.Module):
    """Linear -> q, k, v (B, 2, 16, 32) -> three NeighborhoodAttention1D nodes, two of them
    compiling to the same kernel (same attributes and shapes) -> Linear."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 192)
        self.out = torch.nn.Linear(64, 3)

    def forward(self, pixel_values):
        from deploykit.plugins.neighborhood_attention.onnx_function import na_op

        b = pixel_values.shape[0]
        x = self.proj(pixel_values.reshape(b, 16, 16))
        q, k, v = x.reshape(b, 16, 3, 2, 32).permute(2, 0, 3, 1, 4)
        y = na_op(q, k, v, 7) + na_op(k, q, v, 7) + na_op(q, k, v, 3, 2)
        return self.out(y.transpose(1, 2).reshape(b, 16, 64)).mean(dim=1)


@pytest.fixture(scope="module")
def na_model(tmp_path_factory) -> onnx.ModelProto:
    from deploykit.export import export_onnx
    from deploykit.models.base import ImagePreprocessor, ModelBundle

    torch.manual_seed(0)
    bundle = ModelBundle(source="test", name="na1d", task="image-classification", module=NABlock().eval(),
                         input_names=["pixel_values"], output_name="logits",
                         dynamic_axes={"pixel_values": {0: "batch"}},
                         preprocessor=ImagePreprocessor(img_size=16, in_chans=1, mean=(0.5,), std=(0.5,)))
    path = tmp_path_factory.mktemp("na") / "na1d.onnx"
    export_onnx(bundle, path)
    return onnx.load(str(path))


def test_ptx_for_orin_one_file_per_distinct_kernel(na_model, monkeypatch):
    pytest.importorskip("triton", reason="compiling the plugin kernels needs the triton package")
    monkeypatch.delenv("DEPLOYKIT_PTX_VERSION", raising=False)
    nodes = [n for n in na_model.graph.node if n.domain == "deploykit"]
    assert [n.op_type for n in nodes] == ["NeighborhoodAttention1D"] * 3
    files, notes = plugin_ptx(na_model, "8.7")
    assert sorted(files) == ["NeighborhoodAttention1D_k3_d2_hd32_fp32_sm87.ptx",
                             "NeighborhoodAttention1D_k7_d1_hd32_fp32_sm87.ptx"]
    for ptx in files.values():
        assert re.search(r"^\.target sm_87\b", ptx, re.MULTILINE)
        assert re.search(r"^\.version 8\.0$", ptx, re.MULTILINE)
        assert ".entry na1d_fwd_kernel" in ptx
    assert len(notes) == 2 and all("na1d_fwd_kernel" in note for note in notes)
    k7 = next(note for note in notes if "_k7_" in note)
    assert k7.count(", ") >= 4 and sum(n.name in k7 for n in nodes) == 2      # both k7 nodes share it


def _na_graph(q_shape, v_shape) -> onnx.ModelProto:
    node = helper.make_node("NeighborhoodAttention1D", ["q", "k", "v", "mask"], ["y"], name="na", domain="deploykit",
                            kernel_size=[3], dilation=[1], is_causal=[0], scale=0.125)
    graph = helper.make_graph([node], "g", [
        helper.make_tensor_value_info("q", TensorProto.FLOAT, q_shape),
        helper.make_tensor_value_info("k", TensorProto.FLOAT, q_shape),
        helper.make_tensor_value_info("v", TensorProto.FLOAT, v_shape),
        helper.make_tensor_value_info("mask", TensorProto.BOOL, ["B", "L"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("deploykit", 1)])


def test_ptx_skips_nodes_without_a_static_head_dim():
    pytest.importorskip("triton", reason="compiling the plugin kernels needs the triton package")
    files, notes = plugin_ptx(_na_graph(["B", 2, "L", "D"], ["B", 2, "L", "D"]), "8.7")
    assert files == {}
    assert len(notes) == 1 and "skipped" in notes[0] and "head dim of q" in notes[0]


def test_ptx_without_custom_ops_or_triton(monkeypatch):
    plain = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]))
    assert plugin_ptx(plain, "8.7") == ({}, [])
    monkeypatch.setitem(sys.modules, "triton", None)                   # import triton -> ImportError
    files, notes = plugin_ptx(_na_graph(["B", 2, "L", 32], ["B", 2, "L", 32]), "8.7")
    assert files == {} and len(notes) == 1 and notes[0].startswith("triton is not installed: ")
    with pytest.raises(UserError, match="compute capability"):
        plugin_ptx(plain, "orin")


def test_head_dim_walks_back_through_reshape_transpose_and_qdq(monkeypatch):
    # Without shape inference, q's head dim is read off the Reshape's constant shape through
    # Transpose and Q/DQ; a Reshape to a computed shape gives nothing (never a guess).
    from deploykit import bundle_gpu

    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1, 3]),
             helper.make_node("QuantizeLinear", ["t", "s"], ["tq"]),
             helper.make_node("DequantizeLinear", ["tq", "s"], ["q"]),
             helper.make_node("Reshape", ["x", "dyn"], ["u"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
                                           helper.make_tensor_value_info("dyn", TensorProto.INT64, [4])],
                              [helper.make_tensor_value_info("q", TensorProto.FLOAT, None)],
                              [helper.make_tensor("shape", TensorProto.INT64, [4], [0, -1, 2, 32]),
                               helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])])

    def no_inference(*args, **kwargs):
        raise RuntimeError("off")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", no_inference)
    notes: list[str] = []
    shapes = bundle_gpu._Shapes(helper.make_model(graph), notes)
    assert shapes.dim("q", -1) == 32 and shapes.dim("q", -3) == 2 and shapes.dim("q", -2) is None
    assert shapes.dim("u", -1) is None
    assert len(notes) == 1 and "shape inference failed" in notes[0]
