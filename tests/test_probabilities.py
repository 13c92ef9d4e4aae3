"""P·V with the probabilities offset to [−1, 1] (deploykit.quantize.probabilities): the same
function in float, masked keys cancel exactly after Q/DQ, and the int8 error of the product
drops by about the halved rounding step of P."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from deploykit.data import Split
from deploykit.io import sha256_arrays
from deploykit.quantize import QuantConfig
from deploykit.quantize.graph import cpu_session
from deploykit.quantize.probabilities import offset_probabilities, probability_matmuls
from deploykit.quantize.qdq import build_model, prepare

B, H, S, D = 4, 2, 64, 16
MASKED = 16          # the last keys of every row are padding


def _attention_model() -> onnx.ModelProto:
    """softmax(scores) · V, as an exported attention block computes it."""
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, H, S, S])
    v = helper.make_tensor_value_info("v", TensorProto.FLOAT, [None, H, S, D])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, H, S, D])
    nodes = [helper.make_node("Softmax", ["scores"], ["p"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["y"], name="pv")]
    graph = helper.make_graph(nodes, "attention", [scores, v], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return onnx.shape_inference.infer_shapes(model)


def _feeds(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    scores = rng.normal(0, 1.5, (B, H, S, S)).astype(np.float32)
    scores[..., S - MASKED:] = -1e4             # exp underflows to 0: the masked keys' P is exactly 0
    v = rng.normal(0, 1, (B, H, S, D)).astype(np.float32)
    return {"scores": scores, "v": v}


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return cpu_session(model, 1).run(None, feeds)[0]


def _config() -> QuantConfig:
    return QuantConfig(preset="gpu-trt", method="minmax", embeddings=False).resolved()


def test_finds_only_softmax_times_activation():
    model = _attention_model()
    assert [n.name for n in probability_matmuls(model)] == ["pv"]
    # a softmax over another axis is not a probability row of P·V
    other = _attention_model()
    other.graph.node[0].attribute[0].i = 2
    assert probability_matmuls(other) == []


def test_offset_graph_is_the_same_function_in_float():
    model = _attention_model()
    offset, records = offset_probabilities(model)
    assert [r["node"] for r in records] == ["pv"]
    assert [n.name for n in offset.graph.node if n.op_type == "MatMul"] == ["pv"]   # name kept
    onnx.checker.check_model(offset, full_check=True)
    feeds = _feeds(0)
    # The offset form adds two terms of size |Σ_k V| ≈ √S·σ = 8 that cancel to |y| ≈ 0.3: float32
    # rounding of 64-term sums at that size is a few 1e-6 (measured max 3.1e-6)
    np.testing.assert_allclose(_run(offset, feeds), _run(model, feeds), atol=1e-5, rtol=0)


def _qdq(offset: bool) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    feeds = _feeds(1)
    split = Split("calibration", feeds, sha256_arrays(feeds))
    prepared = prepare(_attention_model(), split, _config(), offset=offset)
    return build_model(prepared, prepared.ranges()), prepared.model


def test_reducesum_reads_the_dequantized_values_and_masked_keys_cancel():
    qdq, _ = _qdq(offset=True)
    nodes = {n.name: n for n in qdq.graph.node}
    producers = {o: n for n in qdq.graph.node for o in n.output}
    matmul = nodes["pv"]
    rsum = next(n for n in qdq.graph.node if n.op_type == "ReduceSum")
    assert producers[matmul.input[0]].op_type == "DequantizeLinear"      # P' is int8
    assert producers[matmul.input[1]].op_type == "DequantizeLinear"      # V is int8
    assert rsum.input[0] == matmul.input[1]                               # the same V̂
    # Changing V only at masked keys (within its calibrated range) changes nothing: P' = −1
    # there exactly and the ReduceSum adds back the same V̂. Reading the float V instead would
    # leave ½·Σ(V − V̂) over the masked keys, about a quarter of a V step per key.
    feeds = _feeds(2)
    changed = {k: v.copy() for k, v in feeds.items()}
    changed["v"][:, :, S - MASKED:] = -changed["v"][:, :, S - MASKED:] * 0.7
    # float32 accumulation order of the 64-term sums: well below one V step (~0.03)
    np.testing.assert_allclose(_run(qdq, changed), _run(qdq, feeds), atol=1e-5, rtol=0)
    # the contrast: the same model with the ReduceSum on the float V does move
    raw = onnx.ModelProto()
    raw.CopyFrom(qdq)
    next(n for n in raw.graph.node if n.op_type == "ReduceSum").input[0] = "v"
    assert np.abs(_run(raw, changed) - _run(raw, feeds)).max() > 1e-3


def test_offset_halves_the_int8_error_of_the_product():
    feeds = _feeds(3)
    reference = _run(_attention_model(), feeds)
    errors = {}
    for offset in (False, True):
        qdq, _ = _qdq(offset)
        errors[offset] = float(np.sqrt(np.mean((_run(qdq, feeds) - reference) ** 2)))
    # P's step halves (1/127 -> 1/254 of its range) while V's rounding is the same in both;
    # with 64 keys the P error dominates, so the total error drops below 0.75 of before
    # (measured 0.0085 against 0.0123, a ratio of 0.69).
    assert errors[True] < 0.75 * errors[False], errors


def test_values_of_rank_one_are_left_alone():
    model = _attention_model()
    model.graph.ClearField("value_info")
    v = model.graph.input[1]
    del v.type.tensor_type.shape.dim[:]
    v.type.tensor_type.shape.dim.add().dim_value = S
    model.graph.ClearField("output")
    model.graph.output.extend([helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = onnx.shape_inference.infer_shapes(model)
    assert probability_matmuls(model) == []


def test_per_node_error_rebuilds_the_offset_float_graph(tiny_onnx, tiny_splits, tmp_path):
    # verify's localization and debug-quant compare each quantized node with the float graph
    # it was quantized from: with the offset (and smoothing) that graph must be rebuilt too
    from deploykit.quantize import calibrate
    from deploykit.quantize.config import SmoothQuantConfig
    from deploykit.quantize.debug import float_counterpart, node_errors

    config = QuantConfig(preset="gpu-trt", probability_offset=True, smoothquant=SmoothQuantConfig(alpha=0.5))
    result = calibrate(tiny_onnx, tiny_splits.calibration, tmp_path / "q.onnx", config)
    assert result.probability_offsets                                   # the tiny BERT has 2 layers of P·V
    float_model = float_counterpart(onnx.load(str(tiny_onnx)), result.ranges_path,
                                    quantized=result.path, fp32=tiny_onnx)
    errors = node_errors(float_model, onnx.load(str(result.path)), tiny_splits.calibration)
    assert {e.node for e in errors} >= set(result.probability_offsets)
    assert all(np.isfinite(e.added_snr_db) for e in errors)
