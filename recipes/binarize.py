"""Binarization recipes (BiViT): binary attention, binary weights, binary activations.

He et al., "BiViT: Extremely Compressed Binary Vision Transformers" (ICCV 2023). Three
transforms, listed in ``model.options.transforms`` and composable::

    transforms:
      - {name: binary-attention, beta: 0.25}                 # softmax-aware binary attention
      - {name: binary-weights, targets: all}                 # mlp (default) | attention | all
      - {name: binary-activations, targets: all, scale: true}

binary-attention
    ``A_b = 1[softmax(x) >= beta * rowmax(softmax(x))]`` on the masked attention logits
    ``x``: a key is kept when its probability is at least ``beta`` times the row's largest
    one, so the number of ones adapts to how peaked the row is. With ``scale: true`` each
    row is multiplied by ``v = (a . b) / (b . b)`` (``a`` the softmax row, ``b`` the binary
    row: the mean probability of the kept keys), the least-squares scale of ``b`` for ``a``.
    In training the forward is binary and the backward is the softmax's gradient (a
    straight-through estimator on the softmax output; ``ste: false`` passes no gradient).
    In eval mode (and so in the exported graph) the mask is computed without exp or
    softmax: ``softmax(x)_i / max_j softmax(x)_j = exp(x_i - max x)``, so
    ``A_b = 1[x >= rowmax(x) - ln(1/beta)]`` (ReduceMax, Sub, GreaterOrEqual). Masked
    keys (logits at or below ``finfo.min / 2``, i.e. ``finfo.min`` or ``-inf`` after the
    mask) are never kept, and a row whose keys are all masked is all zeros, without NaN.
    The scaled variant needs the softmax values for ``v``: its export also computes the
    Softmax (of the masked logits) and uses it for ``v`` only; the mask itself still comes
    from the threshold form.

binary-weights
    ``W_b = s * sign(W - rowmean(W))`` per output channel (row of the ``[out, in]``
    weight), ``sign(0) = +1``; ``s`` is a learnable per-channel parameter ``weight_scale``
    initialised to ``mean|W - rowmean(W)|``. The latent float weight keeps its name
    ``weight``; gradients reach it through the clipped identity (``1[|W - rowmean| <= 1]``,
    times ``s``, through the centring). In eval mode the binary weight is a buffer
    (``weight_binary``, not saved in checkpoints), refreshed whenever the latent weight
    or the scale changes, so the export holds it as a float initializer whose channels
    are exactly ``±s_c`` (no Sign op in the graph; ONNX ``Sign(0)`` would be 0).
    :func:`deploykit.compression.binarize_initializers` then stores them as int8 + scale.

binary-activations
    The linear's input becomes ``sign(x)`` (``+1`` at 0, exported as ``Where(x >= 0, 1, -1)``),
    optionally times a learnable scalar (``scale: true``, ``input_scale``, starts at 1);
    gradient: clipped identity ``1[|x| <= 1]``. With binary weights, such a linear is
    fully binary (counted as BOPs by :func:`deploykit.compression.model_stats`).

``targets`` selects linears inside the transformer blocks only: ``mlp`` (timm ``mlp.fc1``,
``mlp.fc2``; BERT ``intermediate.dense``, ``output.dense``), ``attention`` (timm ``qkv``,
``proj``; BERT ``query``, ``key``, ``value``, ``attention.output.dense``) or ``all``. The
classifier head, patch embedding, embeddings, poolers and attention gates stay float.

Cross-layer two-stage training (BiViT): binarize attention first, then the MLPs, with
distillation from the full-precision model. Every binary module has an ``enabled`` flag
(``False``: exactly full precision); :func:`set_binarization_stage` switches a model
between ``none``, ``attention`` and ``all`` between two ``deploykit.train.train`` runs.
A model is built with everything enabled (stage ``all``).

A checkpoint of the full-precision model loads into a binary-weight model: each missing
``weight_scale`` is initialised from the loaded weight (``input_scale`` starts at 1).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from deploykit.errors import UserError

TARGETS = ("mlp", "attention", "all")
STAGES = ("none", "attention", "all")


def _tracing() -> bool:
    return torch.compiler.is_exporting() or torch.compiler.is_compiling() or torch.jit.is_tracing()


def sign_pm1(x: torch.Tensor) -> torch.Tensor:
    """``+1`` where ``x >= 0`` (zero included), ``-1`` elsewhere, in ``x``'s dtype."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def _ste(value: torch.Tensor, proxy: torch.Tensor) -> torch.Tensor:
    """Forward ``value`` exactly (``proxy - proxy`` is exactly 0), backward ``d proxy``."""
    return value + (proxy - proxy.detach())


# ----------------------------------------------------------------------------- binary attention
class BinaryAttention(nn.Module):
    """``(masked_scores, mask) -> A_b`` for :meth:`AttentionCore.set_probabilities`.

    Training: ``1[softmax >= beta * rowmax(softmax)]`` with the softmax gradient passed
    straight through. Eval: ``1[x >= rowmax(x) - ln(1/beta)]``. Both exclude masked keys
    (``x <= finfo.min / 2``). ``record = True`` accumulates the attention density (share
    of each row's valid keys that are kept) until :meth:`reset_stats`; ``keep_pattern``
    also keeps the last boolean pattern in ``last_pattern``.
    """

    def __init__(self, beta: float = 0.25, scale: bool = False, ste: bool = True):
        super().__init__()
        beta = float(beta)
        if not 0.0 < beta <= 1.0:
            raise UserError(f"binary attention beta {beta} is outside (0, 1]",
                            fix="use e.g. beta: 0.25 (keys with at least a quarter of the row's top probability)")
        self.beta, self.scaled, self.ste = beta, bool(scale), bool(ste)
        self.log_inv_beta = math.log(1.0 / beta)
        self.enabled = True
        self.record = False
        self.keep_pattern = False
        self.last_pattern: torch.Tensor | None = None
        self.reset_stats()

    def extra_repr(self) -> str:
        return f"beta={self.beta}, scale={self.scaled}, ste={self.ste}, enabled={self.enabled}"

    def compression_info(self) -> dict[str, Any]:
        return {"probabilities": "binary" if self.enabled else "float", "scaled": self.scaled}

    def reset_stats(self) -> None:
        self._rows, self._density, self._ones = 0, 0.0, 0.0
        self._min, self._max = math.inf, -math.inf

    def stats(self) -> dict[str, Any]:
        """Rows seen (with at least one valid key), mean/min/max density and mean ones per row."""
        n = self._rows
        return {"rows": n, "density": self._density / n if n else None, "ones_per_row": self._ones / n if n else None,
                "min_density": self._min if n else None, "max_density": self._max if n else None}

    @torch.no_grad()
    def _observe(self, keep: torch.Tensor, valid: torch.Tensor) -> None:
        ones = keep.sum(-1).double()
        allowed = valid.expand_as(keep).sum(-1).double()
        rows = allowed > 0
        if rows.any():
            density = ones[rows] / allowed[rows]
            self._rows += int(rows.sum())
            self._density += float(density.sum())
            self._ones += float(ones[rows].sum())
            self._min = min(self._min, float(density.min()))
            self._max = max(self._max, float(density.max()))
        if self.keep_pattern:
            self.last_pattern = keep.detach().clone()

    def pattern(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(keep, valid, probs)``: the boolean binary mask, the valid keys, and the masked
        softmax when this mode computes it (training, or the scaled variant)."""
        floor = torch.finfo(scores.dtype).min
        valid = scores > floor / 2
        probs = None
        if self.training or self.scaled:
            probs = torch.softmax(torch.where(valid, scores, floor), dim=-1)    # finite even for empty rows
        if self.training:
            keep = (probs >= self.beta * probs.amax(dim=-1, keepdim=True)) & valid
        else:
            keep = (scores >= scores.amax(dim=-1, keepdim=True) - self.log_inv_beta) & valid
        return keep, valid, probs

    def forward(self, scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self.enabled:
            return torch.softmax(scores, dim=-1)
        keep, valid, probs = self.pattern(scores)
        out = keep.to(scores.dtype)
        if self.record and not _tracing():
            self._observe(keep, valid)
        binary = out
        if self.training and self.ste:
            out = _ste(out, probs)
        if self.scaled:
            v = (probs * binary).sum(dim=-1, keepdim=True) / binary.sum(dim=-1, keepdim=True).clamp(min=1.0)
            out = out * v
        return out


# ----------------------------------------------------------------------------- binary linears
def initial_scale(weight: torch.Tensor) -> torch.Tensor:
    """``mean|W - rowmean(W)|`` per output channel (row of the ``[out, in]`` weight)."""
    w = weight.detach()
    return (w - w.mean(dim=1, keepdim=True)).abs().mean(dim=1)


class BinaryLinear(nn.Linear):
    """An ``nn.Linear`` with binary weights and/or binary inputs; keeps the wrapped
    linear's ``weight`` and ``bias`` parameters (same objects, same names).

    ``part`` is ``"attention"`` or ``"mlp"`` (for :func:`set_binarization_stage`).
    ``enabled = False`` makes it exactly the original linear.
    """

    def __init__(self, linear: nn.Linear, part: str = "mlp"):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        if linear.bias is not None:
            self.bias = linear.bias
        else:
            self.register_parameter("bias", None)
        self.part = part
        self.enabled = True
        self.weights_binary = False
        self.inputs_binary = False
        self.register_parameter("weight_scale", None)
        self.register_parameter("input_scale", None)
        self.register_buffer("weight_binary", None, persistent=False)
        self._cache_key: tuple | None = None
        self.train(linear.training)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, part={self.part}, binary_weights={self.weights_binary}, "
                f"binary_inputs={self.inputs_binary}, enabled={self.enabled}")

    # -- switching on
    def binarize_weights(self) -> None:
        if self.weights_binary:
            return
        self.weights_binary = True
        self.weight_scale = nn.Parameter(initial_scale(self.weight))
        self.refresh()

    def binarize_inputs(self, scale: bool = False) -> None:
        self.inputs_binary = True
        if scale and self.input_scale is None:
            self.input_scale = nn.Parameter(torch.ones(1, dtype=self.weight.dtype, device=self.weight.device))

    @torch.no_grad()
    def reset_scale(self) -> None:
        """Re-initialise ``weight_scale`` from the current latent weight."""
        if self.weight_scale is not None:
            self.weight_scale.copy_(initial_scale(self.weight))
            self.refresh()

    # -- the binary weight
    def signs(self) -> torch.Tensor:
        """``sign(W - rowmean(W))`` as int8 ``±1`` (``+1`` at 0)."""
        w = self.weight.detach()
        return sign_pm1(w - w.mean(dim=1, keepdim=True)).to(torch.int8)

    def binarized_weight(self, ste: bool = True) -> torch.Tensor:
        """``s * sign(W - rowmean(W))``; with ``ste`` the latent weight gets the clipped-identity gradient."""
        w = self.weight
        centered = w - w.mean(dim=1, keepdim=True)
        signs = sign_pm1(centered.detach())
        if ste:
            clipped = centered.clamp(-1.0, 1.0)
            signs = _ste(signs, clipped)
        return self.weight_scale.unsqueeze(1) * signs

    @staticmethod
    def _key(w: torch.Tensor, s: torch.Tensor) -> tuple:
        return (id(w), w._version, w.data_ptr(), id(s), s._version, s.data_ptr(), w.dtype, w.device)

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the eval-mode binary weight buffer from ``weight`` and ``weight_scale``."""
        if not self.weights_binary:
            self.weight_binary = None
            return
        # Never an inference tensor (a refresh inside torch.inference_mode, e.g. while measuring):
        # the exporter traces with autograd and cannot save those.
        with torch.inference_mode(False), torch.no_grad():
            self.weight_binary = self.binarized_weight(ste=False).detach().clone()
        # The tensors themselves (not the module attributes): while a graph is traced for
        # export the attributes are stand-ins, and these still tell whether the buffer is current.
        self.__dict__["_sources"] = (self.weight, self.weight_scale)
        self._cache_key = self._key(self.weight, self.weight_scale)

    def _current(self) -> bool:
        sources = self.__dict__.get("_sources")
        return self.weight_binary is not None and sources is not None and self._cache_key == self._key(*sources)

    def _eval_weight(self) -> torch.Tensor:
        if _tracing():
            if self._current():
                return self.weight_binary       # a float initializer of +-s_c in the exported graph
            # The latent weight changed since the buffer was made (in place, in eval mode, with
            # no forward since): trace the binarization itself, which is correct (the exporter's
            # constant folding usually turns it into the same initializer).
            return self.binarized_weight(ste=False)
        if self._cache_key != self._key(self.weight, self.weight_scale) or self.weight_binary is None:
            self.refresh()
        if self.weight_binary.is_inference() and not torch.is_inference_mode_enabled():
            self.refresh()
        return self.weight_binary

    def train(self, mode: bool = True):
        super().train(mode)
        if not mode and self.weights_binary and not _tracing():
            self.refresh()
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A full-precision checkpoint: start the scales from the weights it brings.
        if self.weight_scale is not None and prefix + "weight_scale" not in state_dict \
                and prefix + "weight" in state_dict:
            state_dict[prefix + "weight_scale"] = initial_scale(state_dict[prefix + "weight"].float()).to(
                self.weight_scale.dtype)
        if self.input_scale is not None and prefix + "input_scale" not in state_dict:
            state_dict[prefix + "input_scale"] = torch.ones_like(self.input_scale)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self.refresh()

    # -- forward
    def binarized_input(self, x: torch.Tensor) -> torch.Tensor:
        out = sign_pm1(x)
        if self.training:
            out = _ste(out, x.clamp(-1.0, 1.0))
        if self.input_scale is not None:
            out = out * self.input_scale
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return F.linear(x, self.weight, self.bias)
        if self.inputs_binary:
            x = self.binarized_input(x)
        if not self.weights_binary:
            weight = self.weight
        elif self.training:
            weight = self.binarized_weight(ste=True)
        else:
            weight = self._eval_weight()
        return F.linear(x, weight, self.bias)

    def compression_info(self) -> dict[str, Any]:
        binary_w = self.enabled and self.weights_binary
        info: dict[str, Any] = {"weight_bits": 1 if binary_w else 32,
                                "input_bits": 1 if self.enabled and self.inputs_binary else 32}
        if binary_w:
            info["storage_bits"] = {"weight": self.weight.numel()}
            info["binary_weights"] = self.weight.numel()
        info["scales"] = (self.out_features if binary_w else 0) + (1 if self.input_scale is not None else 0)
        return info


# ----------------------------------------------------------------------------- finding the blocks' linears
def _attention_names(root: nn.Module) -> list[str]:
    from deploykit.recipes.attention import HFSelfAttention, TimmAttention, is_hf_self_attention, is_timm_attention

    return [name for name, m in root.named_modules()
            if isinstance(m, (HFSelfAttention, TimmAttention)) or is_hf_self_attention(m) or is_timm_attention(m)]


def block_linears(root: nn.Module) -> list[tuple[str, str]]:
    """``(qualified name, part)`` of every ``nn.Linear`` inside a transformer block.

    A block is the ancestor of an attention module that is an element of an
    ``nn.ModuleList`` / ``nn.Sequential`` (timm ``blocks.i``, BERT ``encoder.layer.i``);
    linears under the block's child holding the attention (timm ``attn``, BERT
    ``attention``) are ``"attention"``, the others ``"mlp"``. Attention gates (inside an
    ``AttentionCore``) are skipped.
    """
    from deploykit.recipes.attention import AttentionCore

    modules = dict(root.named_modules())
    found: dict[str, str] = {}
    attention = _attention_names(root)
    if not attention:
        raise UserError("no attention module found, so no transformer blocks to binarize",
                        fix="the binarization transforms support Hugging Face BERT-family encoders and timm ViTs")
    for name in attention:
        parts = name.split(".")
        block = None
        for cut in range(len(parts) - 1, 0, -1):
            parent = modules[".".join(parts[:cut - 1])] if cut > 1 else root
            if isinstance(parent, (nn.ModuleList, nn.Sequential)):
                block = ".".join(parts[:cut])
                attention_child = parts[cut] if cut < len(parts) else None
                break
        if block is None:
            raise UserError(f"cannot find the transformer block around '{name}'",
                            fix="binarization expects blocks in a ModuleList / Sequential (timm ViT, BERT)")
        core_names = [n for n, m in modules[block].named_modules() if isinstance(m, AttentionCore)]
        for local, m in modules[block].named_modules():
            if not isinstance(m, nn.Linear) or any(local.startswith(c + ".") for c in core_names):
                continue
            part = "attention" if local.split(".")[0] == attention_child else "mlp"
            found[f"{block}.{local}"] = part
    return list(found.items())


def _targets(settings: dict[str, Any]) -> str:
    targets = str(settings.get("targets", "mlp"))
    if targets not in TARGETS:
        raise UserError(f"unknown binarization targets '{targets}'", fix=f"use one of {', '.join(TARGETS)}")
    return targets


def _binary_linears_for(root: nn.Module, targets: str) -> list[BinaryLinear]:
    out = []
    for name, part in block_linears(root):
        if targets != "all" and part != targets:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        linear = getattr(parent, child)
        if not isinstance(linear, BinaryLinear):
            linear = BinaryLinear(linear, part)
            setattr(parent, child, linear)
        out.append(linear)
    if not out:
        raise UserError(f"no linear layer matches targets '{targets}'", fix="use targets: mlp, attention or all")
    return out


def binary_linears(root: nn.Module) -> list[BinaryLinear]:
    return [m for m in root.modules() if isinstance(m, BinaryLinear)]


def binary_attention_modules(root: nn.Module) -> list[BinaryAttention]:
    return [m for m in root.modules() if isinstance(m, BinaryAttention)]


# ----------------------------------------------------------------------------- transforms
def apply_binary_attention(root: nn.Module, *, beta: float = 0.25, scale: bool = False, ste: bool = True) -> int:
    from deploykit.recipes.attention import swap_all

    BinaryAttention(beta, scale, ste)                   # validates before any module is swapped
    modules = swap_all(root)
    for m in modules:
        prob = BinaryAttention(beta, scale, ste)
        prob.train(m.training)
        m.core.set_probabilities(prob)
    return len(modules)


def apply_binary_weights(root: nn.Module, *, targets: str = "mlp") -> list[BinaryLinear]:
    linears = _binary_linears_for(root, _targets({"targets": targets}))
    for m in linears:
        m.binarize_weights()
    return linears


def apply_binary_activations(root: nn.Module, *, targets: str = "mlp", scale: bool = False) -> list[BinaryLinear]:
    linears = _binary_linears_for(root, _targets({"targets": targets}))
    for m in linears:
        m.binarize_inputs(scale=scale)
    return linears


def _binary_attention(root: nn.Module, settings: dict[str, Any]) -> dict[str, Any]:
    # Kinds are checked by deploykit.recipes.transforms.check_transforms before any transform runs.
    beta = float(settings.get("beta", 0.25))
    scale, ste = bool(settings.get("scale", False)), bool(settings.get("ste", True))
    count = apply_binary_attention(root, beta=beta, scale=scale, ste=ste)
    return {"modules": count, "beta": beta, "scale": scale, "ste": ste}


def _binary_weights(root: nn.Module, settings: dict[str, Any]) -> dict[str, Any]:
    targets = _targets(settings)
    linears = apply_binary_weights(root, targets=targets)
    return {"linears": len(linears), "targets": targets, "binary_weights": sum(m.weight.numel() for m in linears)}


def _binary_activations(root: nn.Module, settings: dict[str, Any]) -> dict[str, Any]:
    targets, scale = _targets(settings), bool(settings.get("scale", False))
    return {"linears": len(apply_binary_activations(root, targets=targets, scale=scale)), "targets": targets,
            "scale": scale}


# name -> (apply(root, settings) -> report dict, {setting: kind}); merged into
# deploykit.recipes.transforms.TRANSFORMS
TRANSFORMS: dict[str, tuple[Callable[[nn.Module, dict[str, Any]], dict[str, Any]], dict[str, str]]] = {
    "binary-attention": (_binary_attention, {"beta": "number", "scale": "bool", "ste": "bool"}),
    "binary-weights": (_binary_weights, {"targets": "str"}),
    "binary-activations": (_binary_activations, {"targets": "str", "scale": "bool"}),
}


# ----------------------------------------------------------------------------- stages and statistics
def set_binarization_stage(root: nn.Module, stage: str, *, reset_scales: bool = True) -> dict[str, Any]:
    """Enable the binary modules of one BiViT training stage; the others run full precision.

    ``none``: everything full precision. ``attention``: binary attention probabilities and
    the binary linears of the attention part (``qkv``/``proj``, BERT ``query``/``key``/
    ``value``/``attention.output.dense``) when the model has any; MLP linears full precision.
    ``all``: everything binary. A linear switched on here after training in full precision
    gets its ``weight_scale`` re-initialised from its latent weight (``reset_scales``).
    Returns how many modules each kind has enabled.
    """
    if stage not in STAGES:
        raise UserError(f"unknown binarization stage '{stage}'", fix=f"use one of {', '.join(STAGES)}")
    attention, linears = binary_attention_modules(root), binary_linears(root)
    if not attention and not linears:
        raise UserError("the model has no binary modules", fix="list binary-attention / binary-weights transforms")
    for m in attention:
        m.enabled = stage != "none"
    for m in linears:
        enable = stage == "all" or (stage == "attention" and m.part == "attention")
        if enable and not m.enabled and reset_scales:
            m.reset_scale()
        m.enabled = enable
    return {"stage": stage, "attention": sum(m.enabled for m in attention), "attention_total": len(attention),
            "linears": sum(m.enabled for m in linears), "linears_total": len(linears)}


@contextlib.contextmanager
def recording_attention(root: nn.Module, *, keep_pattern: bool = False) -> Iterator[list[BinaryAttention]]:
    """Record attention density (and with ``keep_pattern`` the last pattern) of every binary
    attention module of ``root`` inside the ``with`` block; statistics start from zero."""
    modules = binary_attention_modules(root)
    for m in modules:
        m.reset_stats()
        m.record, m.keep_pattern = True, keep_pattern
    try:
        yield modules
    finally:
        for m in modules:
            m.record, m.keep_pattern = False, False


def attention_density(root: nn.Module) -> dict[str, Any]:
    """Per-layer statistics recorded so far (see :func:`recording_attention`) and their
    row-weighted mean density."""
    layers = [{"layer": i, **m.stats()} for i, m in enumerate(binary_attention_modules(root))]
    rows = sum(r["rows"] for r in layers)
    mean = sum(r["density"] * r["rows"] for r in layers if r["rows"]) / rows if rows else None
    return {"layers": layers, "rows": rows, "density": mean}
