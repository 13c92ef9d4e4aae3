"""ONNX in: a user's FP32 ONNX file (no torch model) through calibrate -> verify -> package,
with that file on ONNX Runtime as the reference, and the file never changed."""

from __future__ import annotations

import json
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from contract import assert_user_error, deploykit, tree_hashes  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


def _export(tiny_bert_dir: Path, folder: Path, exporter: str) -> Path:
    """The tiny BERT exported the way a user would, by either torch exporter, outside deploykit."""
    import torch

    from deploykit._compat import ensure_model_libraries_importable

    ensure_model_libraries_importable()
    from transformers import BertModel

    model = BertModel.from_pretrained(str(tiny_bert_dir), attn_implementation="eager").eval()
    dynamo = exporter == "dynamo"

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            # the dynamo file also carries the pooler output, which is no sentence embedding
            return (out.last_hidden_state, out.pooler_output) if dynamo else out.last_hidden_state

    ids = torch.randint(1000, 30000, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    args = (ids, mask, torch.zeros_like(ids))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "user.onnx"
    if dynamo:
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=128)
        torch.onnx.export(Encoder(), args, str(path), dynamo=True, input_names=INPUTS,
                          output_names=["last_hidden_state", "pooler_output"],
                          dynamic_shapes=({0: batch, 1: seq},) * 3, opset_version=18)
    else:
        torch.onnx.export(Encoder(), args, str(path), dynamo=False, input_names=INPUTS,
                          output_names=["last_hidden_state"],
                          dynamic_axes={n: {0: "batch", 1: "seq"} for n in INPUTS}, opset_version=17)
    return path


@pytest.fixture(scope="module", params=["legacy", "dynamo"])
def user_file(request, tiny_bert_dir, tmp_path_factory) -> tuple[Path, list[str]]:
    """(the user's file, the CLI options it needs): the legacy file has its tokenizer next to it,
    the dynamo one is given it with --option tokenizer=."""
    folder = tmp_path_factory.mktemp(f"user-{request.param}")
    path = _export(tiny_bert_dir, folder / "model", request.param)
    if request.param == "legacy":
        for name in TOKENIZER_FILES:
            if (tiny_bert_dir / name).is_file():
                shutil.copy(tiny_bert_dir / name, path.parent / name)
        return path, []
    return path, ["--option", f"tokenizer={tiny_bert_dir}"]


def _torch_sentence(tiny_bert_dir: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """An independent reference: the torch model itself, mean-pooled over the mask."""
    import torch
    from transformers import BertModel

    model = BertModel.from_pretrained(str(tiny_bert_dir), attn_implementation="eager").eval()
    with torch.inference_mode():
        hidden = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    mask = feeds["attention_mask"][..., None].astype(np.float32)
    return (hidden * mask).sum(1) / mask.sum(1)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_calibrate_and_verify_a_users_file(user_file, tiny_bert_dir, tmp_path):
    import onnxruntime as ort

    path, opts = user_file
    before = tree_hashes(path.parent)
    data = ["--data", "docstrings", "--calibration", "24", "--evaluation", "40"]
    deploykit("-q", "calibrate", str(path), "-o", "out/user.int8.onnx", *data, *opts, cwd=tmp_path)
    prepared, int8 = tmp_path / "out" / "user.fp32.onnx", tmp_path / "out" / "user.int8.onnx"
    assert prepared.is_file() and int8.is_file()
    ops = [n.op_type for n in onnx.load(str(int8)).graph.node]
    assert ops.count("QuantizeLinear") >= 8 and "DequantizeLinear" in ops       # 2 layers x 6 weight MatMuls
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(prepared), load_external_data=False).metadata_props}
    assert meta["deploykit.reference"] == "fp32 onnx on ort-cpu"
    assert meta["deploykit.info"]["pooling"] == "mean"              # token embeddings in, mean pooling added

    deploykit("-q", "verify", str(path), str(int8), *data, *opts, "--backend", "ort-cpu",
              "--inputs", "out/inputs.npz", "--report", "out/report.json", cwd=tmp_path)
    assert tree_hashes(path.parent) == before, "the user's folder changed"
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["verification"]["reference_model"] == "fp32 onnx on ort-cpu"
    assert set(report["parity"]) == {"fp32@ort-cpu", "int8@ort-cpu"}
    feeds = {k: v for k, v in np.load(tmp_path / "out" / "inputs.npz").items() if k in INPUTS}
    # recompute the figures here: the user's file on ORT, pooled in numpy, is the reference
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    tokens = session.run(["last_hidden_state"], feeds)[0]
    mask = feeds["attention_mask"][..., None].astype(np.float32)
    reference = (tokens * mask).sum(1) / mask.sum(1)
    # the ORT graph and torch agree to float32 rounding over 2 layers of width 32
    np.testing.assert_allclose(reference, _torch_sentence(tiny_bert_dir, feeds), atol=1e-4)
    # a gpu-trt model: verify scores it with Q/DQ unfused (TensorRT's exact arithmetic)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    quantized = ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    cos = _cosines(reference, quantized)
    parity = report["parity"]["int8@ort-cpu"]
    # verify trims each batch to its longest row; masked positions change rounding only
    assert parity["cosine_mean"] == pytest.approx(cos.mean(), abs=1e-6)
    assert parity["cosine_min"] == pytest.approx(cos.min(), abs=1e-5)
    assert report["parity"]["fp32@ort-cpu"]["cosine_min"] > 0.99999       # prepared graph = user's graph
    assert 0.99 < parity["cosine_mean"] < 1.0     # naive W8A8 on a random tiny BERT is close, not exact


def test_run_and_package_a_users_file(user_file, tmp_path):
    path, opts = user_file
    if opts:
        pytest.skip("one run through package is enough (the legacy file)")
    before = tree_hashes(path.parent)
    (tmp_path / "r.yaml").write_text(f"""
name: user
targets: [edge-cpu-x86]
model: {{source: "onnx:{path}", options: {{max_length: 64}}}}
data: {{source: docstrings, calibration: 24, evaluation: 48, seed: 2}}
bench: {{batches: [1], seq_len: 64, warmup: 0, iterations: 2, min_seconds: 0.0, torch_baseline: false}}
acceptance: {{fp32.cosine_min: ">= 0.99999", int8.cosine_mean: ">= 0.99"}}
package: {{targets: []}}
""")
    deploykit("-q", "run", "r.yaml", "--out", "out", cwd=tmp_path)
    run = tmp_path / "out" / "user"
    report = json.loads((run / "report.json").read_text())
    assert report["verification"]["reference_model"] == "fp32 onnx on ort-cpu"
    assert not any(k.endswith("@torch") or "@torch/" in k for k in list(report["parity"]) + list(report["latency"]))
    assert "fp32 onnx on ort-cpu" in (run / "report.md").read_text()
    deploykit("-q", "package", str(run), "--target", "edge-cpu-x86", "-o", "b.tar.gz", cwd=tmp_path)
    with tarfile.open(tmp_path / "b.tar.gz") as tar:
        names = tar.getnames()
        manifest = json.load(tar.extractfile(next(n for n in names if n.endswith("manifest.json"))))
    assert any(n.endswith("model/model.int8.onnx") for n in names)
    assert any(n.endswith("model/model.onnx") for n in names)
    assert manifest["reference"] == "fp32 onnx on ort-cpu"
    assert manifest["model"] == f"onnx:{path.name}"     # named, not the packaging machine's path
    assert tree_hashes(path.parent) == before


# ----------------------------------------------------------------------------- bad inputs
def _graph(inputs: list[onnx.ValueInfoProto], folder: Path, name: str = "m.onnx", external: bool = False) -> Path:
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    node = helper.make_node("MatMul", [inputs[0].name, "w"], ["y"])
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / name
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, location="m.data", size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return path


def test_not_onnx(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07 not protobuf \xff\xfe")
    assert_user_error(deploykit("calibrate", "bad.onnx", "-o", "o.onnx", cwd=tmp_path, check_rc=None),
                      "bad.onnx", "not a readable ONNX model")


def test_missing_external_data(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])
    path = _graph([x], tmp_path, external=True)
    (tmp_path / "m.data").unlink()
    proc = deploykit("calibrate", str(path), "-o", "out/o.onnx", cwd=tmp_path, check_rc=None)
    assert_user_error(proc, "m.onnx", "external data", "m.data")
    assert not (tmp_path / "out").exists()


def test_unsupported_inputs(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["b", 4])
    path = _graph([x], tmp_path)
    assert_user_error(deploykit("calibrate", str(path), "-o", "o.onnx", cwd=tmp_path, check_rc=None),
                      "m.onnx", "unsupported inputs", "pixel_values")


def test_static_batch_and_no_tokenizer(user_file, tmp_path):
    path, opts = user_file
    if not opts:
        pytest.skip("the legacy file has its tokenizer next to it")
    copy = tmp_path / "alone"
    shutil.copytree(path.parent, copy)
    assert_user_error(deploykit("calibrate", str(copy / "user.onnx"), "-o", "o.onnx", cwd=tmp_path, check_rc=None),
                      "user.onnx", "cannot form the feeds", "tokenizer")
    model = onnx.load(str(copy / "user.onnx"), load_external_data=False)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    onnx.save_model(model, str(copy / "static.onnx"))
    proc = deploykit("calibrate", str(copy / "static.onnx"), "-o", "o.onnx", *opts, cwd=tmp_path, check_rc=None)
    assert_user_error(proc, "static.onnx", "input_ids", "dynamic")


# ----------------------------------------------------------------------------- the real L3 ONNX
@pytest.mark.slow
def test_minilm_l3_prepare_and_calibrate(tmp_path):
    import onnxruntime as ort

    from deploykit.models import load_model
    from deploykit.models.onnx_source import embedded_minilm_l3

    shipped = embedded_minilm_l3()
    digest = tree_hashes(shipped.parent)
    bundle = load_model("embedded:minilm-l3")
    assert bundle.info["output_kind"] == "sentence" and bundle.info["vocab_size"] == 30522
    deploykit("-q", "calibrate", str(shipped), "-m", "embedded:minilm-l3", "-o", "out/l3.int8.onnx",
              "--data", "docstrings", "--calibration", "16", "--evaluation", "16", cwd=tmp_path)
    prepared = tmp_path / "out" / f"{shipped.stem}.fp32.onnx"
    model = onnx.load(str(prepared))
    inits = {t.name for t in model.graph.initializer}
    weight_matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert len(weight_matmuls) == 18                # 3 layers x (Q, K, V, output, FFN in, FFN out)
    assert [o.name for o in model.graph.output] == ["sentence_embedding"]
    # the shipped sentence output is the mean of its token embeddings over the mask: check it
    feeds = bundle.preprocessor(["Return the sum of a and b.", "Open the file and read it."])
    outs = {o.name: v for o, v in zip(ort.InferenceSession(str(shipped)).get_outputs(),
                                      ort.InferenceSession(str(shipped)).run(None, feeds))}
    tokens, mask = outs["onnx::Shape_422"], feeds["attention_mask"][..., None]
    np.testing.assert_allclose(outs[bundle.info["onnx_output"]], (tokens * mask).sum(1) / mask.sum(1),
                               atol=1e-5)             # float32 sums over 128 positions
    ops = [n.op_type for n in onnx.load(str(tmp_path / "out" / "l3.int8.onnx")).graph.node]
    assert ops.count("QuantizeLinear") >= 18
    assert tree_hashes(shipped.parent) == digest
