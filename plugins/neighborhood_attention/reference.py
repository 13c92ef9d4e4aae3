"""Neighborhood (sliding-window) attention: the single source of truth for deploykit's op.

Semantics follow NATTEN exactly, per axis of length ``L`` with kernel size ``k``, dilation
``d`` and a causal flag:

* **dilation** splits the axis into ``d`` groups ``i mod d``; a query only sees keys of its
  own group, and within the group positions ``j = i // d`` are consecutive;
* **non-causal**: the window of ``k`` group positions starts at ``j - k//2`` and is shifted at
  the borders so every query sees exactly ``k`` keys: ``start = clamp(j - k//2, 0, L_g - k)``
  with ``L_g`` the group's length. Odd ``k``: ``k//2`` keys each side; even ``k``: ``k/2`` left
  and ``k/2 - 1`` right;
* **causal**: keys ``[max(j - k + 1, 0), j]`` (fewer than ``k`` at the start);
* **2-D** (and N-D): the AND of the per-axis windows; each axis has its own ``k``, ``d``,
  causal flag;
* **relative position bias** (non-causal only, as in NATTEN): ``rpb[h, (m_0 - j_0) + k_0 - 1,
  ...]`` per axis, shape ``(H, 2k_0 - 1, 2k_1 - 1, ...)``;
* ``k * d <= L`` per axis, else every group could not hold a full window (an error).

The LLM-style causal sliding window of ``w`` tokens is the 1-D causal case with ``k = w``,
``d = 1`` (:func:`sliding_window_attention`).

Layout: ``q, k, v`` are ``(batch, heads, *spatial, head_dim)``; ``key_mask`` (optional,
``(batch, *spatial)`` bool, True = a real token) removes padded keys from every window.
The computation gathers each query's ``prod(k)`` neighbours: O(N * k) memory, never N x N.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch

from deploykit.errors import UserError


def _per_axis(value, ndim: int, name: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != ndim:
            raise UserError(f"neighborhood attention: {name} has {len(value)} entries for {ndim} axes",
                            fix=f"give one {name} per spatial axis, or one for all")
        return tuple(value)
    return (value,) * ndim


def check_window(length: int, kernel: int, dilation: int, axis: int = 0) -> None:
    if kernel < 1 or dilation < 1:
        raise UserError(f"neighborhood attention: kernel {kernel} and dilation {dilation} must be >= 1 (axis {axis})",
                        fix="use kernel_size >= 1 and dilation >= 1")
    if kernel * dilation > length:
        raise UserError(f"neighborhood attention: kernel_size x dilation = {kernel} x {dilation} = "
                        f"{kernel * dilation} exceeds the length {length} of axis {axis}",
                        fix=f"use kernel_size * dilation <= {length} (NATTEN's rule)")


def window_indices(length: int, kernel: int, dilation: int = 1, causal: bool = False,
                   device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For one axis: ``(index, valid, offset)``, each ``(length, kernel)``.

    ``index[i, t]`` is the position of query ``i``'s ``t``-th key (clamped to a real
    position where ``valid`` is False, i.e. causal windows shorter than ``k``);
    ``offset[i, t] = (key - query) // dilation + kernel - 1`` indexes the relative
    position bias.
    """
    check_window(length, kernel, dilation)
    i = torch.arange(length, device=device)
    group, j = i % dilation, i // dilation
    group_len = (length - group + dilation - 1) // dilation              # ceil((L - g) / d)
    t = torch.arange(kernel, device=device)
    if causal:
        m = j[:, None] - (kernel - 1) + t[None, :]                          # [j - k + 1, j]
        valid = m >= 0
        m = m.clamp(min=0)
    else:
        start = (j - kernel // 2).clamp(min=0)
        start = torch.minimum(start, group_len - kernel)
        m = start[:, None] + t[None, :]
        valid = torch.ones(length, kernel, dtype=torch.bool, device=device)
    index = group[:, None] + m * dilation
    offset = m - j[:, None] + kernel - 1
    return index, valid, offset


def neighborhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: int | Sequence[int],
                           dilation: int | Sequence[int] = 1, is_causal: bool | Sequence[bool] = False,
                           rpb: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                           scale: float | None = None) -> torch.Tensor:
    """Neighborhood attention over the spatial axes of ``q``/``k``/``v`` (B, H, *spatial, D)."""
    spatial = tuple(q.shape[2:-1])
    ndim = len(spatial)
    if ndim < 1 or k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        raise UserError(f"neighborhood attention needs q, k (B, H, *spatial, D) of one shape and v (.., Dv); got "
                        f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}", fix="check the tensor layouts")
    kernels = _per_axis(kernel_size, ndim, "kernel_size")
    dilations = _per_axis(dilation, ndim, "dilation")
    causals = _per_axis(is_causal, ndim, "is_causal")
    if rpb is not None and any(causals):
        raise UserError("relative position bias is not defined for causal neighborhood attention (as in NATTEN)",
                        fix="drop rpb or use a non-causal axis")
    b, h, d = q.shape[0], q.shape[1], q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    per_axis = [window_indices(n, kk, dd, cc, q.device) for n, kk, dd, cc in zip(spatial, kernels, dilations, causals)]
    flat_index, valid, offsets = _combine_axes(per_axis, spatial)
    n_total = flat_index.shape[0]
    qf = q.reshape(b, h, n_total, d)
    kf = k.reshape(b, h, n_total, d)
    vf = v.reshape(b, h, n_total, v.shape[-1])
    keys = kf[:, :, flat_index]                                  # (B, H, N, K, D)
    values = vf[:, :, flat_index]
    scores = torch.einsum("bhnd,bhnkd->bhnk", qf, keys) * scale
    if rpb is not None:
        scores = scores + rpb[(slice(None), *offsets)][None]
    allowed = valid[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask.reshape(b, n_total)[:, flat_index][:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)       # a row with no valid key outputs 0
    out = torch.einsum("bhnk,bhnkd->bhnd", probs, values)
    return out.reshape(*q.shape[:-1], v.shape[-1])


def _combine_axes(per_axis, spatial):
    """Per-axis windows -> (N, K) flat key indices, validity and per-axis bias offsets.

    Query (q_0, .., q_{D-1}) and neighbour (t_0, .., t_{D-1}) each span one dimension per
    axis; the flat key is sum_a index_a[q_a, t_a] * stride_a (row-major)."""
    ndim = len(spatial)
    strides = [1] * ndim
    for a in range(ndim - 2, -1, -1):
        strides[a] = strides[a + 1] * spatial[a + 1]
    flat, valid, offsets = 0, True, []
    for a, (index, ok, off) in enumerate(per_axis):
        shape = [1] * (2 * ndim)
        shape[a], shape[ndim + a] = index.shape
        flat = flat + index.reshape(shape) * strides[a]
        valid = valid & ok.reshape(shape)
        offsets.append(off.reshape(shape))
    n = 1
    for x in spatial:
        n *= x
    full = [*spatial, *[idx.shape[1] for idx, _, _ in per_axis]]
    return (flat.expand(full).reshape(n, -1), valid.expand(full).reshape(n, -1),
            [o.expand(full).reshape(n, -1) for o in offsets])


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                             key_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """LLM-style causal sliding window: each token attends to itself and the ``window - 1`` before it."""
    return neighborhood_attention(q, k, v, window, 1, True, key_mask=key_mask, scale=scale)


def dense_mask(spatial: Sequence[int], kernel_size, dilation=1, is_causal=False) -> torch.Tensor:
    """The (N, N) boolean mask of the same windows, written pair by pair from the rules.

    O(N^2): for tests and small inputs only. It does not share code with the gather path.
    """
    ndim = len(spatial)
    kernels = _per_axis(kernel_size, ndim, "kernel_size")
    dilations = _per_axis(dilation, ndim, "dilation")
    causals = _per_axis(is_causal, ndim, "is_causal")

    def axis_allowed(i: int, n: int, length: int, kk: int, dd: int, causal: bool) -> bool:
        if i % dd != n % dd:
            return False
        j, m = i // dd, n // dd
        group_len = len(range(i % dd, length, dd))
        if causal:
            return j - kk + 1 <= m <= j
        start = min(max(j - kk // 2, 0), group_len - kk)
        return start <= m < start + kk

    for axis, (length, kk, dd) in enumerate(zip(spatial, kernels, dilations)):
        check_window(length, kk, dd, axis)
    positions = list(itertools.product(*[range(n) for n in spatial]))
    mask = torch.zeros(len(positions), len(positions), dtype=torch.bool)
    for a, qi in enumerate(positions):
        for c, ki in enumerate(positions):
            mask[a, c] = all(axis_allowed(x, y, n, kk, dd, cc)
                             for x, y, n, kk, dd, cc in zip(qi, ki, spatial, kernels, dilations, causals))
    return mask
