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
``(batch, *spatial)`` bool, True = a real token). In 1-D it marks right padding and the
windows are placed on each row's own length (NATTEN on the unpadded row; a row shorter
than ``k * d`` sees its whole dilation group; padded queries output 0). In 2-D it only
removes keys from the windows.
The computation gathers each query's ``prod(k)`` neighbours: O(N * k) memory, never N x N.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch

from deploykit.errors import UserError


def per_axis(value, ndim: int, name: str) -> tuple:
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
                   device=None, strict: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For one axis: ``(index, valid, offset)``, each ``(length, kernel)``.

    ``index[i, t]`` is the position of query ``i``'s ``t``-th key (clamped to a real
    position where ``valid`` is False, i.e. causal windows shorter than ``k``);
    ``offset[i, t] = (key - query) // dilation + kernel - 1`` indexes the relative
    position bias. ``strict=False`` admits a group shorter than ``k`` (a short padded row):
    its queries then see the whole group, ``valid`` marking the ``min(k, L_g)`` real slots.
    """
    if strict:
        check_window(length, kernel, dilation)
    i = torch.arange(length, device=device)
    group, j = i % dilation, i // dilation
    group_len = (length - group + dilation - 1) // dilation              # ceil((L - g) / d)
    t = torch.arange(kernel, device=device)
    if causal:
        m = j[:, None] - (kernel - 1) + t[None, :]                          # [j - k + 1, j]
        valid = m >= 0
    else:
        k_eff = group_len.clamp(max=kernel)
        start = (j - kernel // 2).clamp(min=0)
        start = torch.minimum(start, group_len - k_eff)
        m = start[:, None] + t[None, :]
        valid = t[None, :] < k_eff[:, None]
    m = torch.minimum(m.clamp(min=0), (group_len - 1)[:, None])
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
    kernels = per_axis(kernel_size, ndim, "kernel_size")
    dilations = per_axis(dilation, ndim, "dilation")
    causals = per_axis(is_causal, ndim, "is_causal")
    if rpb is not None and any(causals):
        raise UserError("relative position bias is not defined for causal neighborhood attention (as in NATTEN)",
                        fix="drop rpb or use a non-causal axis")
    b, h, d = q.shape[0], q.shape[1], q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    if ndim == 1 and key_mask is not None:
        return _padded_rows(q, k, v, kernels[0], dilations[0], causals[0], rpb, key_mask, scale)
    axes = [window_indices(n, kk, dd, cc, q.device) for n, kk, dd, cc in zip(spatial, kernels, dilations, causals)]
    flat_index, valid, offsets = _combine_axes(axes, spatial)
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


def _padded_rows(q, k, v, kernel, dilation, causal, rpb, key_mask, scale):
    """1-D with a key mask: each row is a right-padded sequence of ``key_mask.sum()`` tokens,
    and its windows are NATTEN's *on that length*, so a row's output never depends on the
    padding after it. A row shorter than ``k * d`` sees its whole group; padded queries get 0."""
    lengths = key_mask.sum(-1)
    prefix = torch.arange(key_mask.shape[-1], device=key_mask.device)[None, :] < lengths[:, None]
    if not torch.equal(prefix, key_mask.bool()):
        raise UserError("neighborhood attention: a 1-D key_mask must mark each row's first tokens (right padding)",
                        fix="pad sequences on the right")
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    for row, n in enumerate(lengths.tolist()):
        if n == 0:
            continue
        index, valid, offset = window_indices(n, kernel, dilation, causal, q.device, strict=False)
        keys, values = k[row, :, index], v[row, :, index]                     # (H, n, k, D)
        scores = torch.einsum("hnd,hnkd->hnk", q[row, :, :n], keys) * scale
        if rpb is not None:
            scores = scores + rpb[:, offset]
        probs = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)
        out[row, :, :n] = torch.einsum("hnk,hnkd->hnd", probs, values)
    return out


def _combine_axes(axes, spatial):
    """Per-axis windows -> (N, K) flat key indices, validity and per-axis bias offsets.

    Query (q_0, .., q_{D-1}) and neighbour (t_0, .., t_{D-1}) each span one dimension per
    axis; the flat key is sum_a index_a[q_a, t_a] * stride_a (row-major)."""
    ndim = len(spatial)
    strides = [1] * ndim
    for a in range(ndim - 2, -1, -1):
        strides[a] = strides[a + 1] * spatial[a + 1]
    flat, valid, offsets = 0, True, []
    for a, (index, ok, off) in enumerate(axes):
        shape = [1] * (2 * ndim)
        shape[a], shape[ndim + a] = index.shape
        flat = flat + index.reshape(shape) * strides[a]
        valid = valid & ok.reshape(shape)
        offsets.append(off.reshape(shape))
    n = 1
    for x in spatial:
        n *= x
    full = [*spatial, *[idx.shape[1] for idx, _, _ in axes]]
    return (flat.expand(full).reshape(n, -1), valid.expand(full).reshape(n, -1),
            [o.expand(full).reshape(n, -1) for o in offsets])


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                             key_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """LLM-style causal sliding window: each token attends to itself and the ``window - 1`` before it."""
    return neighborhood_attention(q, k, v, window, 1, True, key_mask=key_mask, scale=scale)


def dense_mask(spatial: Sequence[int], kernel_size, dilation=1, is_causal=False,
               length: int | None = None) -> torch.Tensor:
    """The (N, N) boolean mask of the same windows, written pair by pair from the rules.

    O(N^2): for tests and small inputs only. It does not share code with the gather path.
    ``length`` (1-D): the row's real length; windows are built on it and padded positions
    neither see nor are seen.
    """
    ndim = len(spatial)
    kernels = per_axis(kernel_size, ndim, "kernel_size")
    dilations = per_axis(dilation, ndim, "dilation")
    causals = per_axis(is_causal, ndim, "is_causal")

    def axis_allowed(i: int, n: int, length: int, kk: int, dd: int, causal: bool) -> bool:
        if i % dd != n % dd:
            return False
        j, m = i // dd, n // dd
        if i >= length or n >= length:
            return False
        group_len = len(range(i % dd, length, dd))
        if causal:
            return j - kk + 1 <= m <= j
        width = min(kk, group_len)                     # a group shorter than k: all of it
        start = min(max(j - kk // 2, 0), group_len - width)
        return start <= m < start + width

    if length is None:
        for axis, (n_axis, kk, dd) in enumerate(zip(spatial, kernels, dilations)):
            check_window(n_axis, kk, dd, axis)
    positions = list(itertools.product(*[range(n) for n in spatial]))
    mask = torch.zeros(len(positions), len(positions), dtype=torch.bool)
    for a, qi in enumerate(positions):
        for c, ki in enumerate(positions):
            mask[a, c] = all(axis_allowed(x, y, n if length is None else length, kk, dd, cc)
                             for x, y, n, kk, dd, cc in zip(qi, ki, spatial, kernels, dilations, causals))
    return mask
