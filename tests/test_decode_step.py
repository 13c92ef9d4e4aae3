"""A causal LM's decode step with its KV cache as ONNX: ORT against the torch step and against
the prefill at the same position (right-padded caches of different real lengths in one batch,
two past widths), the names and dynamic axes, and static W8A8 of the step on real caches."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from deploykit.errors import UserError

sys.path.insert(0, str(Path(__file__).parent))


def _bundle(folder, **options):
    from deploykit.models import load_model

    return load_model(f"hf:{folder}", {"max_length": 32, **options})


def _splits(bundle):
    from deploykit.data import DataSpec, make_splits

    return make_splits(bundle, DataSpec(calibration=16, evaluation=12, seed=0))


@pytest.fixture(scope="module")
def exported(tiny_llama_dir, tmp_path_factory):
    from deploykit.export.decode import export_decode_step

    bundle = _bundle(tiny_llama_dir)
    splits = _splits(bundle)
    out = tmp_path_factory.mktemp("decode") / "step.onnx"
    record = export_decode_step(bundle, out, splits.calibration)
    return bundle, splits, out, record


def test_step_matches_torch_and_the_prefill(exported):
    bundle, splits, out, record = exported
    # float32 through 2 layers of a width-32 random model (logits O(1)): rounding only
    assert record["parity"]["max_abs_diff"] < 1e-4
    # the cache is right: decoding a text's last token after its prefix gives the prefill's logits there
    assert record["parity"]["vs_prefill_max_abs_diff"] < 1e-4
    assert record["parity"]["samples"] == splits.calibration.count
    model = onnx.load(str(out))
    names = [i.name for i in model.graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"] and len(names) == 3 + 2 * 2
    assert [o.name for o in model.graph.output] == ["logits", "present_key_0", "present_value_0",
                                                    "present_key_1", "present_value_1"]
    past = model.graph.input[3].type.tensor_type.shape.dim
    assert past[0].dim_param and past[2].dim_param and past[1].dim_value == 2     # batch, past dynamic; 2 KV heads


def test_another_past_width_and_mixed_lengths_in_one_batch(exported):
    from deploykit.data import Split
    from deploykit.export.decode import decode_feeds, run_step_torch
    from deploykit.runners import OrtRunner

    bundle, splits, out, _ = exported
    # the evaluation texts cut to 12 tokens: another past width (10) than the export's (30)
    short = {k: v[:, :12] for k, v in splits.evaluation.feeds.items()}
    feeds, expected, _ = decode_feeds(bundle, Split("short", short, "sha"))
    batch = {k: v[:6] for k, v in feeds.feeds.items()}
    assert batch["past_key_0"].shape[2] == 10 and len(set(batch["position_ids"][:, 0])) > 1
    got = OrtRunner(out).infer(batch)
    np.testing.assert_allclose(got, run_step_torch(bundle, batch), atol=1e-4, rtol=0)
    np.testing.assert_allclose(got, expected[:6], atol=1e-4, rtol=0)


def test_step_calibrates_to_w8a8_on_real_caches(exported, tmp_path):
    from deploykit.export.decode import decode_feeds
    from deploykit.quantize import QuantConfig, SmoothQuantConfig, calibrate
    from deploykit.runners import OrtRunner

    bundle, splits, out, _ = exported
    from deploykit.export.decode import step_metrics

    cal_feeds, _, _ = decode_feeds(bundle, splits.calibration)
    eval_feeds, _, targets = decode_feeds(bundle, splits.evaluation)
    result = calibrate(out, cal_feeds, tmp_path / "step.int8.onnx",
                       QuantConfig(preset="gpu-trt", smoothquant=SmoothQuantConfig(alpha=0.5, targets="all")))
    assert result.qdq_counts["QuantizeLinear"] > 0 and len(result.quantized_nodes) >= 2 * 7
    fp32 = OrtRunner(out).infer(eval_feeds.feeds)
    int8 = OrtRunner(tmp_path / "step.int8.onnx").infer(eval_feeds.feeds)
    # a random model's next-token logits are nearly flat: compare the logit vectors (cosine per
    # row) rather than the argmax, which flips on ties; int8 of a width-32 model keeps > 0.99
    cos = (fp32 * int8).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(int8, axis=1)
    assert cos.min() > 0.99, cos
    metrics = step_metrics(fp32, int8, targets)
    assert metrics["steps"] == len(targets) and metrics["cosine_min"] > 0.99
    # near-uniform distributions: INT8 keeps the perplexity of the true next tokens within 5 %
    assert abs(metrics["perplexity_ratio"] - 1.0) < 0.05
    same = step_metrics(fp32, fp32, targets)
    assert same["perplexity_ratio"] == 1.0 and same["top1_agreement"] == 1.0


def test_not_a_causal_lm_or_a_transformed_one_is_refused(tiny_llama_dir, tiny_bundle, tmp_path):
    from deploykit.export.decode import export_decode_step

    with pytest.raises(UserError, match="not a causal language model"):
        export_decode_step(tiny_bundle, tmp_path / "x.onnx", _splits(tiny_bundle).calibration)
    windowed = _bundle(tiny_llama_dir, transforms=[{"name": "neighborhood-attention", "kernel_size": 4,
                                                    "causal": True}])
    with pytest.raises(UserError, match="prefill only"):
        export_decode_step(windowed, tmp_path / "y.onnx", _splits(windowed).calibration)
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "y.onnx").exists()


def test_cli_exports_the_step_and_refuses_an_encoder(tiny_llama_dir, tiny_bert_dir, tmp_path):
    from contract import assert_user_error, deploykit

    proc = deploykit("export", f"hf:{tiny_llama_dir}", "--decode-step", "-o", "step.onnx", "--option", "max_length=32",
                     cwd=tmp_path)
    record = __import__("json").loads((tmp_path / "step.export.json").read_text())
    assert record["kind"] == "decode-step" and record["layers"] == 2 and record["parity"]["max_abs_diff"] < 1e-4
    assert "decode step" in proc.stderr + proc.stdout
    bad = deploykit("export", f"hf:{tiny_bert_dir}", "--decode-step", "-o", "enc.onnx", cwd=tmp_path, check_rc=None)
    assert_user_error(bad, "not a causal language model")
    assert not (tmp_path / "enc.onnx").exists()
