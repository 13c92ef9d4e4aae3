"""INT8 embedding tables (per-row symmetric int8): exact rows against numpy, each graph form on
ONNX Runtime, TensorRT's form standard-ONNX only, target checks, and calibrate's sizes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deploykit.errors import UserError
from deploykit.quantize import QuantConfig, calibrate
from deploykit.quantize.embeddings import FORMS, embedding_tables, quantize_embeddings
from deploykit.quantize.graph import cpu_session
from deploykit.targets import check_model, check_quant_config, get_target

VOCAB, DIM, POSITIONS = 300, 48, 16


def _numpy_rows(table: np.ndarray) -> np.ndarray:
    """Per-row symmetric int8, written out independently: scale max|row|/127, round half to even."""
    out = np.empty_like(table)
    for i, row in enumerate(table):
        scale = np.float32(np.abs(row).max()) / np.float32(127)
        if scale == 0:
            out[i] = 0
            continue
        q = np.clip(np.round(row / scale), -127, 127)
        out[i] = q.astype(np.float32) * scale
    return out


def _embedding_graph(seed: int = 0, tied: bool = False):
    """ids -> Gather(word) + Gather(position) -> LayerNorm -> MatMul: an embedding block, small."""
    rng = np.random.default_rng(seed)
    word = rng.normal(0, 0.05, (VOCAB, DIM)).astype(np.float32)
    word[7] = 0.0                                                    # an all-zero row
    word[11] *= 40.0                                                 # one outlier row
    pos = rng.normal(0, 0.02, (POSITIONS, DIM)).astype(np.float32)   # fewer rows than MIN_ROWS
    w = rng.normal(0, 0.2, (DIM, 8)).astype(np.float32)
    inits = [numpy_helper.from_array(word, "word"), numpy_helper.from_array(pos, "pos"),
             numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.ones(DIM, np.float32), "gamma"),
             numpy_helper.from_array(np.zeros(DIM, np.float32), "beta"),
             numpy_helper.from_array(np.arange(POSITIONS, dtype=np.int64)[None], "pos_ids")]
    nodes = [helper.make_node("Gather", ["word", "ids"], ["we"], name="gather_word"),
             helper.make_node("Gather", ["pos", "pos_ids"], ["pe"], name="gather_pos"),
             helper.make_node("Add", ["we", "pe"], ["emb"], name="add"),
             helper.make_node("LayerNormalization", ["emb", "gamma", "beta"], ["ln"], axis=-1, name="ln"),
             helper.make_node("MatMul", ["ln", "w"], ["out"], name="proj")]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", POSITIONS, 8]),
               helper.make_tensor_value_info("we", TensorProto.FLOAT, ["b", POSITIONS, DIM])]
    if tied:   # the table is also an output projection's weight (tied embeddings)
        nodes.append(helper.make_node("MatMul", ["ln", "word_t"], ["logits"], name="lm_head"))
        nodes.insert(0, helper.make_node("Transpose", ["word"], ["word_t"], name="tie"))
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", POSITIONS, VOCAB]))
    graph = helper.make_graph(nodes, "emb", [helper.make_tensor_value_info("ids", TensorProto.INT64,
                                                                          ["b", POSITIONS])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), word


def _run(model: onnx.ModelProto, ids: np.ndarray) -> list[np.ndarray]:
    return cpu_session(model, 1).run(None, {"ids": ids})


ALL_IDS = np.arange(VOCAB - VOCAB % POSITIONS, dtype=np.int64).reshape(-1, POSITIONS)


@pytest.mark.parametrize("form", FORMS)
def test_each_form_gathers_exactly_the_numpy_per_row_int8_rows(form):
    model, word = _embedding_graph()
    records = quantize_embeddings(model, form)
    assert [r["name"] for r in records] == ["word"]                  # "pos" has < MIN_ROWS rows
    onnx.checker.check_model(model)
    assert "word" not in {i.name for i in model.graph.initializer}, "the float table must be gone"
    ids = np.concatenate([ALL_IDS, np.arange(POSITIONS, dtype=np.int64)[None] + (VOCAB - POSITIONS)])
    rows = _run(model, ids)[1].reshape(-1, DIM)
    expected = _numpy_rows(word)[ids.reshape(-1)]
    # Exact: the same float32 product q * scale, whichever op computes it.
    np.testing.assert_array_equal(rows, expected)
    np.testing.assert_array_equal(rows[ids.reshape(-1) == 7], 0.0)
    # Rounding bound: each element within half a step of its row (float32 product slack 1e-6 relative).
    step = np.abs(word).max(axis=1) / 127
    err = np.abs(rows - word[ids.reshape(-1)])
    assert np.all(err <= step[ids.reshape(-1), None] * (0.5 + 1e-6))


@pytest.mark.parametrize("form", FORMS)
def test_graph_output_stays_within_the_rounding_bound(form):
    model, word = _embedding_graph(seed=1)
    fp32 = _run(model, ALL_IDS)[0]
    quantize_embeddings(model, form)
    got = _run(model, ALL_IDS)[0]
    # Each looked-up row is off by at most half a step per element, so its relative L2 error is
    # at most sqrt(D) * step/2 / ||row||; LayerNorm rescales the sum and the MatMul is a fixed
    # linear map (its gain bounded by the ratio of its extreme singular values). 1 - cos of the
    # outputs is then at most (gain * rel)^2 / 2.
    rows = word[ALL_IDS.reshape(-1)]
    norms = np.linalg.norm(rows, axis=1)
    live = norms > 0
    rel = (np.sqrt(DIM) * np.abs(rows).max(axis=1)[live] / 127 / 2 / norms[live]).max()
    sv = np.linalg.svd(numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w")),
                       compute_uv=False)
    gain = sv.max() / sv.min()
    a, b = fp32.reshape(-1, 8), got.reshape(-1, 8)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 1 - (gain * 2 * rel) ** 2 / 2    # 2 rel: the position row adds no error, LN at most doubles it
    assert cos.min() < 1.0, "the comparison must see the rounding (else it checks nothing)"


def test_tensorrt_form_is_standard_onnx_and_gather_block_is_refused_for_tensorrt(tmp_path):
    h100, cpu = get_target("h100"), get_target("edge-cpu-x86")
    trt_model, _ = _embedding_graph()
    quantize_embeddings(trt_model, "dq-gather")
    assert {n.domain for n in trt_model.graph.node} <= {"", "ai.onnx"}
    dq = next(n for n in trt_model.graph.node if n.op_type == "DequantizeLinear")
    assert next(a.i for a in dq.attribute if a.name == "axis") == 0
    scale = next(numpy_helper.to_array(i) for i in trt_model.graph.initializer if i.name == dq.input[1])
    assert scale.shape == (VOCAB,) and np.all(scale > 0)            # TensorRT: 1-D, strictly positive
    assert len(dq.input) == 2                                        # zero point absent: 0 (symmetric)
    check_model(trt_model, h100)
    ort_model, _ = _embedding_graph()
    quantize_embeddings(ort_model, "gather-block")
    with pytest.raises(UserError, match="com.microsoft.GatherBlockQuantized"):
        check_model(ort_model, h100)
    check_model(ort_model, cpu)
    with pytest.raises(UserError, match="gather-block"):
        check_quant_config(QuantConfig(embeddings="gather-block"), "gpu-trt", h100)
    check_quant_config(QuantConfig(embeddings="gather-block"), "cpu-ort", cpu)


def test_tied_and_small_tables_stay_float():
    model, _ = _embedding_graph(tied=True)
    assert embedding_tables(model) == []                              # also read by Transpose -> lm_head
    assert quantize_embeddings(model, "dq-gather") == []
    small, _ = _embedding_graph()
    assert embedding_tables(small, min_rows=POSITIONS) == ["word", "pos"]


def test_presets_and_bad_forms():
    assert QuantConfig().resolved("gpu-trt").embeddings == "dq-gather"
    assert QuantConfig(embeddings=True).resolved("paper-w8a8").embeddings == "dq-gather"
    assert QuantConfig().resolved("paper-w8a8").embeddings is False
    assert QuantConfig(embeddings=False).resolved("gpu-trt").embeddings is False
    with pytest.raises(UserError, match="unknown quantize.embeddings form"):
        QuantConfig(embeddings="int4").resolved("gpu-trt")


def test_calibrate_stores_int8_embeddings_and_reports_sizes(tiny_onnx, tiny_splits, tmp_path):
    from deploykit.verify import embedding_metrics, run_split
    from deploykit.runners import OrtRunner

    plain = calibrate(tiny_onnx, tiny_splits.calibration, tmp_path / "plain.onnx",
                      QuantConfig(method="minmax", embeddings=False))
    small = calibrate(tiny_onnx, tiny_splits.calibration, tmp_path / "small.onnx", QuantConfig(method="minmax"))
    assert plain.embeddings == [] and [e["name"] for e in small.embeddings] == \
        ["model.embeddings.word_embeddings.weight"]                 # 30522 x 32; positions: 128 < MIN_ROWS
    table = small.embeddings[0]
    assert table["bytes_fp32"] == 30522 * 32 * 4 and table["bytes_int8"] == 30522 * 32 + 30522 * 4
    sizes = small.summary()["file_sizes"]
    assert sizes["fp32_bytes"] == tiny_onnx.stat().st_size
    assert sizes["int8_bytes"] == (tmp_path / "small.onnx").stat().st_size
    # What the rewrite saves is what the file loses, up to the node and name bytes it adds.
    saved = plain.file_sizes["int8_bytes"] - sizes["int8_bytes"]
    assert abs(saved - (table["bytes_fp32"] - table["bytes_int8"])) < 4096
    assert onnx.load(str(tmp_path / "small.onnx")).metadata_props
    # Same accuracy against the FP32 export: the int8 rows move the INT8 model's outputs less
    # than the activation rounding already does (MiniLM-scale bound in docs/int8-embeddings.md).
    reference = run_split(OrtRunner(tiny_onnx), tiny_splits.evaluation)
    m_plain, _ = embedding_metrics(reference, run_split(OrtRunner(tmp_path / "plain.onnx"), tiny_splits.evaluation))
    m_small, _ = embedding_metrics(reference, run_split(OrtRunner(tmp_path / "small.onnx"), tiny_splits.evaluation))
    assert m_small["cosine_mean"] >= m_plain["cosine_mean"] - 2e-3   # random-init width 32: noisy, 2e-3 of slack
