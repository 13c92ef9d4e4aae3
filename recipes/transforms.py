"""Model transforms named in recipe files (``model.options.transforms``), applied in order.

Each entry is a mapping with ``name`` and the transform's settings::

    transforms:
      - {name: clipped-softmax, alpha: 3.2, seq_len: 128}          # gamma = -alpha/T, zeta = 1
      - {name: clipped-softmax, alpha: 3.2, length_normalised: true}
      - {name: gated-attention, gate: per-head, init: 0.25}       # from scratch
      - {name: gated-attention, gate: per-head, init: 0.25, fine_tune: true}
      - {name: neighborhood-attention, kernel_size: 7}       # 1-D window (text) / 2-D (ViT patch grid)
      - {name: linear-attention, feature: elu1}

Transforms compose: a clipped *and* gated model lists both. They run on the torch module
before any checkpoint is loaded, so a checkpoint trained with a transform (gate weights
included) loads into a model built with the same list.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from deploykit.errors import UserError


def _clipped(root: nn.Module, settings: dict[str, Any]) -> dict[str, Any]:
    from deploykit.recipes.attention import SoftmaxSpec, apply_clipped_softmax

    spec = SoftmaxSpec(zeta=float(settings.get("zeta", 1.0)),
                       gamma=None if settings.get("gamma") is None else float(settings["gamma"]),
                       alpha=None if settings.get("alpha") is None else float(settings["alpha"]),
                       seq_len=None if settings.get("seq_len") is None else int(settings["seq_len"]),
                       length_normalised=bool(settings.get("length_normalised", False)))
    count = apply_clipped_softmax(root, spec)
    return {"modules": count, "gamma": spec.fixed_gamma(), "zeta": spec.zeta,
            "length_normalised": spec.length_normalised, "alpha": spec.alpha}


def _gated(root: nn.Module, settings: dict[str, Any]) -> dict[str, Any]:
    from deploykit.recipes.attention import GateSpec, apply_gated_attention

    spec = GateSpec(kind=str(settings.get("gate", "per-head")), init=float(settings.get("init", 0.25)),
                    fine_tune=bool(settings.get("fine_tune", False)))
    seed = settings.get("seed")
    count = apply_gated_attention(root, spec, seed=None if seed is None else int(seed))
    return {"modules": count, "gate": spec.kind, "init": spec.init, "fine_tune": spec.fine_tune}


def _swap(kind: str):
    def run(root: nn.Module, settings: dict[str, Any]) -> dict[str, Any]:
        from deploykit.recipes.attention import MixerSpec, apply_attention_swap

        spec = MixerSpec(kind=kind, **{k: v for k, v in settings.items() if k != "name"})
        return {"modules": apply_attention_swap(root, spec), **{k: v for k, v in settings.items() if k != "name"}}
    return run


TRANSFORMS: dict[str, tuple[Callable[[nn.Module, dict[str, Any]], dict[str, Any]], set[str]]] = {
    "clipped-softmax": (_clipped, {"zeta", "gamma", "alpha", "seq_len", "length_normalised"}),
    "gated-attention": (_gated, {"gate", "init", "fine_tune", "seed"}),
    "neighborhood-attention": (_swap("neighborhood"), {"kernel_size", "dilation", "causal"}),
    "linear-attention": (_swap("linear"), {"feature", "causal", "decay"}),
}


def _register_compression() -> None:
    from deploykit.recipes.binarize import TRANSFORMS as binarize
    from deploykit.recipes.sparsify import TRANSFORMS as sparsify

    TRANSFORMS.update(binarize)
    TRANSFORMS.update(sparsify)


_register_compression()


def check_transforms(transforms: Any, where: str = "") -> list[dict[str, Any]]:
    if transforms is None:
        return []
    if not isinstance(transforms, list):
        raise UserError("model.options.transforms must be a list", path=where or None,
                        fix="write transforms: [{name: clipped-softmax, alpha: 3.2, seq_len: 128}]")
    out = []
    for item in transforms:
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or "name" not in item:
            raise UserError(f"transform {item!r} has no name", path=where or None,
                            fix=f"each transform is a mapping with name: one of {', '.join(TRANSFORMS)}")
        name = item["name"]
        if name not in TRANSFORMS:
            raise UserError(f"unknown transform '{name}'", path=where or None,
                            fix=f"use one of {', '.join(TRANSFORMS)}")
        unknown = sorted(set(item) - {"name"} - TRANSFORMS[name][1])
        if unknown:
            raise UserError(f"transform '{name}' does not take {unknown}", path=where or None,
                            fix=f"its settings are {sorted(TRANSFORMS[name][1])}")
        out.append(dict(item))
    return out


def apply_transforms(root: nn.Module, transforms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Apply ``transforms`` to ``root`` in order; returns what each did (for reports)."""
    applied = []
    for item in check_transforms(transforms):
        fn = TRANSFORMS[item["name"]][0]
        applied.append({"name": item["name"], **fn(root, item)})
    return applied
