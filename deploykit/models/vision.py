"""timm vision models by architecture name (random init or a local checkpoint; never downloads)."""

from __future__ import annotations

from typing import Any

from deploykit._compat import ensure_model_libraries_importable
from deploykit.errors import UserError
from deploykit.models.base import ImagePreprocessor, ModelBundle

VISION_OPTIONS = {"img_size", "patch_size", "num_classes", "in_chans", "checkpoint", "seed", "kwargs"}


def load_timm_model(arch: str, *, source: str, options: dict[str, Any]) -> ModelBundle:
    unknown = set(options) - VISION_OPTIONS
    if unknown:
        raise UserError(f"unknown model option(s) {sorted(unknown)} for a timm model",
                        fix=f"use only {sorted(VISION_OPTIONS)}")
    ensure_model_libraries_importable()
    import timm
    import torch

    if not timm.is_model(arch):
        import difflib

        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f"did you mean {', '.join('timm:' + c for c in close)}?" if close else \
            "use a name from timm.list_models(), e.g. timm:vit_tiny_patch16_224"
        raise UserError(f"unknown timm architecture '{arch}'", fix=hint)
    from deploykit.models.weights import apply_state_dict, load_state_dict, option_int

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
    if options.get("checkpoint"):
        apply_state_dict(model, load_state_dict(options["checkpoint"]), options["checkpoint"])
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
