"""Image models: timm by architecture name (random init or a local checkpoint; never
downloads) and Hugging Face ViT folders."""

from __future__ import annotations

from typing import Any

import torch

from deploykit._compat import ensure_model_libraries_importable
from deploykit.errors import UserError
from deploykit.models.base import ImagePreprocessor, ModelBundle, check_options

VISION_OPTIONS = {"img_size", "patch_size", "num_classes", "in_chans", "checkpoint", "seed", "kwargs"}


def load_timm_model(arch: str, *, source: str, options: dict[str, Any]) -> ModelBundle:
    check_options(options, VISION_OPTIONS, "a timm model")
    ensure_model_libraries_importable()
    import timm
    import torch

    if not timm.is_model(arch):
        import difflib

        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f"did you mean {', '.join('timm:' + c for c in close)}?" if close else \
            "use a name from timm.list_models(), e.g. timm:vit_tiny_patch16_224"
        raise UserError(f"unknown timm architecture '{arch}'", fix=hint)
    from deploykit.models.weights import load_checkpoint_option, option_int

    if not isinstance(options.get("kwargs") or {}, dict):
        raise UserError("model option kwargs must be a mapping of timm.create_model arguments",
                        path="model.options.kwargs", fix="e.g. kwargs: {drop_rate: 0.0}")
    kwargs: dict[str, Any] = dict(options.get("kwargs") or {})
    for key in ("img_size", "patch_size", "num_classes", "in_chans"):
        if key in options:
            kwargs[key] = option_int(options, key, minimum=1)
    torch.manual_seed(option_int(options, "seed", 0))
    try:
        model = timm.create_model(arch, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        raise UserError(f"timm:{arch} does not accept these options ({' '.join(str(exc).split())[:200]})",
                        fix="remove the options this architecture does not take") from None
    model.eval()
    load_checkpoint_option(model, options)
    cfg = model.pretrained_cfg or {}
    input_size = cfg.get("input_size", (3, 224, 224))
    in_chans = int(kwargs.get("in_chans", input_size[0]))
    img_size = kwargs.get("img_size", input_size[-1])
    img_size = int(img_size[0] if isinstance(img_size, (tuple, list)) else img_size)
    mean = tuple(cfg.get("mean", (0.5, 0.5, 0.5)))
    std = tuple(cfg.get("std", (0.5, 0.5, 0.5)))
    if len(mean) < in_chans:
        mean, std = (mean[0],) * in_chans, (std[0],) * in_chans
    return ModelBundle(
        source=source,
        name=arch,
        task="image-classification",
        module=model,
        input_names=["pixel_values"],
        output_name="logits",
        dynamic_axes={"pixel_values": {0: "batch"}},
        preprocessor=ImagePreprocessor(img_size=img_size, in_chans=in_chans, mean=mean, std=std),
        info={"num_classes": int(model.num_classes), "img_size": img_size, "in_chans": in_chans},
    )


HF_VISION_TYPES = {"vit"}       # config.json model_type values loaded as image models
HF_VISION_OPTIONS = {"checkpoint"}


class _Features(torch.nn.Module):
    """A bare ViTModel -> its pooled features (the pooler when present, else the [CLS] token)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        out = self.model(pixel_values=pixel_values)
        if getattr(out, "pooler_output", None) is not None:
            return out.pooler_output
        return out.last_hidden_state[:, 0]


class _Logits(torch.nn.Module):
    """ViTForImageClassification -> its logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).logits


def load_hf_vision_model(folder, *, source: str, options: dict[str, Any], config: dict[str, Any]) -> ModelBundle:
    """A Hugging Face ViT folder: ``ViTForImageClassification`` (logits) when its config names
    that architecture, else the bare ``ViTModel`` (pooled features)."""
    check_options(options, HF_VISION_OPTIONS, "a Hugging Face image model")
    ensure_model_libraries_importable()
    from transformers import AutoModel, AutoModelForImageClassification

    classify = any(a.endswith("ForImageClassification") for a in config.get("architectures") or [])
    loader = AutoModelForImageClassification if classify else AutoModel
    try:
        model = loader.from_pretrained(str(folder), local_files_only=True, attn_implementation="eager")
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot load the Hugging Face model ({str(exc).splitlines()[0]})", path=folder,
                        fix="the folder needs config.json and model weights") from None
    model.eval()
    from deploykit.models.weights import load_checkpoint_option

    load_checkpoint_option(model, options)
    module = (_Logits if classify else _Features)(model).eval()
    cfg = model.config
    in_chans, img_size = int(cfg.num_channels), int(cfg.image_size)
    return ModelBundle(
        source=source,
        name=folder.name,
        task="image-classification",
        module=module,
        input_names=["pixel_values"],
        output_name="logits" if classify else "features",
        dynamic_axes={"pixel_values": {0: "batch"}},
        # the ViT image processor's default normalisation
        preprocessor=ImagePreprocessor(img_size=img_size, in_chans=in_chans, mean=(0.5,) * in_chans,
                                       std=(0.5,) * in_chans),
        info={"num_classes": int(cfg.num_labels) if classify else int(cfg.hidden_size), "img_size": img_size,
              "in_chans": in_chans, "model_type": cfg.model_type},
    )
