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


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _one_or_list(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: test(value) or (isinstance(value, list) and bool(value) and all(map(test, value)))


# A setting's kind: the YAML values it takes, and how the fix says it. A trailing "?" also
# takes null (the transform's default). Ranges and names are checked by the transform itself.
KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "number": (_number, "a number, e.g. 0.25"),
    "int": (_whole, "a whole number, e.g. 8"),
    "bool": (lambda value: isinstance(value, bool), "true or false"),
    "str": (lambda value: isinstance(value, str), "a name, e.g. mlp"),
    "ints": (_one_or_list(_whole), "a whole number or a list of them, e.g. 7 or [7, 7]"),
    "bools": (_one_or_list(lambda value: isinstance(value, bool)), "true or false, or a list of them"),
    "numbers": (_one_or_list(_number), "a number or a list of them, e.g. 0.9 or [0.9, 0.99]"),
    "any": (lambda value: True, ""),
}

# name -> (apply(root, settings) -> report dict, {setting: kind}); binarize and sparsify add theirs.
TRANSFORMS: dict[str, tuple[Callable[[nn.Module, dict[str, Any]], dict[str, Any]], dict[str, str]]] = {
    "clipped-softmax": (_clipped, {"zeta": "number", "gamma": "number?", "alpha": "number?", "seq_len": "int?",
                                   "length_normalised": "bool"}),
    "gated-attention": (_gated, {"gate": "str", "init": "number", "fine_tune": "bool", "seed": "int?"}),
    "neighborhood-attention": (_swap("neighborhood"), {"kernel_size": "ints", "dilation": "ints",
                                                       "causal": "bools"}),
    "linear-attention": (_swap("linear"), {"feature": "str", "causal": "bool", "decay": "numbers?"}),
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
        if not isinstance(name, str) or name not in TRANSFORMS:
            raise UserError(f"unknown transform '{name}'", path=where or None,
                            fix=f"use one of {', '.join(TRANSFORMS)}")
        kinds = TRANSFORMS[name][1]
        unknown = sorted(str(k) for k in item if k != "name" and k not in kinds)
        if unknown:
            raise UserError(f"transform '{name}' does not take {unknown}", path=where or None,
                            fix=f"its settings are {sorted(kinds)}")
        for key, value in item.items():
            if key != "name":
                _check_setting(name, key, value, kinds[key], where)
        out.append(dict(item))
    return out


def _check_setting(name: str, key: str, value: Any, kind: str, where: str) -> None:
    test, says = KINDS[kind.rstrip("?")]
    if value is None and kind.endswith("?") or value is not None and test(value):
        return
    raise UserError(f"transform '{name}' setting {key} is {value!r}, not {says.split(', e.g.')[0]}",
                    path=where or "model.options.transforms", fix=f"give {key} as {says}")


def apply_transforms(root: nn.Module, transforms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Apply ``transforms`` to ``root`` in order; returns what each did (for reports)."""
    applied = []
    for item in check_transforms(transforms):
        fn = TRANSFORMS[item["name"]][0]
        applied.append({"name": item["name"], **fn(root, item)})
    return applied
