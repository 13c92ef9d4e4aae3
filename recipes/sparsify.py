"""Sparsification recipes: 2:4 structured weight sparsity, top-k attention, head pruning.

sparse-2-4
    Magnitude pruning to the 2:4 pattern NVIDIA's sparse tensor cores run (Ampere and
    later; TensorRT ``BuilderFlag.SPARSE_WEIGHTS``): in every group of 4 consecutive weights
    along the *input* (reduction) dimension, the 2 of smallest ``|w|`` are zero. For an
    ``nn.Linear`` weight ``[out, in]`` the groups run along ``in``; in the exported graph
    that is axis 0 of a MatMul's ``[in, out]`` initializer or axis 1 of a ``Gemm(transB=1)``
    one (:func:`deploykit.sparsity.check_2_4` reads both).

    ``targets`` chooses the Linears *inside transformer blocks*: ``mlp`` (the default; the
    feed-forward Linears), ``attention`` (q/k/v or the fused qkv, and the output projection)
    or ``all``. The classifier, the patch embedding, the embeddings, a pooler and the
    attention transforms' own gate Linears are never touched; a Linear whose input width is
    not a multiple of 4 is skipped (listed in the report).

    Each targeted Linear becomes a :class:`Sparse24Linear`: same parameter names and shapes
    (so pretrained weights and checkpoints load unchanged) plus a non-persistent
    ``weight_mask`` buffer. While training it computes ``x (W * mask)^T + b``, so the
    gradient of a masked weight is exactly zero; after every optimizer step (see *driving
    the schedule*) and whenever the module is switched to eval mode, the mask is multiplied
    into the stored weight, so stored, checkpointed and exported weights are exactly 2:4
    (masked values exactly 0.0). In eval mode the forward uses the stored weight as is,
    and the export sees a plain initializer. Loading a state dict recomputes the mask from
    the loaded weights at the current schedule level (a 2:4 checkpoint keeps its own pattern;
    dense weights are pruned by magnitude).

    ``schedule: oneshot`` (the default) applies the full 2:4 mask at once.
    ``schedule: gradual`` with ``steps: N`` starts dense and raises the sparsity along
    ``s(t) = 0.5 * (1 - (1 - t/N)^3)`` (Zhu & Gupta 2017) over ``N`` optimizer steps. At
    every level the pruned weights are a subset of the final 2:4 pattern: the smallest
    ``|w|`` among each group's two smallest are pruned first, so at most 2 per group are
    ever zero and step ``N`` is exactly 2:4. The mask is recomputed from the masked weights,
    so a pruned weight stays pruned.

    Driving the schedule: with ``drive: optimizer`` (the default) every ``step()`` of a
    ``torch.optim`` optimizer that holds a layer's weight advances that layer by one step
    and re-applies its mask (a global optimizer step post-hook, installed once), so any
    training loop, deploykit's included, needs no extra call. ``drive: train-loop`` leaves
    it to the ``on_train_step(step, total)`` call a train loop makes on every module after
    each optimizer step; ``drive: manual`` to the caller: :func:`step_sparsity` (or
    ``Sparse24Linear.step()``) once after each optimizer step. Exactly one of them
    advances a layer, so a schedule is never stepped twice.

topk-attention
    Sparsifiner-style: each query keeps its ``k`` highest (masked) scores and the softmax
    runs over the kept ones only; the other probabilities are exactly 0. ``k`` (int) keeps
    ``min(k, keys)``; ``ratio`` (in (0, 1]) keeps ``max(1, ceil(ratio * n))`` of the ``n``
    *real* keys of each row, so padding does not change what a sentence keeps. Ties at the
    k-th value are all kept (``score >= threshold``), in torch and in the exported graph
    alike, so a row may keep more than k keys. Masked (padding) keys are never kept
    when the row has a real key. Export: ``TopK`` on the last axis with a dynamic
    ``k = Min(k, Shape[-1])`` -> the k-th value as threshold (``GatherElements`` at the
    per-row index for ``ratio``) -> ``GreaterOrEqual`` / ``And`` -> ``Where(-inf)`` ->
    ``Softmax``: standard ops only.

head-pruning
    Removes whole attention heads: q/k/v rows (the fused qkv's three blocks for timm) and
    the output projection's input columns, so every attention matmul shrinks; the
    attention module's and its core's ``num_heads`` follow. ``heads: {layer: [head, ...]}``
    lists them explicitly (deterministic: use it for checkpoints trained after pruning and
    for data-driven lists from :func:`deploykit.sparsity.plan_head_pruning`). Without
    ``heads``, ``prune`` (per layer: one int or a list per layer) or ``ratio`` (of all
    heads, ranked globally, never a whole layer) picks heads by ``importance``; at
    transform time only the data-free ``weight-norm`` ranking is possible:
    ``||W_V,h||_F * ||W_O[:, h]||_F``, the size of head h's value-output path. The data-driven
    rankings (``gradient``: Michel et al. 2019; ``output-norm``) need calibration batches
    and run through :func:`deploykit.sparsity.plan_head_pruning`. Head indices always
    refer to the heads the layer has when the transform runs.

Settings::

    - {name: sparse-2-4}                                    # mlp Linears, one-shot
    - {name: sparse-2-4, targets: all, schedule: gradual, steps: 500}
    - {name: topk-attention, k: 16}
    - {name: topk-attention, ratio: 0.25}
    - {name: head-pruning, heads: {0: [1, 3], 5: [0]}}
    - {name: head-pruning, prune: 2}                        # weight-norm ranking, 2 per layer
"""

from __future__ import annotations

import math
import weakref
from fractions import Fraction
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from deploykit.errors import UserError

TARGETS = ("mlp", "attention", "all")
SCHEDULES = ("oneshot", "gradual")
DRIVES = ("optimizer", "train-loop", "manual")
IMPORTANCE = ("weight-norm", "gradient", "output-norm")


# ============================================================================= 2:4 weights
def mask_2_4(weight: torch.Tensor, fraction: float = 1.0) -> torch.Tensor:
    """The 2:4 magnitude mask of a ``[out, in]`` weight (groups of 4 along ``in``), as 0/1 in
    ``weight``'s dtype.

    ``fraction`` in [0, 1] is the share of the final pattern's zeros applied: 1 is full 2:4
    (the two smallest ``|w|`` of every group zero), 0 keeps everything, in between the
    smallest ``|w|`` among each group's two smallest are zeroed first. Equal magnitudes in a
    group: the lower index is pruned first.
    """
    out_features, in_features = weight.shape[0], weight.shape[-1]
    if in_features % 4:
        raise ValueError(f"2:4 groups need an input width divisible by 4, not {in_features}")
    w = weight.detach().reshape(out_features, in_features // 4, 4).abs().float()
    order = torch.argsort(w, dim=-1, stable=True)
    candidates = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, order[..., :2], True)
    fraction = min(max(float(fraction), 0.0), 1.0)
    if fraction >= 1.0:
        pruned = candidates
    else:
        count = int(round(fraction * int(candidates.sum())))
        pruned = torch.zeros_like(candidates)
        if count:
            flat = torch.where(candidates, w, torch.full_like(w, float("inf"))).flatten()
            pruned.view(-1)[torch.topk(flat, count, largest=False, sorted=False).indices] = True
    return (~pruned).reshape(weight.shape).to(weight.dtype)


def schedule_fraction(step: int, steps: int) -> float:
    """Share of the 2:4 zeros applied after ``step`` of ``steps`` (cubic: fast early, slow late)."""
    if steps <= 0:
        return 1.0
    t = min(max(step, 0), steps) / steps
    return 1.0 - (1.0 - t) ** 3


_LIVE: "weakref.WeakSet[Sparse24Linear]" = weakref.WeakSet()
_HOOK = None


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Global ``torch.optim`` step post-hook: advance and re-mask the layers it updated."""
    layers = [m for m in list(_LIVE) if m.drive == "optimizer"]
    if not layers:
        return
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for m in layers:
        if id(m.weight) in held:
            m.step()


def _install_hook() -> None:
    global _HOOK
    if _HOOK is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _HOOK = register_optimizer_step_post_hook(_after_optimizer_step)


class Sparse24Linear(nn.Linear):
    """An ``nn.Linear`` whose weight is held to a 2:4 magnitude mask (see the module docstring).

    ``steps`` 0 is one-shot; ``steps`` N > 0 reaches 2:4 after N calls of :meth:`step`.
    Same parameters and state-dict keys as the Linear it replaces; the mask is a
    non-persistent buffer recomputed on load.
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, steps: int = 0, drive: str = "optimizer") -> "Sparse24Linear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new.steps, new.step_count, new.drive = int(steps), 0, drive
        new.register_buffer("weight_mask", torch.ones_like(linear.weight, requires_grad=False), persistent=False)
        new.training = linear.training
        new.refresh_mask()
        _LIVE.add(new)
        if drive == "optimizer":
            _install_hook()
        return new

    def __setstate__(self, state):           # deepcopy / pickle: the copy is driven too
        super().__setstate__(state)
        _LIVE.add(self)

    @property
    def fraction(self) -> float:
        return schedule_fraction(self.step_count, self.steps)

    @torch.no_grad()
    def refresh_mask(self) -> None:
        """Recompute the mask from the (masked) weight at the current level and apply it."""
        self.weight_mask.copy_(mask_2_4(self.weight * self.weight_mask, self.fraction))
        self.apply_mask()

    @torch.no_grad()
    def apply_mask(self) -> None:
        self.weight.mul_(self.weight_mask)

    def step(self) -> None:
        """One optimizer step done: advance a gradual schedule and re-apply the mask."""
        if self.step_count < self.steps:
            before = self.fraction
            self.step_count += 1
            if self.fraction != before:
                self.refresh_mask()
                return
        self.apply_mask()

    def on_train_step(self, step: int, total: int) -> None:
        """Called by a train loop after each optimizer step; advances ``drive: train-loop`` layers."""
        if self.drive == "train-loop":
            self.step()

    def train(self, mode: bool = True):
        super().train(mode)
        if not mode:
            self.apply_mask()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return F.linear(x, self.weight * self.weight_mask, self.bias)
        return F.linear(x, self.weight, self.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "weight" in state_dict and self.weight.shape == self.weight_mask.shape:
            with torch.no_grad():
                self.weight_mask.fill_(1.0)
                if self.fraction > 0:
                    self.weight_mask.copy_(mask_2_4(self.weight, self.fraction))
                self.apply_mask()

    def extra_repr(self) -> str:
        schedule = f"gradual {self.step_count}/{self.steps}" if self.steps else "oneshot"
        return f"{super().extra_repr()}, sparsity=2:4 ({schedule})"


def step_sparsity(root: nn.Module, steps: int = 1) -> float:
    """Advance every :class:`Sparse24Linear` of ``root`` by ``steps`` (for ``drive: manual``);
    returns the mean share of the 2:4 zeros applied."""
    layers = [m for m in root.modules() if isinstance(m, Sparse24Linear)]
    for _ in range(steps):
        for m in layers:
            m.step()
    return sum(m.fraction for m in layers) / max(len(layers), 1)


def _is_attention(module: nn.Module) -> bool:
    from deploykit.recipes.attention import (
        HFSelfAttention,
        TimmAttention,
        is_hf_self_attention,
        is_timm_attention,
    )

    return isinstance(module, (HFSelfAttention, TimmAttention)) or is_hf_self_attention(module) \
        or is_timm_attention(module)


def block_linears(root: nn.Module) -> list[tuple[str, str, nn.Linear]]:
    """``(name, "attention" | "mlp", linear)`` for the Linears inside transformer blocks.

    A block is the nearest ancestor of an attention module that is an item of a
    ``ModuleList`` / ``Sequential`` (timm ``blocks.N``, Hugging Face ``encoder.layer.N``);
    Linears under the block's child holding the attention module are ``attention``, the
    rest of the block ``mlp``. Gate Linears of the attention transforms are left out.
    """
    named = dict(root.named_modules())
    attention = [n for n, m in named.items() if n and _is_attention(m)]
    attention = [n for n in attention if not any(n.startswith(o + ".") for o in attention)]
    if not attention:
        raise UserError("no transformer block found for 2:4 sparsity",
                        fix="sparse-2-4 supports Hugging Face BERT-family encoders and timm ViTs")
    blocks: dict[str, str] = {}
    for name in attention:
        parts = name.split(".")
        block = None
        for depth in range(len(parts) - 1, 0, -1):
            parent = named.get(".".join(parts[:depth - 1]) if depth > 1 else "")
            if isinstance(parent, (nn.ModuleList, nn.Sequential)):
                block = ".".join(parts[:depth])
                blocks[block] = ".".join(parts[:depth + 1])
                break
        if block is None:
            raise UserError(f"attention module {name} is not inside a list of blocks",
                            fix="sparse-2-4 supports Hugging Face BERT-family encoders and timm ViTs")
    out = []
    for name, module in named.items():
        if not isinstance(module, nn.Linear):
            continue
        block = next((b for b in blocks if name.startswith(b + ".")), None)
        if block is None or ".core." in name:
            continue
        kind = "attention" if name.startswith(blocks[block] + ".") else "mlp"
        out.append((name, kind, module))
    return out


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def apply_sparse_2_4(root: nn.Module, *, targets: str = "mlp", schedule: str = "oneshot", steps: int | None = None,
                     drive: str = "optimizer") -> dict[str, Any]:
    """Replace the targeted block Linears by :class:`Sparse24Linear` (in place)."""
    if targets not in TARGETS:
        raise UserError(f"unknown sparse-2-4 targets '{targets}'", fix=f"use one of {', '.join(TARGETS)}")
    if schedule not in SCHEDULES:
        raise UserError(f"unknown sparse-2-4 schedule '{schedule}'", fix=f"use one of {', '.join(SCHEDULES)}")
    if drive not in DRIVES:
        raise UserError(f"unknown sparse-2-4 drive '{drive}'", fix=f"use one of {', '.join(DRIVES)}")
    if schedule == "gradual" and (steps is None or int(steps) < 1):
        raise UserError("the gradual 2:4 schedule needs steps >= 1",
                        fix="e.g. {name: sparse-2-4, schedule: gradual, steps: 500}")
    n_steps = int(steps) if schedule == "gradual" else 0
    layers, skipped = [], []
    for name, kind, linear in block_linears(root):
        if targets != "all" and kind != targets:
            continue
        if isinstance(linear, Sparse24Linear):
            raise UserError(f"{name} is already 2:4 sparse", fix="list sparse-2-4 once")
        if linear.in_features % 4:
            skipped.append(name)
            continue
        _set_module(root, name, Sparse24Linear.from_linear(linear, steps=n_steps, drive=drive))
        layers.append(name)
    if not layers:
        raise UserError(f"sparse-2-4 found no {targets} Linear to prune", fix="check targets")
    return {"layers": len(layers), "targets": targets, "schedule": schedule, "steps": n_steps, "drive": drive,
            "skipped": skipped}


# ============================================================================= top-k attention
class TopKAttention(nn.Module):
    """Top-k probabilities: ``softmax`` over each row's kept keys, exact zeros elsewhere.

    Used through ``AttentionCore.set_probabilities``: ``forward(masked_scores, mask)``
    with scores ``(B, H, Tq, Tk)`` and the core's additive or boolean mask. With
    :attr:`recording` on, every call adds to per-head counts of zero probabilities among
    real keys (real query rows only); :meth:`stats` reads them.
    """

    def __init__(self, k: int | None = None, ratio: float | None = None):
        super().__init__()
        if (k is None) == (ratio is None):
            raise UserError("topk-attention needs exactly one of k and ratio",
                            fix="e.g. {name: topk-attention, k: 16} or {name: topk-attention, ratio: 0.25}")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise UserError(f"topk-attention k must be an integer >= 1, not {k!r}", fix="e.g. k: 16")
        if ratio is not None and not 0.0 < float(ratio) <= 1.0:
            raise UserError(f"topk-attention ratio {ratio} is outside (0, 1]", fix="e.g. ratio: 0.25")
        self.k = k
        self.ratio = None if ratio is None else float(ratio)
        fraction = Fraction(self.ratio or 1.0).limit_denominator(1 << 16)
        self._num, self._den = fraction.numerator, fraction.denominator      # integer ceil, exportable
        self.recording = False
        self.reset_stats()

    def extra_repr(self) -> str:
        return f"k={self.k}" if self.k is not None else f"ratio={self.ratio}"

    def reset_stats(self) -> None:
        self._zeros: torch.Tensor | None = None
        self._real: torch.Tensor | None = None
        self.calls = 0

    @staticmethod
    def _allowed(mask: torch.Tensor | None) -> torch.Tensor | None:
        if mask is None:
            return None
        return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2

    def threshold(self, scores: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        """The k-th largest score of each row, ``(..., 1)``."""
        n = scores.shape[-1]
        if self.k is not None:
            return torch.topk(scores, torch.sym_min(self.k, n), dim=-1).values[..., -1:]
        top = torch.sym_max(1, (n * self._num + self._den - 1) // self._den)
        values = torch.topk(scores, top, dim=-1).values
        if allowed is None:
            return values[..., -1:]
        real = allowed.sum(dim=-1, keepdim=True)
        keep = torch.clamp((real * self._num + self._den - 1) // self._den, min=1)
        index = (keep - 1).expand(*values.shape[:-1], 1)
        return torch.gather(values, -1, index)

    def forward(self, scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        allowed = self._allowed(mask)
        keep = scores >= self.threshold(scores, allowed)
        if allowed is not None:
            # never a padding key while the row has a real one; a row without real keys
            # falls back to the threshold alone (as the dense softmax, it is not used)
            keep = keep & (allowed | ~allowed.any(dim=-1, keepdim=True))
        probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
        if self.recording:
            self._record(probs, allowed)
        return probs

    @torch.no_grad()
    def _record(self, probs: torch.Tensor, allowed: torch.Tensor | None) -> None:
        b, h, tq, tk = probs.shape
        real = torch.ones(1, 1, 1, tk, dtype=torch.bool, device=probs.device) if allowed is None else allowed
        while real.dim() < 4:
            real = real.unsqueeze(0)
        if tq == tk:       # self-attention: a query row is real when its token is a real key
            token = real.any(dim=-2)                                   # (B|1, 1|H, Tk)
            real = real & token.unsqueeze(-1)
        real = real.expand(b, h, tq, tk)
        zeros = ((probs == 0) & real).sum(dim=(0, 2, 3)).double()
        count = real.sum(dim=(0, 2, 3)).double()
        if self._zeros is None or self._zeros.shape[0] != h:
            self._zeros, self._real = torch.zeros(h, dtype=torch.float64), torch.zeros(h, dtype=torch.float64)
        self._zeros += zeros.cpu()
        self._real += count.cpu()
        self.calls += 1

    def stats(self) -> dict[str, Any]:
        """Per head: the share of zero probabilities among real keys over the recorded calls."""
        if self._zeros is None:
            return {"heads": [], "mean": None, "calls": 0}
        heads = (self._zeros / self._real.clamp(min=1)).tolist()
        return {"heads": [round(v, 6) for v in heads],
                "mean": round(float(self._zeros.sum() / self._real.sum().clamp(min=1)), 6), "calls": self.calls}


def apply_topk_attention(root: nn.Module, *, k: int | None = None, ratio: float | None = None) -> int:
    from deploykit.recipes.attention import swap_all

    TopKAttention(k=k, ratio=ratio)        # validates before anything is swapped
    modules = swap_all(root)
    for m in modules:
        m.core.set_probabilities(TopKAttention(k=k, ratio=ratio))
    return len(modules)


def topk_modules(root: nn.Module) -> list[TopKAttention | None]:
    """Per attention layer (in order): its :class:`TopKAttention`, or None."""
    from deploykit.recipes.attention import attention_modules

    return [m.core.prob_fn if isinstance(m.core.prob_fn, TopKAttention) else None for m in attention_modules(root)]


# ============================================================================= head pruning
def output_projection(root: nn.Module, attention: nn.Module) -> nn.Linear:
    """The Linear that maps the heads' concatenated context back to the residual width."""
    from deploykit.recipes.attention import TimmAttention

    if isinstance(attention, TimmAttention):
        return attention.proj
    for parent in root.modules():
        if getattr(parent, "self", None) is attention:
            dense = getattr(getattr(parent, "output", None), "dense", None)
            if isinstance(dense, nn.Linear):
                return dense
    raise UserError("the attention output projection was not found",
                    fix="head pruning supports BERT-family encoders (attention.output.dense) and timm ViTs")


def head_layout(attention: nn.Module) -> tuple[int, int]:
    from deploykit.recipes.attention import TimmAttention

    if isinstance(attention, TimmAttention):
        return attention.num_heads, attention.head_dim
    return attention.num_attention_heads, attention.attention_head_size


@torch.no_grad()
def _slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep rows (``dim`` 0: outputs, with the bias) or columns (``dim`` 1: inputs) ``index``."""
    weight = linear.weight
    linear.weight = nn.Parameter(weight.index_select(dim, index).clone(), requires_grad=weight.requires_grad)
    if dim == 0:
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias[index].clone(), requires_grad=linear.bias.requires_grad)
        linear.out_features = int(index.numel())
    else:
        linear.in_features = int(index.numel())
    if isinstance(linear, Sparse24Linear):
        if linear.in_features % 4:
            raise UserError(f"head pruning leaves a 2:4 Linear with {linear.in_features} inputs (not a multiple of 4)",
                            fix="prune heads so that heads x head_dim stays a multiple of 4")
        linear.weight_mask = linear.weight_mask.index_select(dim, index).clone()
        linear.refresh_mask()


def _rows(heads: list[int], head_dim: int, device) -> torch.Tensor:
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim, device=device) for h in heads])


def prune_heads(root: nn.Module, heads_to_prune: dict[int, Iterable[int]]) -> dict[str, Any]:
    """Remove ``heads_to_prune[layer]`` (indices of the layer's current heads) in place.

    Layers are the attention modules in module order (as :func:`attention_modules` lists
    them); the modules are swapped to deploykit's attention first (weights and names kept).
    Returns the heads left per layer and the parameters removed.
    """
    from deploykit.recipes.attention import TimmAttention, swap_all

    modules = swap_all(root)
    plan = normalise_heads(heads_to_prune)
    for layer, heads in plan.items():
        if not 0 <= layer < len(modules):
            raise UserError(f"head pruning names layer {layer}; the model has layers 0..{len(modules) - 1}",
                            fix="check the heads list")
        count, _ = head_layout(modules[layer])
        if any(not 0 <= h < count for h in heads):
            raise UserError(f"head pruning names heads {heads} of layer {layer}, which has heads 0..{count - 1}",
                            fix="head indices refer to the layer's heads when the transform runs")
        if len(heads) >= count:
            raise UserError(f"head pruning would remove every head of layer {layer}",
                            fix="keep at least one head per layer")
    before = sum(p.numel() for p in root.parameters())
    for layer, heads in plan.items():
        if not heads:
            continue
        m = modules[layer]
        core = m.core
        if core.gate is not None:
            raise UserError("head pruning does not support gated attention", fix="list head-pruning without the gate")
        if core.mixer is not None and isinstance(core.mixer.decay, (list, tuple)):
            raise UserError("head pruning does not support per-head linear-attention decay",
                            fix="use one decay for every head")
        count, head_dim = head_layout(m)
        kept = [h for h in range(count) if h not in set(heads)]
        proj = output_projection(root, m)
        device = proj.weight.device
        rows = _rows(kept, head_dim, device)
        if isinstance(m, TimmAttention):
            if not isinstance(m.norm, nn.Identity) or m.gate is not None:
                raise UserError("head pruning does not support timm attention with a norm or gate after the heads",
                                fix="use a plain timm Attention")
            width = count * head_dim
            _slice_linear(m.qkv, torch.cat([rows + i * width for i in range(3)]), 0)
            m.num_heads = len(kept)
            m.attn_dim = len(kept) * head_dim
        else:
            for linear in (m.query, m.key, m.value):
                _slice_linear(linear, rows, 0)
            m.num_attention_heads = len(kept)
            m.all_head_size = len(kept) * head_dim
        _slice_linear(proj, rows, 1)
        core.num_heads = len(kept)
        original = getattr(m, "head_ids", list(range(count)))
        m.head_ids = [original[h] for h in kept]
    after = sum(p.numel() for p in root.parameters())
    return {"heads": [head_layout(m)[0] for m in modules], "pruned": {k: v for k, v in plan.items() if v},
            "parameters_removed": before - after}


def normalise_heads(heads: dict[Any, Iterable[int]] | None) -> dict[int, list[int]]:
    """``{layer: [head, ...]}`` with int keys (YAML / JSON keys may be strings), sorted, unique."""
    if heads is None:
        return {}
    if not isinstance(heads, dict):
        raise UserError("head-pruning heads must be a mapping {layer: [head, ...]}", fix="e.g. heads: {0: [1, 3]}")
    out: dict[int, list[int]] = {}
    for layer, hs in heads.items():
        try:
            out[int(layer)] = sorted({int(h) for h in (hs or [])})
        except (TypeError, ValueError):
            raise UserError(f"head-pruning heads {layer!r}: {hs!r} are not integers",
                            fix="e.g. heads: {0: [1, 3]}") from None
    return dict(sorted(out.items()))


@torch.no_grad()
def weight_norm_importance(root: nn.Module) -> torch.Tensor:
    """Data-free importance ``[layers, max_heads]``: ``||W_V,h||_F * ||W_O[:, h]||_F`` (NaN pads
    layers with fewer heads)."""
    from deploykit.recipes.attention import TimmAttention, swap_all

    modules = swap_all(root)
    rows = []
    for m in modules:
        count, d = head_layout(m)
        if isinstance(m, TimmAttention):
            value = m.qkv.weight[2 * count * d: 3 * count * d]
        else:
            value = m.value.weight
        proj = output_projection(root, m).weight
        rows.append(torch.stack([value[h * d:(h + 1) * d].float().norm() * proj[:, h * d:(h + 1) * d].float().norm()
                                 for h in range(count)]))
    return pad_layers(rows)


def pad_layers(rows: list[torch.Tensor]) -> torch.Tensor:
    width = max(r.numel() for r in rows)
    out = torch.full((len(rows), width), float("nan"))
    for i, r in enumerate(rows):
        out[i, :r.numel()] = r.detach().float().cpu()
    return out


def select_heads(importance: torch.Tensor, *, prune: int | list[int] | None = None,
                 ratio: float | None = None) -> dict[int, list[int]]:
    """The least important heads: ``prune`` per layer (an int for every layer or a list per
    layer), or ``ratio`` of all heads ranked globally after normalising each layer's scores
    to unit L2 norm (Michel et al. 2019); a layer always keeps at least one head. NaN
    entries (layers with fewer heads) are never chosen; ties go to the lower index."""
    if (prune is None) == (ratio is None):
        raise UserError("head pruning needs exactly one of prune, ratio or heads",
                        fix="e.g. {name: head-pruning, prune: 2} or {name: head-pruning, heads: {0: [1]}}")
    importance = importance.detach().float().cpu()
    layers = importance.shape[0]
    present = [int((~torch.isnan(importance[i])).sum()) for i in range(layers)]
    out: dict[int, list[int]] = {}
    if prune is not None:
        counts = [prune] * layers if isinstance(prune, int) else list(prune)
        if len(counts) != layers or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
            raise UserError(f"head-pruning prune {prune!r} is not a count >= 0 (or a list of {layers})",
                            fix="e.g. prune: 2 or prune: [0, 1, 2, ...] per layer")
        for i, c in enumerate(counts):
            if c >= present[i]:
                raise UserError(f"head-pruning prune {c} removes every head of layer {i} ({present[i]} heads)",
                                fix="keep at least one head per layer")
            scores = torch.nan_to_num(importance[i], nan=float("inf"))
            order = sorted(range(importance.shape[1]), key=lambda h: (float(scores[h]), h))
            out[i] = sorted(order[:c])
        return out
    if not 0.0 < float(ratio) < 1.0:
        raise UserError(f"head-pruning ratio {ratio} is outside (0, 1)", fix="e.g. ratio: 0.25")
    normed = importance / torch.nan_to_num(importance, nan=0.0).norm(dim=1, keepdim=True).clamp(min=1e-12)
    total = int(round(float(ratio) * sum(present)))
    candidates = sorted(((float(normed[i, h]), i, h) for i in range(layers) for h in range(importance.shape[1])
                         if not math.isnan(float(normed[i, h]))))
    left = list(present)
    out = {i: [] for i in range(layers)}
    for _, i, h in candidates:
        if total == 0:
            break
        if left[i] > 1:
            out[i].append(h)
            left[i] -= 1
            total -= 1
    return {i: sorted(v) for i, v in out.items()}


def apply_head_pruning(root: nn.Module, *, heads=None, prune=None, ratio=None,
                       importance: str = "weight-norm") -> dict[str, Any]:
    if importance not in IMPORTANCE:
        raise UserError(f"unknown head importance '{importance}'", fix=f"use one of {', '.join(IMPORTANCE)}")
    if heads is not None:
        if prune is not None or ratio is not None:
            raise UserError("head-pruning takes heads, or prune / ratio, not both",
                            fix="an explicit heads list decides alone")
        plan = normalise_heads(heads)
    else:
        if importance != "weight-norm":
            raise UserError(f"head importance '{importance}' needs calibration data, which a transform does not have",
                            fix="compute the list with deploykit.sparsity.plan_head_pruning(bundle, data, ...) "
                                "and give it as heads: {layer: [head, ...]}")
        plan = select_heads(weight_norm_importance(root), prune=prune, ratio=ratio)
    result = prune_heads(root, plan)
    return {"heads": {k: v for k, v in plan.items() if v}, "heads_left": result["heads"],
            "parameters_removed": result["parameters_removed"], "importance": None if heads is not None else importance}


# ============================================================================= registry
def _sparse(root: nn.Module, settings: dict[str, Any]) -> dict[str, Any]:
    return apply_sparse_2_4(root, targets=str(settings.get("targets", "mlp")),
                            schedule=str(settings.get("schedule", "oneshot")), steps=settings.get("steps"),
                            drive=str(settings.get("drive", "optimizer")))


def _topk(root: nn.Module, settings: dict[str, Any]) -> dict[str, Any]:
    k, ratio = settings.get("k"), settings.get("ratio")
    count = apply_topk_attention(root, k=k, ratio=None if ratio is None else float(ratio))
    return {"modules": count, "k": k, "ratio": ratio}


def _heads(root: nn.Module, settings: dict[str, Any]) -> dict[str, Any]:
    ratio = settings.get("ratio")
    return apply_head_pruning(root, heads=settings.get("heads"), prune=settings.get("prune"),
                              ratio=None if ratio is None else float(ratio),
                              importance=str(settings.get("importance", "weight-norm")))


# name -> (apply(root, settings) -> report dict, {setting: kind}); merged into
# deploykit.recipes.transforms.TRANSFORMS
TRANSFORMS: dict[str, tuple[Callable[[nn.Module, dict[str, Any]], dict[str, Any]], dict[str, str]]] = {
    "sparse-2-4": (_sparse, {"targets": "str", "schedule": "str", "steps": "int?", "drive": "str"}),
    "topk-attention": (_topk, {"k": "int?", "ratio": "number?"}),
    "head-pruning": (_heads, {"heads": "any", "prune": "ints?", "ratio": "number?",
                                    "importance": "str"}),
}
