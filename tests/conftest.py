"""Shared fixtures: a tiny BERT folder (fast), the embedded MiniLM, exported ONNX files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Two workers, one test file each at a time (``-n 2 --dist loadfile``), when pytest-xdist
    is installed and the command line says nothing of its own (``-n 0`` runs serially): the
    suite takes about 11 minutes instead of 18 on two cores, and module fixtures are built once.
    Where xdist is missing (a machine without the test extras) the suite runs serially as before."""
    if (not config.pluginmanager.hasplugin("xdist") or os.environ.get("PYTEST_XDIST_WORKER")
            or config.getoption("numprocesses", None) is not None or config.getoption("usepdb", False)):
        return None
    config.option.numprocesses = min(2, os.cpu_count() or 1)
    if config.option.dist == "no":
        config.option.dist = "loadfile"
    return None


@pytest.fixture(autouse=True)
def _quiet():
    from deploykit.progress import set_quiet

    set_quiet(True)
    yield


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer, width-32 BERT with MiniLM's tokenizer, saved as a Hugging Face folder."""
    import torch

    from deploykit._compat import ensure_model_libraries_importable
    from deploykit.models.text import embedded_minilm_dir

    ensure_model_libraries_importable()
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(str(embedded_minilm_dir()))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    model = BertModel(config).eval()
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_bundle(tiny_bert_dir):
    from deploykit.models import load_model

    return load_model(str(tiny_bert_dir), {"max_length": 64})


@pytest.fixture(scope="session")
def tiny_onnx(tiny_bundle, tmp_path_factory) -> Path:
    from deploykit.export import export_onnx

    path = tmp_path_factory.mktemp("tiny-onnx") / "model.onnx"
    export_onnx(tiny_bundle, path)
    return path


@pytest.fixture(scope="session")
def tiny_splits(tiny_bundle):
    from deploykit.data import DataSpec, make_splits

    return make_splits(tiny_bundle, DataSpec(source="docstrings", calibration=32, evaluation=64, seed=0))


@pytest.fixture(scope="session")
def minilm_bundle():
    from deploykit.models import load_model

    return load_model("embedded:minilm")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer, width-32 Llama (RMSNorm, RoPE, GQA 4:2 heads, SwiGLU, tied head) with MiniLM's
    tokenizer, saved as a Hugging Face folder; RMSNorm weights away from 1."""
    import torch

    from deploykit._compat import ensure_model_libraries_importable
    from deploykit.models.text import embedded_minilm_dir

    ensure_model_libraries_importable()
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(embedded_minilm_dir()))
    config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():       # RMSNorm weights away from 1, so folding a scale into them is visible
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.eval().save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder
