"""Linear (kernelized) attention: the single source of truth for deploykit's op.

``out_i = sum_j w_ij phi(q_i).phi(k_j) v_j / (sum_j w_ij phi(q_i).phi(k_j) + eps)``

* ``phi``: ``elu+1`` (Katharopoulos et al. 2020), ``relu``, or ``sigmoid`` (Flowformer's
  base kernel);
* non-causal: ``w_ij = 1`` for every key, computed as ``phi(Q) (phi(K)^T V)``: O(N d^2);
* causal: ``w_ij = 1`` for ``j <= i``, else 0; with a per-head ``decay`` lambda in (0, 1]
  (Lightning Attention-2), ``w_ij = lambda^(i - j)`` for ``j <= i``;
* ``normalize=False`` drops the denominator (Lightning Attention's form, which normalises
  the output elsewhere);
* ``key_mask`` (B, N), True = a real token: padded keys get ``phi(k) = 0`` and contribute
  to neither sum.

Layout: ``q, k`` (B, H, N, D), ``v`` (B, H, N, Dv). :func:`linear_attention` is the chunked
form (intra-chunk masked matmul + inter-chunk state, as the kernels compute it);
:func:`linear_attention_naive` is the O(N^2) loop-free definition used to test it.
"""

from __future__ import annotations

import torch

from deploykit.errors import UserError

FEATURE_MAPS = ("elu1", "relu", "sigmoid")
EPS = 1e-6


def feature_map(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "elu1":
        return torch.nn.functional.elu(x) + 1.0
    if name == "relu":
        return torch.relu(x)
    if name == "sigmoid":
        return torch.sigmoid(x)
    raise UserError(f"linear attention: unknown feature map '{name}'", fix=f"use one of {', '.join(FEATURE_MAPS)}")


def _prepare(q, k, v, feature, key_mask, decay, causal):
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise UserError(f"linear attention needs q, k (B, H, N, D) and v (B, H, N, Dv); got {tuple(q.shape)}, "
                        f"{tuple(k.shape)}, {tuple(v.shape)}", fix="check the tensor layouts")
    if decay is not None:
        if not causal:
            raise UserError("linear attention: decay needs causal=True (lambda^(i-j) is defined for j <= i)",
                            fix="set causal: true or drop decay")
        decay = torch.as_tensor(decay, dtype=q.dtype, device=q.device).reshape(-1)
        if decay.numel() not in (1, q.shape[1]) or bool(((decay <= 0) | (decay > 1)).any()):
            raise UserError("linear attention: decay needs one value in (0, 1] per head (or one for all)",
                            fix="e.g. decay: [0.99, 0.95, ...]")
        decay = decay.expand(q.shape[1])
    fq, fk = feature_map(q, feature), feature_map(k, feature)
    if key_mask is not None:
        fk = fk * key_mask[:, None, :, None].to(fk.dtype)
    return fq, fk, decay


def linear_attention_naive(q, k, v, *, feature: str = "elu1", causal: bool = False, decay=None,
                           normalize: bool = True, key_mask: torch.Tensor | None = None, eps: float = EPS):
    """The definition, with the full (N, N) weight matrix: for tests and small inputs."""
    fq, fk, decay = _prepare(q, k, v, feature, key_mask, decay, causal)
    n = q.shape[2]
    scores = fq @ fk.transpose(-1, -2)                                   # (B, H, N, N)
    if causal:
        i = torch.arange(n, device=q.device)
        dist = (i[:, None] - i[None, :]).to(q.dtype)
        weight = (dist >= 0).to(q.dtype)
        if decay is not None:
            weight = weight * decay[:, None, None] ** dist.clamp(min=0)
        scores = scores * weight
    out = scores @ v
    if normalize:
        out = out / (scores.sum(-1, keepdim=True) + eps)
    return out


def linear_attention(q, k, v, *, feature: str = "elu1", causal: bool = False, decay=None, normalize: bool = True,
                     key_mask: torch.Tensor | None = None, chunk_size: int = 64, eps: float = EPS):
    """Linear attention in O(N d^2) memory-light form (chunked when causal)."""
    fq, fk, decay = _prepare(q, k, v, feature, key_mask, decay, causal)
    if not causal:
        kv = fk.transpose(-1, -2) @ v                                   # (B, H, D, Dv)
        out = fq @ kv
        if normalize:
            out = out / (fq @ fk.sum(2, keepdim=True).transpose(-1, -2) + eps)
        return out
    b, h, n, d = fq.shape
    dv = v.shape[-1]
    lam = torch.ones(h, dtype=q.dtype, device=q.device) if decay is None else decay
    state = torch.zeros(b, h, d, dv, dtype=q.dtype, device=q.device)   # sum_j lam^(end - j) phi(k_j) v_j^T
    zstate = torch.zeros(b, h, d, dtype=q.dtype, device=q.device)      # sum_j lam^(end - j) phi(k_j)
    outs = []
    for s in range(0, n, chunk_size):
        qc, kc, vc = fq[:, :, s:s + chunk_size], fk[:, :, s:s + chunk_size], v[:, :, s:s + chunk_size]
        c = qc.shape[2]
        pos = torch.arange(c, device=q.device, dtype=q.dtype)
        dist = pos[:, None] - pos[None, :]
        intra = (dist >= 0).to(q.dtype) * lam[:, None, None] ** dist.clamp(min=0)        # (H, c, c)
        q_decay = lam[:, None] ** (pos[None, :] + 1)                                     # lam^(t+1), (H, c)
        scores = (qc @ kc.transpose(-1, -2)) * intra
        out = scores @ vc + (qc * q_decay[None, :, :, None]) @ state
        if normalize:
            den = scores.sum(-1) + ((qc * q_decay[None, :, :, None]) * zstate[:, :, None, :]).sum(-1)
            out = out / (den[..., None] + eps)
        outs.append(out)
        k_decay = lam[:, None] ** (c - 1 - pos[None, :])                                 # lam^(c-1-t)
        chunk_decay = lam ** c
        state = state * chunk_decay[None, :, None, None] + (kc * k_decay[None, :, :, None]).transpose(-1, -2) @ vc
        zstate = zstate * chunk_decay[None, :, None] + (kc * k_decay[None, :, :, None]).sum(2)
    return torch.cat(outs, dim=2)
