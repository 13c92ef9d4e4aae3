"""Feeds checked against the ONNX model before ONNX Runtime (or torch) runs them: one line naming
the data and the model file, exit 2, inputs unchanged, nothing written or left behind.

The model is a BERT with a 100-token vocabulary and 64 positions, so MiniLM's tokenizer (30,522
tokens) and long sequences overrun its tables."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).parent))

from contract import assert_no_temp_files, assert_user_error, deploykit, tree_hashes  # noqa: E402

from deploykit.errors import UserError  # noqa: E402
from deploykit.feeds import check_feeds, feed_spec  # noqa: E402

VOCAB, POSITIONS = 100, 64
SPLIT = ["--calibration", "4", "--evaluation", "8"]


@pytest.fixture(scope="module")
def small_vocab_onnx(tmp_path_factory) -> Path:
    import torch

    from deploykit._compat import ensure_model_libraries_importable
    from deploykit.models.text import embedded_minilm_dir

    ensure_model_libraries_importable()
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("small-vocab")
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=POSITIONS)
    torch.manual_seed(0)
    BertModel(config).eval().save_pretrained(str(folder / "bert"))
    AutoTokenizer.from_pretrained(str(embedded_minilm_dir())).save_pretrained(str(folder / "bert"))
    deploykit("-q", "export", str(folder / "bert"), "-o", "m.onnx", "--option", "max_length=32", cwd=folder)
    return folder / "m.onnx"


def _feeds(n: int = 8, seq: int = 16, **override) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, VOCAB, (n, seq)), "attention_mask": np.ones((n, seq), np.int64),
             "token_type_ids": np.zeros((n, seq), np.int64)}
    feeds.update(override)
    return {k: v for k, v in feeds.items() if v is not None}


def _refused(model: Path, tmp_path: Path, command: list[str], feeds: dict | None, *fragments: str):
    """Run ``command`` on a copy of ``model`` (and ``bad.npz`` when ``feeds``); check the contract."""
    work, tmp = tmp_path / "w", tmp_path / "tmp"
    work.mkdir(parents=True)
    (work / "m.onnx").write_bytes(model.read_bytes())
    if feeds is not None:
        np.savez(work / "bad.npz", **feeds)
    before = tree_hashes(work)
    proc = deploykit(*command, cwd=work, check_rc=None, tmpdir=tmp)
    assert_user_error(proc, "m.onnx", *fragments)
    assert tree_hashes(work) == before                   # inputs unchanged, nothing written
    assert_no_temp_files(work, tmp)                      # (importing onnxruntime leaves a .ses file in TMPDIR)
    return proc


# ----------------------------------------------------------------------------- through the CLI
def test_tokenized_text_outside_the_vocabulary(small_vocab_onnx, tmp_path):
    proc = _refused(small_vocab_onnx, tmp_path, ["verify", "m.onnx", *SPLIT, "--backend", "ort-cpu"], None,
                    "token ids outside [0, 100)", "data: docstrings", "tokenizer")
    assert "IndexError" not in proc.stderr and "INVALID_ARGUMENT" not in proc.stderr


def test_npz_token_ids_outside_the_vocabulary_calibrate(small_vocab_onnx, tmp_path):
    ids = _feeds()["input_ids"]
    ids[3, 2] = VOCAB + 50
    _refused(small_vocab_onnx, tmp_path, ["calibrate", "m.onnx", "-o", "q.onnx", "--data", "bad.npz", *SPLIT],
             _feeds(input_ids=ids), "bad.npz:", "outside [0, 100) (e.g. 150)", "word_embeddings")


def test_inputs_disagree_on_sequence_length_bench(small_vocab_onnx, tmp_path):
    _refused(small_vocab_onnx, tmp_path, ["bench", "m.onnx", "--data", "bad.npz", *SPLIT, "--seq", "8",
                                          "--batch", "1", "--no-torch"],
             _feeds(attention_mask=np.ones((8, 12), np.int64)), "bad.npz:", "disagree on the sequence length",
             "'input_ids' 16", "'attention_mask' 12")


def test_sequences_longer_than_the_position_table(small_vocab_onnx, tmp_path):
    _refused(small_vocab_onnx, tmp_path, ["verify", "m.onnx", "--data", "bad.npz", "--backend", "ort-cpu"],
             _feeds(seq=80), "bad.npz:", "80 tokens long", "64 positions", "max_length <= 64")


def test_bench_seq_longer_than_the_position_table(small_vocab_onnx, tmp_path):
    mask = np.zeros((8, 96), np.int64)
    mask[:, :20] = 1                      # padded to 96, 20 used: verify would run it, bench --seq 80 cannot
    _refused(small_vocab_onnx, tmp_path, ["bench", "m.onnx", "--data", "bad.npz", *SPLIT, "--seq", "80",
                                          "--batch", "1", "--no-torch"],
             _feeds(seq=96, attention_mask=mask), "bad.npz:", "80 tokens long", "64 positions", "--seq")


def test_input_names_that_do_not_match_name_both_files(small_vocab_onnx, tmp_path):
    feeds = _feeds()
    feeds = {"ids": feeds["input_ids"], "attention_mask": feeds["attention_mask"],
             "token_type_ids": feeds["token_type_ids"]}
    _refused(small_vocab_onnx, tmp_path, ["verify", "m.onnx", "--data", "bad.npz", "--backend", "ort-cpu"],
             feeds, "bad.npz:", "lacks ['input_ids']", "['ids']", "does not take", "fix: save arrays named")


def test_wrong_rank_and_uncastable_dtype(small_vocab_onnx, tmp_path):
    _refused(small_vocab_onnx, tmp_path / "rank", ["verify", "m.onnx", "--data", "bad.npz", "--backend", "ort-cpu"],
             _feeds(token_type_ids=np.zeros((8, 16, 1), np.int64)), "bad.npz:", "'token_type_ids' has shape (8, 16, 1)",
             "the model takes (N, sequence)")
    _refused(small_vocab_onnx, tmp_path / "dtype", ["calibrate", "m.onnx", "-o", "q.onnx", "--data", "bad.npz",
                                                   *SPLIT], _feeds(input_ids=np.ones((8, 16), np.float32)),
             "bad.npz:", "'input_ids' is float32, the model takes int64", "save 'input_ids' as int64")


# ----------------------------------------------------------------------------- the checker itself
def _toy_model() -> onnx.ModelProto:
    """input_ids/attention_mask [batch, sequence] -> word Gather (vocab 10) + position Gather (8 rows)."""
    words = helper.make_tensor("emb.word_embeddings.weight", TensorProto.FLOAT, [10, 4], [0.0] * 40)
    positions = helper.make_tensor("emb.position_embeddings.weight", TensorProto.FLOAT, [8, 4], [0.0] * 32)
    position_ids = helper.make_tensor("position_ids", TensorProto.INT64, [8], list(range(8)))
    nodes = [helper.make_node("Cast", ["input_ids"], ["ids"], to=TensorProto.INT64),
             helper.make_node("Gather", ["emb.word_embeddings.weight", "ids"], ["w"]),
             helper.make_node("Gather", ["emb.position_embeddings.weight", "position_ids"], ["p"]),
             helper.make_node("Add", ["w", "p"], ["out"])]
    graph = helper.make_graph(
        nodes, "toy",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [words, positions, position_ids])
    return helper.make_model(graph)


def test_checker_reads_the_tables_and_refuses_each_class():
    spec = feed_spec(_toy_model(), "toy.onnx")
    assert spec.tables == {"input_ids": ("emb.word_embeddings.weight", 10)}
    assert spec.positions == ("emb.position_embeddings.weight", 8)
    assert [(i.name, i.dims) for i in spec.inputs] == [("input_ids", ["batch", "sequence"]),
                                                       ("attention_mask", ["batch", "sequence"])]

    good = {"input_ids": np.array([[1, 9, 0]], np.int32), "attention_mask": np.ones((1, 3), bool)}
    out = check_feeds(good, spec, data="d.npz")            # castable dtypes are cast, values kept
    assert out["input_ids"].dtype == np.int64 and out["attention_mask"].dtype == np.int64
    assert out["input_ids"].tolist() == [[1, 9, 0]] and good["input_ids"].dtype == np.int32

    # padding the model never runs (attention_mask 0 in every row) does not count against the positions
    mask = np.zeros((2, 12), np.int64)
    mask[:, :5] = 1
    check_feeds({"input_ids": np.zeros((2, 12), np.int64), "attention_mask": mask}, spec, data="d.npz")
    with pytest.raises(UserError, match="12 tokens long, longer than the 8 positions"):
        check_feeds({"input_ids": np.zeros((2, 12), np.int64), "attention_mask": mask}, spec, data="d.npz",
                    trimmed=False)

    ids = np.zeros((2, 4), np.int64)
    cases = [
        ({"input_ids": ids + 10, "attention_mask": ids}, "outside [0, 10) (e.g. 10)"),
        ({"input_ids": ids - 1, "attention_mask": ids}, "outside [0, 10) (e.g. -1)"),
        ({"input_ids": ids, "attention_mask": np.zeros((2, 3), np.int64)}, "disagree on the sequence length"),
        ({"input_ids": ids, "attention_mask": np.zeros((3, 4), np.int64)}, "disagree on the number of samples"),
        ({"input_ids": np.zeros((2, 9), np.int64), "attention_mask": np.ones((2, 9), np.int64)}, "9 tokens long"),
        ({"input_ids": ids}, "lacks ['attention_mask']"),
        ({"input_ids": ids, "attention_mask": ids, "extra": ids}, "has ['extra'], which it does not take"),
        ({"input_ids": ids[0], "attention_mask": ids}, "has shape (4,), the model takes (N, sequence)"),
        ({"input_ids": ids.astype(np.float64), "attention_mask": ids}, "is float64, the model takes int64"),
        ({"input_ids": ids, "attention_mask": np.full((2, 4), 2**63 + 1, np.uint64)}, "is uint64"),
    ]
    for feeds, fragment in cases:
        with pytest.raises(UserError) as info:
            check_feeds(feeds, spec, data="d.npz")
        line = str(info.value)
        assert fragment in line, line
        assert line.startswith("d.npz: ") and "toy.onnx" in line and "; fix: " in line and "\n" not in line, line
    # a source that is not a file: the model file leads, the data is named in the message
    with pytest.raises(UserError, match=r"^toy.onnx: .*\(data: docstrings\); fix: "):
        check_feeds({"input_ids": ids + 10, "attention_mask": ids}, spec, data="docstrings")
