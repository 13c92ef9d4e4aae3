"""deploykit calibrate around the attention ops: Q -> op -> DQ (the op's INT8 form).

Calibration runs the float op (its ONNX function) and never needs anything else; the Q/DQ
pairs ORT's quantizer places around it are folded into ``<Op>Int8`` nodes whose inputs are
the int8 outputs of the QuantizeLinear nodes and whose output feeds a DequantizeLinear,
with the scales shared with those Q/DQ nodes.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from deploykit.data import Split
from deploykit.plugins import DOMAIN, INT8_FORMS
from deploykit.plugins.linear_attention.onnx_function import linear_attention_op
from deploykit.plugins.neighborhood_attention.onnx_function import na_op


class Block(torch.nn.Module):
    """Linear -> q, k, v -> attention op -> Linear, on a (B, 1, 8, 8) "image"."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.proj = torch.nn.Linear(4, 24)
        self.out = torch.nn.Linear(8, 3)

    def forward(self, pixel_values):
        b = pixel_values.shape[0]
        x = self.proj(pixel_values.reshape(b, 1, 16, 4))
        q, k, v = x.reshape(b, 16, 3, 2, 4).permute(2, 0, 3, 1, 4)           # (B, 2, 16, 4)
        if self.kind == "na1d":
            y = na_op(q, k, v, 5, 2)
        elif self.kind == "na2d":
            shape = (b, 2, 4, 4, 4)
            y = na_op(q.reshape(shape), k.reshape(shape), v.reshape(shape), (3, 3)).reshape(b, 2, 16, 4)
        else:
            y = linear_attention_op(q, k, v, causal=True, decay=[0.9, 0.8], chunk_size=4)
        return self.out(y.transpose(1, 2).reshape(b, 16, 8)).mean(dim=1)


def exported(kind: str, tmp_path):
    from deploykit.export import export_onnx
    from deploykit.models.base import ImagePreprocessor, ModelBundle

    torch.manual_seed(0)
    bundle = ModelBundle(source="test", name=kind, task="image-classification", module=Block(kind).eval(),
                         input_names=["pixel_values"], output_name="logits",
                         dynamic_axes={"pixel_values": {0: "batch"}},
                         preprocessor=ImagePreprocessor(img_size=8, in_chans=1, mean=(0.5,), std=(0.5,)))
    path = tmp_path / f"{kind}.onnx"
    export_onnx(bundle, path)
    return path


def split(seed: int, n: int = 48) -> Split:
    return Split("calibration", {"pixel_values": np.random.RandomState(seed).randn(n, 1, 8, 8).astype(np.float32)},
                 f"seed{seed}")


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"pixel_values": x})[0]


def attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("kind,op_type", [("na1d", "NeighborhoodAttention1D"), ("na2d", "NeighborhoodAttention2D"),
                                          ("linear", "LinearAttention")])
def test_calibrate_places_q_op_dq_and_matches_the_fake_quant_graph(kind, op_type, tmp_path):
    from deploykit.onnx_utils import get_metadata
    from deploykit.quantize import QuantConfig, build_qdq, calibrate, load_for_quantization, prepare
    from deploykit.quantize.graph import consumers, producers

    fp32 = exported(kind, tmp_path)
    result = calibrate(fp32, split(0), tmp_path / "int8.onnx", QuantConfig(preset="gpu-trt"))
    model = onnx.load(str(result.path))
    onnx.checker.check_model(model, full_check=True)
    float_node = next(n for n in onnx.load(str(fp32)).graph.node if n.domain == DOMAIN)
    node = next(n for n in model.graph.node if n.domain == DOMAIN)
    assert node.op_type == INT8_FORMS[op_type] and result.plugin_int8_nodes == [node.name]
    assert attrs(node) == attrs(float_node) and attrs(node)["plugin_namespace"] == b"deploykit"
    assert get_metadata(model)["custom_ops"] == [INT8_FORMS[op_type]]
    assert {f.name for f in model.functions} >= {INT8_FORMS[op_type], op_type}

    prod, users = producers(model), consumers(model)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for name, scale in zip(node.input[:3], node.input[4:7]):
        q = prod[name]
        assert q.op_type == "QuantizeLinear" and q.input[1] == scale      # the Q's own scale initializer
        assert inits[q.input[2]].dtype == np.int8 and not inits[q.input[2]].any()
    assert node.input[3] == float_node.input[3]                           # key_mask passes as is
    (dq,) = users[node.output[0]]
    assert dq.op_type == "DequantizeLinear" and dq.input[1] == node.input[7]
    assert dq.output[0] == float_node.output[0]                           # float name kept for analysis

    # The INT8 form computes what the unfolded Q -> DQ -> op -> Q -> DQ graph computes.
    _, inferred = load_for_quantization(fp32)
    config = QuantConfig(preset="gpu-trt", plugin_int8=False, op_types=["MatMul", "Gemm", op_type],
                         output_op_types=[op_type]).resolved()
    prepared = prepare(inferred, split(0), config)
    fake = build_qdq(prepared, prepared.ranges(config.method, config.percentile))
    assert not any(n.op_type in INT8_FORMS.values() for n in fake.graph.node)
    x = split(1, 16).feeds["pixel_values"]
    # Same DQ -> float op -> Q arithmetic in the same order; 1e-6 leaves room for ORT
    # scheduling the function's inlined nodes differently from the graph's.
    np.testing.assert_allclose(run(model, x), run(fake, x), rtol=0, atol=1e-6)
    ref = run(onnx.load(str(fp32)), x)
    got = run(model, x)
    cosine = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cosine > 0.99, cosine            # 8-bit q, k, v and output: ~40 dB SNR per tensor


def test_int8_node_alone_equals_dequantize_reference_quantize():
    """The contract a plugin implements: int8 q, k, v -> reference.py -> int8 output."""
    import onnxruntime as ort

    from deploykit.plugins import attach_functions
    from deploykit.plugins.neighborhood_attention import neighborhood_attention

    rng = np.random.RandomState(0)
    q8, k8, v8 = (rng.randint(-128, 128, size=(2, 3, 19, 8)).astype(np.int8) for _ in range(3))
    scales = np.array([0.02, 0.03, 0.05, 0.004], np.float32)
    mask = np.ones((2, 19), bool)
    mask[1, 15:] = False
    names = ["q", "k", "v", "key_mask", "qs", "ks", "vs", "ys"]
    node = onnx.helper.make_node("NeighborhoodAttention1DInt8", names, ["y"], domain=DOMAIN, kernel_size=[5],
                                 dilation=[2], is_causal=[0], scale=0.35, plugin_namespace="deploykit")
    graph = onnx.helper.make_graph(
        [node], "g",
        [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.INT8, ["B", "H", "L", 8]) for n in names[:3]]
        + [onnx.helper.make_tensor_value_info("key_mask", onnx.TensorProto.BOOL, ["B", "L"])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.INT8, ["B", "H", "L", 8])],
        [onnx.numpy_helper.from_array(np.array(s, np.float32), n) for s, n in zip(scales, names[4:])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18),
                                                         onnx.helper.make_opsetid(DOMAIN, 1)])
    attach_functions(model)
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"q": q8, "k": k8, "v": v8, "key_mask": mask})[0]
    assert got.dtype == np.int8
    deq = [torch.from_numpy(t.astype(np.float32) * s) for t, s in zip((q8, k8, v8), scales)]
    out = neighborhood_attention(*deq, 5, 2, scale=0.35, key_mask=torch.from_numpy(mask)).numpy()
    expected = np.clip(np.rint(out / scales[3]), -128, 127).astype(np.int8)
    diff = np.abs(got.astype(int) - expected.astype(int))
    # fp32 summation order differs (gather + ReduceSum vs einsum): a value within ~1e-7 of a
    # rounding boundary may land one step over; nothing further.
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


def test_cpu_preset_and_excluded_nodes_keep_the_float_op(tmp_path):
    from deploykit.quantize import QuantConfig, calibrate

    fp32 = exported("na1d", tmp_path)
    float_name = next(n.name for n in onnx.load(str(fp32)).graph.node if n.domain == DOMAIN)
    for name, config in [("cpu", QuantConfig(preset="cpu-ort")),
                         ("excluded", QuantConfig(preset="gpu-trt", nodes_to_exclude=[float_name]))]:
        result = calibrate(fp32, split(0), tmp_path / f"{name}.onnx", config)
        model = onnx.load(str(result.path))
        node = next(n for n in model.graph.node if n.domain == DOMAIN)
        assert node.op_type == "NeighborhoodAttention1D" and not result.plugin_int8_nodes, name
        producers = {o: n for n in model.graph.node for o in n.output}
        assert all(producers[i].op_type != "QuantizeLinear" for i in node.input[:3])


def test_plugin_int8_needs_symmetric_int8():
    from deploykit.errors import UserError
    from deploykit.quantize import QuantConfig

    with pytest.raises(UserError, match="symmetric int8"):
        QuantConfig(preset="cpu-ort", plugin_int8=True).resolved()


def test_per_node_error_analysis_sees_the_int8_op(tmp_path):
    from deploykit.quantize import QuantConfig, calibrate
    from deploykit.quantize.debug import node_errors

    fp32 = exported("linear", tmp_path)
    result = calibrate(fp32, split(0), tmp_path / "int8.onnx", QuantConfig(preset="gpu-trt"))
    errors = node_errors(onnx.load(str(fp32)), onnx.load(str(result.path)), split(1, 16))
    by_type = {e.op_type: e for e in errors}
    assert "LinearAttentionInt8" in by_type and "MatMul" in by_type
    assert 15 < by_type["LinearAttentionInt8"].added_snr_db < 80     # rounded, but not broken
