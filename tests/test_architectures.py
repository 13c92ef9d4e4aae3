"""Random-init architectures through the hf:<folder> source: export, calibrate, verify.

Each family is a 2-layer, width-32 Hugging Face model saved with save_pretrained (text
models share MiniLM's WordPiece tokenizer), so every graph pattern deploykit quantizes is
covered without shipped weights: post-LN BERT, RoBERTa's padding-offset positions,
DistilBERT's fused attention module and no token types, DeBERTa-v2's disentangled relative
attention, MPNet's relative position bias, and ViT's pre-LN blocks (with its head and bare).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from deploykit.data import DataSpec, make_splits
from deploykit.export import export_onnx
from deploykit.models import load_model
from deploykit.quantize import QuantConfig, calibrate
from deploykit.runners import OrtRunner
from deploykit.verify import embedding_metrics, run_split

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _text_model(family: str, vocab: int):
    import transformers as T

    if family == "bert":
        return T.BertModel(T.BertConfig(vocab_size=vocab, max_position_embeddings=64, **SMALL))
    if family == "roberta":     # pad id 0 is MiniLM's [PAD]: positions start at 1
        return T.RobertaModel(T.RobertaConfig(vocab_size=vocab, max_position_embeddings=66, pad_token_id=0,
                                              type_vocab_size=1, **SMALL))
    if family == "distilbert":
        return T.DistilBertModel(T.DistilBertConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=2,
                                                    hidden_dim=64, max_position_embeddings=64, pad_token_id=0))
    if family == "deberta-v2":  # the DeBERTa-v3 attention: relative c2p + p2c, shared position keys
        return T.DebertaV2Model(T.DebertaV2Config(vocab_size=vocab, max_position_embeddings=64, relative_attention=True,
                                                  pos_att_type=["p2c", "c2p"], position_buckets=16,
                                                  share_att_key=True, norm_rel_ebd="layer_norm",
                                                  position_biased_input=False, pad_token_id=0, **SMALL))
    if family == "mpnet":
        return T.MPNetModel(T.MPNetConfig(vocab_size=vocab, max_position_embeddings=66, pad_token_id=0, **SMALL))
    raise AssertionError(family)


def _vit_model(head: bool):
    import transformers as T

    config = T.ViTConfig(image_size=32, patch_size=8, num_channels=3, num_labels=10, **SMALL)
    return T.ViTForImageClassification(config) if head else T.ViTModel(config)


FAMILIES = ["bert", "roberta", "distilbert", "deberta-v2", "mpnet", "vit", "vit-bare"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (bundle, fp32 ONNX path, splits, export result), built once per family."""
    import torch

    from deploykit._compat import ensure_model_libraries_importable
    from deploykit.models.text import embedded_minilm_dir

    ensure_model_libraries_importable()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(embedded_minilm_dir()))
    cache = {}

    def build(family: str):
        if family in cache:
            return cache[family]
        folder = tmp_path_factory.mktemp(family)
        torch.manual_seed(0)
        if family.startswith("vit"):
            model = _vit_model(head=family == "vit")
            data = DataSpec(source="digits", calibration=16, evaluation=32, seed=0)
            options = {}
        else:
            model = _text_model(family, tokenizer.vocab_size)
            tokenizer.save_pretrained(str(folder))
            data = DataSpec(source="docstrings", calibration=16, evaluation=32, seed=0)
            options = {"max_length": 32}
        model.eval().save_pretrained(str(folder))
        bundle = load_model(f"hf:{folder}", options)
        splits = make_splits(bundle, data)
        path = folder / "model.onnx"
        result = export_onnx(bundle, path)
        cache[family] = (bundle, path, splits, result)
        return cache[family]

    return build


@pytest.mark.parametrize("family", FAMILIES)
def test_export_matches_torch(exported, family):
    bundle, path, splits, result = exported(family)
    # FP32 ORT vs eager torch differ by summation order only (~1e-7 here); 1e-5 leaves room
    # for other CPUs' kernels, while a wrong mask, position offset or input order shows at 1e-2.
    assert result.parity["max_abs_diff"] < 1e-5
    ref = np.concatenate([bundle.run_torch(f) for f in _batches(splits.evaluation, 16)])
    out = run_split(OrtRunner(path), splits.evaluation, batch_size=16)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    names = [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]
    assert names == bundle.input_names
    if family in ("distilbert", "mpnet"):       # their forward takes no token types
        assert names == ["input_ids", "attention_mask"]
    if family in ("roberta", "mpnet"):          # 66 position rows; positions start at padding_idx + 1
        # RoBERTa's padding_idx is the config's pad id (0 here), MPNet's is always 1.
        assert bundle.dim_max["sequence"] == {"roberta": 65, "mpnet": 64}[family]


def _batches(split, size):
    n = len(next(iter(split.feeds.values())))
    for start in range(0, n, size):
        yield {k: v[start:start + size] for k, v in split.feeds.items()}


def _weight_matmuls(model: onnx.ModelProto) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and any(x in inits for x in n.input)]


@pytest.mark.parametrize("preset", ["gpu-trt", "cpu-ort"])
@pytest.mark.parametrize("family", FAMILIES)
def test_calibrate_places_qdq_per_preset_and_verifies(exported, family, preset, tmp_path):
    bundle, path, splits, _ = exported(family)
    out = tmp_path / "model.int8.onnx"
    calibrate(path, splits.calibration, out, QuantConfig(preset=preset))
    fp32, int8 = onnx.load(str(path)), onnx.load(str(out))
    inits = {i.name: numpy_helper.to_array(i) for i in int8.graph.initializer}
    producers = {o: n for n in int8.graph.node for o in n.output}
    weighted = set(_weight_matmuls(fp32))
    assert len(weighted) >= 2 * 4                       # 2 layers x (Q/K/V or fused QKV, out, FFN in, FFN out)
    activation_dtype = np.int8 if preset == "gpu-trt" else np.uint8
    for node in int8.graph.node:
        if node.op_type != "MatMul" or node.name not in weighted:
            continue
        for name in node.input:
            dq = producers.get(name)
            assert dq is not None and dq.op_type == "DequantizeLinear", f"{family}: {node.name} input not Q/DQ"
            if dq.input[0] in inits:                    # the weight: int8, symmetric, per output channel
                assert inits[dq.input[0]].dtype == np.int8 and np.all(inits[dq.input[2]] == 0)
                assert inits[dq.input[1]].size == inits[dq.input[0]].shape[1]
            else:
                q = producers[dq.input[0]]
                zero = inits[q.input[2]]
                assert q.op_type == "QuantizeLinear" and zero.dtype == activation_dtype
                if preset == "gpu-trt":                 # TensorRT takes symmetric activations only
                    assert np.all(zero == 0)
    if preset == "gpu-trt":                             # no re-quantized MatMul outputs
        quantized_from = {producers[n.input[0]].op_type for n in int8.graph.node
                          if n.op_type == "QuantizeLinear" and n.input[0] in producers}
        assert "MatMul" not in quantized_from
    ref = run_split(OrtRunner(path), splits.evaluation, batch_size=16)
    got = run_split(OrtRunner(out), splits.evaluation, batch_size=16)
    metrics, _ = embedding_metrics(ref, got)
    # Random-init weights have no trained outliers: 8-bit noise alone keeps cosine well above
    # 0.95 at width 32; a wrong scale, axis or zero point drops it far lower.
    assert metrics["cosine_mean"] > 0.95, (family, preset, metrics)
