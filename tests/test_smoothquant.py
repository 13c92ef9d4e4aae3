"""SmoothQuant on the ONNX graph: function-preserving folds, and it does reduce the error."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deploykit.data import Split, iterate_batches
from deploykit.errors import UserError
from deploykit.quantize import QuantConfig, SmoothQuantConfig, build_qdq, load_for_quantization, prepare
from deploykit.quantize import smoothquant as sq

# Smoothing rescales weights and activations by exact reciprocals; only float rounding of
# the rescaled products differs. On L2-normalised embeddings that is ~1e-7; 2e-6 absolute is
# tight enough that a wrong channel mapping (an error of order 1e-1) cannot pass.
FP32_TOL = 2e-6


def _run(model: onnx.ModelProto, split: Split) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return np.concatenate([session.run(None, {n: f[n] for n in names})[0] for f in iterate_batches(split.feeds, 16)])


@pytest.fixture(scope="module")
def inferred(tiny_onnx):
    return load_for_quantization(Path(tiny_onnx))[1]


@pytest.mark.parametrize("targets", ["ln-fed", "all"])
def test_post_ln_bert_smoothing_keeps_fp32_outputs(inferred, tiny_splits, targets):
    smoothed, records, _ = sq.smooth(inferred, tiny_splits.calibration, 0.8, targets=targets)
    folds = Counter(r["fold"] for r in records)
    if targets == "ln-fed":
        # post-LN BERT: every LayerNorm output also feeds the residual, so no LN fold is exact
        assert folds == {"mul": 4}                               # 2 layers x (QKV, FFN-in)
    else:
        assert folds["linear"] == 2 and folds["layernorm"] == 0  # value -> output projection, per layer
    assert len(smoothed.graph.node) == len(inferred.graph.node) + folds["mul"]
    np.testing.assert_allclose(_run(smoothed, tiny_splits.evaluation), _run(inferred, tiny_splits.evaluation),
                               atol=FP32_TOL, rtol=0)


def test_pre_ln_vit_folds_into_layernorm_without_extra_ops(tmp_path):
    from deploykit.data import DataSpec, make_splits
    from deploykit.export import export_onnx
    from deploykit.models import load_model

    bundle = load_model("timm:vit_tiny_patch16_224", {"img_size": 16, "patch_size": 8, "num_classes": 10})
    export_onnx(bundle, tmp_path / "vit.onnx")
    model = load_for_quantization(tmp_path / "vit.onnx")[1]
    splits = make_splits(bundle, DataSpec(source="digits", calibration=32, evaluation=32))
    smoothed, records, _ = sq.smooth(model, splits.calibration, 0.8, targets="ln-fed")
    assert {r["fold"] for r in records} == {"layernorm"} and len(records) == 24   # 12 blocks x (qkv, fc1)
    assert len(smoothed.graph.node) == len(model.graph.node)
    a, b = _run(model, splits.evaluation), _run(smoothed, splits.evaluation)
    np.testing.assert_allclose(b, a, atol=1e-5 * np.abs(a).max(), rtol=0)


def test_a_wrong_fold_is_caught_and_replaced_by_mul(inferred, tiny_splits, monkeypatch):
    real = sq._plan_fold

    def wrong(group, prod, users, inits):   # claim every group folds into the first LayerNorm
        real(group, prod, users, inits)
        ln = next(n for n in prod.values() if n.op_type == "LayerNormalization")
        group.fold, group.fold_nodes = "layernorm", [ln.name]

    monkeypatch.setattr(sq, "_plan_fold", wrong)
    smoothed, records, _ = sq.smooth(inferred, tiny_splits.calibration, 0.8, targets="ln-fed")
    assert {r["fold"] for r in records} == {"mul"}
    np.testing.assert_allclose(_run(smoothed, tiny_splits.evaluation), _run(inferred, tiny_splits.evaluation),
                               atol=FP32_TOL, rtol=0)


def test_records_reapply_to_the_same_graph(inferred, tiny_splits):
    smoothed, records, _ = sq.smooth(inferred, tiny_splits.calibration, 0.65, targets="all")
    again = sq.reapply(inferred, records)
    a = {i.name: i.SerializeToString() for i in smoothed.graph.initializer}
    b = {i.name: i.SerializeToString() for i in again.graph.initializer}
    assert a == b and [n.name for n in smoothed.graph.node] == [n.name for n in again.graph.node]


def test_alpha_outside_unit_interval_is_a_user_error(inferred, tiny_splits):
    with pytest.raises(UserError, match="alpha"):
        sq.smooth(inferred, tiny_splits.calibration, 1.5)


def _outlier_model(k: int = 64, n: int = 32, outlier: float = 50.0) -> onnx.ModelProto:
    """x -> LayerNorm (one channel's gamma is ``outlier`` x the rest) -> MatMul(W)."""
    rng = np.random.default_rng(0)
    gamma = np.ones(k, np.float32)
    gamma[7] = outlier
    inits = [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(np.zeros(k, np.float32), "beta"),
             numpy_helper.from_array((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), "w")]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], name="ln", axis=-1),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "outlier", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return onnx.shape_inference.infer_shapes(model)


def test_smoothing_reduces_int8_error_on_an_outlier_channel():
    model = _outlier_model()
    rng = np.random.default_rng(1)
    cal = Split("calibration", {"x": rng.standard_normal((256, 64)).astype(np.float32)}, "c")
    ev = Split("evaluation", {"x": rng.standard_normal((256, 64)).astype(np.float32)}, "e")
    reference = _run(model, ev)

    def snr(alpha):
        config = QuantConfig(method="minmax", smoothquant=SmoothQuantConfig(alpha=alpha)).resolved()
        prepared = prepare(model, cal, config, alpha=alpha)
        out = _run(build_qdq(prepared, prepared.ranges()), ev)
        return 10 * np.log10(np.sum(reference ** 2) / np.sum((reference - out) ** 2))

    plain, smoothed = snr(None), snr(0.5)
    # One channel at 50x stretches the per-tensor int8 step 50-fold for all 64 channels;
    # alpha=0.5 moves sqrt(50) of it into the weights (folded into the LayerNorm here).
    # Measured: 27.1 dB plain vs 40.2 dB smoothed; require an 8 dB gain (the data is seeded,
    # so the margin only has to cover differences between ORT builds).
    assert smoothed > plain + 8.0


def test_group_kinds_follow_the_block_structure(inferred):
    # The kinds come from the graph alone; the torch module each MatMul came from says what
    # it really is (BERT's names), so the two are checked against each other.
    from deploykit.quantize.debug import torch_module

    by_name = {n.name: n for n in inferred.graph.node}
    groups = sq.find_groups(inferred, "all")
    expected = {"attention.self": "attention-in", "attention.output": "attention-out",
                "intermediate": "mlp-in", "output": "mlp-out"}
    assert Counter(g.kind for g in groups) == {k: 2 for k in expected.values()}   # 2 layers, one of each
    for group in groups:
        module = torch_module(by_name[group.nodes[0]])
        part = next(key for key in expected if f".{key}." in module)
        assert group.kind == expected[part], (module, group.kind)


def test_alpha_per_kind_smooths_only_those_kinds_with_their_strength(inferred, tiny_splits):
    _, all_records, stats = sq.smooth(inferred, tiny_splits.calibration, 0.8, targets="all")
    smoothed, records, _ = sq.smooth(inferred, tiny_splits.calibration, {"mlp-out": 0.5, "attention-in": 0.8},
                                     targets="all", stats=stats)
    assert sorted(Counter(r["kind"] for r in records).items()) == [("attention-in", 2), ("mlp-out", 2)]
    assert all(r["alpha"] == {"mlp-out": 0.5, "attention-in": 0.8}[r["kind"]] for r in records)
    # the attention-in scales are those of one global 0.8 (same statistics, same formula)
    global_scales = {r["input"]: r["scales"] for r in all_records}
    for r in records:
        if r["kind"] == "attention-in":
            assert r["scales"] == global_scales[r["input"]]
        else:
            assert r["scales"] != global_scales[r["input"]]
    # smoothing is exact in real arithmetic; the FP32 graph must still agree to float rounding
    assert sq.outputs_match(inferred, smoothed, tiny_splits.evaluation)


def test_alpha_for_an_unknown_kind_is_a_user_error(inferred, tiny_splits):
    with pytest.raises(UserError, match="group kind"):
        sq.smooth(inferred, tiny_splits.calibration, {"qkv": 0.8}, targets="all")
    with pytest.raises(UserError, match="group kind"):
        QuantConfig(smoothquant=SmoothQuantConfig(alpha={"qkv": 0.5})).resolved()
