"""Fused neighborhood attention in Triton: 1-D and 2-D, dilation, per-axis causal, key mask.

Semantics are reference.py's (NATTEN's windows, the 1-D right-padding rule, the 2-D key
mask); the kernels never materialise scores in global memory.

Algorithm
---------
FlashAttention-style forward. A program owns a tile of queries of one ``(batch, head)`` and
one dilation group, keeps a running max ``m``, a running sum ``l`` and an fp32 accumulator,
and loops over the key/value tiles its queries' windows touch:

* **1-D**: the tile is ``BLOCK_M`` consecutive group positions ``j`` of group ``g``
  (sequence positions ``g + j * d``). Windows are monotone in ``j``, so the keys the tile
  needs are the group positions ``[start(j_first), end(j_last))`` -- at most
  ``BLOCK_M + k - 1`` keys, walked in ``BLOCK_N`` chunks.
* **2-D**: the tile is a ``BLOCK_X x BLOCK_Y`` rectangle of group positions of group
  ``(gx, gy)``; the keys it needs form a rectangle of at most
  ``(BLOCK_X + kx - 1) x (BLOCK_Y + ky - 1)`` group positions, walked in ``BLOCK_N`` chunks
  of its row-major flattening.

Inside a chunk every (query, key) pair outside the query's window (or a masked key) gets
``-inf`` before the online softmax. Scores and probabilities are fp32 (``exp2`` with the
softmax scale folded with ``log2 e``); ``P @ V`` runs in the input precision (fp16 / bf16,
exact fp32 for fp32 inputs) and accumulates in fp32. A query that sees no key outputs 0;
in 1-D padded queries (position >= the row's real length) output 0.

Launch contract (what a TensorRT plugin passes to the PTX entry)
----------------------------------------------------------------
Positional arguments, in this order (all tensors contiguous, row-major):

=========================  ====================================================================
``na1d_fwd_kernel``        ``Q, K, V, KEY_MASK, B, H, L, OUT``
``na1d_int8_fwd_kernel``   ``Q, K, V, KEY_MASK, Q_SCALE, K_SCALE, V_SCALE, Y_SCALE, B, H, L, OUT``
``na2d_fwd_kernel``        ``Q, K, V, KEY_MASK, B, H, X, Y, OUT``
``na2d_int8_fwd_kernel``   ``Q, K, V, KEY_MASK, Q_SCALE, K_SCALE, V_SCALE, Y_SCALE, B, H, X, Y, OUT``
=========================  ====================================================================

* ``Q``, ``K``: ``(B, H, L, HEAD_DIM)`` / ``(B, H, X, Y, HEAD_DIM)``; ``V``, ``OUT``:
  ``(..., HEAD_DIM_V)``; fp16, bf16 or fp32 (one dtype for all four), int8 in the INT8
  kernels. ``KEY_MASK``: ``(B, L)`` / ``(B, X, Y)`` bytes, nonzero = real token (a bool
  tensor's storage; typed ``*i8``). Base pointers are 16-byte aligned (compiled with that
  divisibility hint; TensorRT's allocations are 256-byte aligned).
* ``Q_SCALE, K_SCALE, V_SCALE, Y_SCALE`` (INT8 kernels only): pointers to one fp32 each,
  the per-tensor scales of the surrounding QuantizeLinear / DequantizeLinear (zero point 0).
  The INT8 forms are separate entry points; the float kernels have no scale arguments.
* ``B, H, L`` / ``B, H, X, Y``: int32, taken from the input shapes only.
* Constexprs (fixed at engine-build time, not passed at launch):
  1-D ``SCALE, KERNEL, DILATION, CAUSAL, HAS_MASK, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N``;
  2-D ``SCALE, KERNEL_X, KERNEL_Y, DILATION_X, DILATION_Y, CAUSAL_X, CAUSAL_Y, HAS_MASK,
  HEAD_DIM, HEAD_DIM_V, BLOCK_X, BLOCK_Y, BLOCK_N``. With ``HAS_MASK`` false ``KEY_MASK``
  is never read (any pointer will do).
* The PTX entry produced by Triton 3.x carries two more trailing ``.u64`` parameters after
  these (global and profile scratch); both kernels need no scratch
  (``metadata.global_scratch_size == 0``), so a launcher passes null pointers for them.
* Grid, from shapes only (``cdiv(a, b) = (a + b - 1) // b``)::

      1-D: (cdiv(cdiv(L, DILATION), BLOCK_M) * DILATION, H, B)
      2-D: (cdiv(cdiv(X, DILATION_X), BLOCK_X) * cdiv(cdiv(Y, DILATION_Y), BLOCK_Y)
            * DILATION_X * DILATION_Y, H, B)

  (:func:`launch_grid`, :func:`grid_1d`, :func:`grid_2d`; written with ``+ - * //`` only, so
  they also evaluate on symbolic shape expressions). Block ``(num_warps * 32, 1, 1)``,
  dynamic shared memory ``metadata.shared`` bytes; above 48 KiB the launcher sets the
  function's max-dynamic-shared-memory attribute first (as Triton's own launcher does), and
  a tactic is only usable where ``metadata.shared <= max_shared_bytes(cc)``.

Python API: :func:`neighborhood_attention_triton` / :func:`neighborhood_attention_int8_triton`
(CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), :func:`kernel_signature` /
``SIGNATURES`` and :func:`kernel_constexprs` (what AOT compilation needs),
:func:`compile_kernel` (PTX for a compute capability, no GPU needed), :func:`launch_grid`,
``TACTICS`` / :func:`default_tactic` (the plugin's autotune choices).

INT8 I/O: ``q, k`` enter ``tl.dot`` as int8 (exact int32 scores, times
``q_scale * k_scale * SCALE``), ``v`` is converted exactly to fp16 for ``P @ V``, and the
output is ``clamp(round_half_even(y * v_scale / y_scale), -128, 127)`` -- the float op
between DequantizeLinear and QuantizeLinear, as deploykit's ``NeighborhoodAttention*Int8``.

Cost
----
* Compute per query tile: ``ceil((BLOCK_M + k - 1) / BLOCK_N)`` chunks in 1-D and
  ``ceil((BLOCK_X + kx - 1)(BLOCK_Y + ky - 1) / BLOCK_N)`` in 2-D, each two
  ``BLOCK_M x BLOCK_N`` MMAs; the useful fraction is ``k / (BLOCK_M + k - 1)`` (1-D) and
  ``kx ky / ((BLOCK_X + kx - 1)(BLOCK_Y + ky - 1))`` (2-D) of the issued MMA work.
* Memory: q, k, v read about once per tile plus the window halo; out written once; no
  score tensor. The 2-D key mask costs one byte gather per key per chunk.
* 1-D with ``HAS_MASK``: every program first counts its row's real length with a blocked
  reduction over ``KEY_MASK[b, :]`` (1024 bytes per step, ``ceil(L / 1024)`` steps), i.e.
  ``L`` extra bytes per program and ``H * L * ceil(L / d / BLOCK_M) * d`` bytes per row in
  all -- L2-resident and small beside the attention work for the lengths 1-D NA is used at
  (at ``L = 16k``, ``H = 16``, ``BLOCK_M = 64``: 64 MB of L2 reads per row). The count
  assumes right padding (reference.py rejects other masks), so keys are then tested against
  the length and the mask bytes are not read again.
* Limits: offsets inside one ``(batch, head)`` slice are int32 (``L * HEAD_DIM`` and
  ``X * Y * HEAD_DIM`` below 2**31); the slice bases are int64.
"""

from __future__ import annotations

import math
import types
from collections import namedtuple

from deploykit.errors import UserError
from deploykit.plugins.neighborhood_attention.reference import check_window, per_axis

try:
    import triton
    import triton.language as tl

    _jit = triton.jit
    _TRITON_ERROR = None
except ImportError as _exc:                          # the module stays importable without Triton
    triton = None
    tl = types.SimpleNamespace(constexpr=None)
    _TRITON_ERROR = _exc

    def _jit(fn):
        return fn

__all__ = [
    "neighborhood_attention_triton", "neighborhood_attention_int8_triton", "kernel_signature", "SIGNATURES",
    "compile_kernel", "launch_grid", "grid_1d", "grid_2d", "TACTICS", "Tactic", "default_tactic", "tile_2d",
    "kernel_constexprs", "KERNEL_NAMES", "max_shared_bytes",
]

_HEAD_DIMS = (32, 64, 128)

# A plugin autotune's choices. block_m is the query tile (1-D: positions of one dilation
# group; 2-D: BLOCK_X * BLOCK_Y queries, see tile_2d), block_n the key chunk.
Tactic = namedtuple("Tactic", "block_m block_n num_warps num_stages")
TACTICS = [
    Tactic(64, 64, 4, 2),       # the default up to head dim 64
    Tactic(64, 32, 4, 2),       # the default at head dim 128; less halo waste for small kernels
    Tactic(128, 64, 8, 2),      # long rows / large windows: more reuse of each key chunk
    Tactic(128, 32, 4, 2),
    Tactic(32, 32, 4, 2),       # more programs for small B * H * L
    Tactic(16, 16, 1, 1),       # tiny problems
]

KERNEL_NAMES = {(1, False): "na1d_fwd_kernel", (1, True): "na1d_int8_fwd_kernel",
                (2, False): "na2d_fwd_kernel", (2, True): "na2d_int8_fwd_kernel"}

_CONSTEXPRS = {
    1: ("SCALE", "KERNEL", "DILATION", "CAUSAL", "HAS_MASK", "HEAD_DIM", "HEAD_DIM_V", "BLOCK_M", "BLOCK_N"),
    2: ("SCALE", "KERNEL_X", "KERNEL_Y", "DILATION_X", "DILATION_Y", "CAUSAL_X", "CAUSAL_Y", "HAS_MASK",
        "HEAD_DIM", "HEAD_DIM_V", "BLOCK_X", "BLOCK_Y", "BLOCK_N"),
}


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------

@_jit
def _axis_window(offs, first, n, BLOCK: tl.constexpr, KERNEL: tl.constexpr, CAUSAL: tl.constexpr):
    """One axis, group positions ``offs = first + arange(BLOCK)`` of a group of ``n`` real
    positions: each query's key window ``[lo, hi)`` and the tile's ``[tile_lo, tile_hi)``
    (empty when the tile holds no real query). reference.window_indices' rules."""
    last = tl.minimum(first + BLOCK, n) - 1
    if CAUSAL:
        lo = tl.maximum(offs - (KERNEL - 1), 0)
        hi = offs + 1
        tile_lo = tl.maximum(first - (KERNEL - 1), 0)
        tile_hi = last + 1
    else:
        width = tl.minimum(n, KERNEL)                      # a group shorter than k: all of it
        lo = tl.minimum(tl.maximum(offs - KERNEL // 2, 0), n - width)
        hi = lo + width
        tile_lo = tl.minimum(tl.maximum(first - KERNEL // 2, 0), n - width)
        tile_hi = tl.minimum(tl.maximum(last - KERNEL // 2, 0), n - width) + width
    tile_hi = tl.where(first <= last, tile_hi, tile_lo)
    return lo, hi, tile_lo, tile_hi


@_jit
def _scores(q, kt, qk_scale, INT8_IO: tl.constexpr, IEEE: tl.constexpr):
    if INT8_IO:
        s = tl.dot(q, kt, out_dtype=tl.int32).to(tl.float32)
    elif IEEE:
        s = tl.dot(q, kt, input_precision="ieee")
    else:
        s = tl.dot(q, kt)
    return s * qk_scale


@_jit
def _online_update(s, allowed, v, m_i, l_i, acc, INT8_IO: tl.constexpr, IEEE: tl.constexpr):
    """One chunk of the online softmax: masked scores ``s`` (fp32, log2 domain) and values ``v``."""
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)     # rows with no key so far stay 0
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    if INT8_IO:
        acc = tl.dot(p.to(tl.float16), v.to(tl.float16), acc)      # int8 -> fp16 is exact
    elif IEEE:
        acc = tl.dot(p, v, acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return m_new, l_i, acc


@_jit
def _finish(acc, l_i, ok, V_SCALE, Y_SCALE, out_ty: tl.constexpr, INT8_IO: tl.constexpr):
    """Normalise; queries that are padded (``ok`` false) or saw no key output 0."""
    ok = ok & (l_i > 0)
    y = acc / tl.where(ok, l_i, 1.0)[:, None]
    y = tl.where(ok[:, None], y, 0.0)
    if INT8_IO:
        y = y * tl.load(V_SCALE)
        y = tl.math.div_rn(y, tl.zeros_like(y) + tl.load(Y_SCALE))
        y = tl.minimum(tl.maximum(y, -128.0), 127.0)
        y = (y + 12582912.0) - 12582912.0                  # round half to even (1.5 * 2**23)
        return y.to(tl.int8)
    else:
        return y.to(out_ty)


@_jit
def _na1d_program(Q, K, V, KEY_MASK, Q_SCALE, K_SCALE, V_SCALE, Y_SCALE, H, L, OUT,
                  SCALE: tl.constexpr, KERNEL: tl.constexpr, DILATION: tl.constexpr, CAUSAL: tl.constexpr,
                  HAS_MASK: tl.constexpr, INT8_IO: tl.constexpr, HEAD_DIM: tl.constexpr,
                  HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    IEEE: tl.constexpr = Q.dtype.element_ty == tl.float32
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    group = pid % DILATION
    first = (pid // DILATION) * BLOCK_M
    row = b.to(tl.int64) * H + h
    q_base = Q + row * L * HEAD_DIM
    k_base = K + row * L * HEAD_DIM
    v_base = V + row * L * HEAD_DIM_V
    o_base = OUT + row * L * HEAD_DIM_V

    if HAS_MASK:
        # the row's real length: a blocked count of KEY_MASK[b, :] (right padding)
        chunk = tl.arange(0, 1024)
        count = tl.zeros([1024], dtype=tl.int32)
        mask_base = KEY_MASK + b.to(tl.int64) * L
        for s0 in range(0, L, 1024):
            byte = tl.load(mask_base + s0 + chunk, mask=s0 + chunk < L, other=0)
            count += (byte != 0).to(tl.int32)
        n_real = tl.sum(count, axis=0)
    else:
        n_real = L
    n_group = (n_real - group + DILATION - 1) // DILATION      # real positions of the group
    n_rows = (L - group + DILATION - 1) // DILATION            # positions of the group in the tensor

    offs_m = first + tl.arange(0, BLOCK_M)
    lo_m, hi_m, lo, hi = _axis_window(offs_m, first, n_group, BLOCK_M, KERNEL, CAUSAL)
    d_offs = tl.arange(0, HEAD_DIM)
    dv_offs = tl.arange(0, HEAD_DIM_V)
    q_rows = group + offs_m * DILATION
    in_tensor = offs_m < n_rows
    q = tl.load(q_base + q_rows[:, None] * HEAD_DIM + d_offs[None, :], mask=in_tensor[:, None], other=0)
    if INT8_IO:
        qk_scale = tl.load(Q_SCALE) * tl.load(K_SCALE) * (SCALE * 1.4426950408889634)
    else:
        qk_scale = SCALE * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_V], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        k_rows = group + offs_n * DILATION
        kt = tl.load(k_base + k_rows[None, :] * HEAD_DIM + d_offs[:, None], mask=n_ok[None, :], other=0)
        s = _scores(q, kt, qk_scale, INT8_IO, IEEE)
        allowed = (offs_n[None, :] >= lo_m[:, None]) & (offs_n[None, :] < hi_m[:, None]) & n_ok[None, :]
        v = tl.load(v_base + k_rows[:, None] * HEAD_DIM_V + dv_offs[None, :], mask=n_ok[:, None], other=0)
        m_i, l_i, acc = _online_update(s, allowed, v, m_i, l_i, acc, INT8_IO, IEEE)

    y = _finish(acc, l_i, offs_m < n_group, V_SCALE, Y_SCALE, OUT.dtype.element_ty, INT8_IO)
    tl.store(o_base + q_rows[:, None] * HEAD_DIM_V + dv_offs[None, :], y, mask=in_tensor[:, None])


@_jit
def _na2d_program(Q, K, V, KEY_MASK, Q_SCALE, K_SCALE, V_SCALE, Y_SCALE, H, X, Y, OUT,
                  SCALE: tl.constexpr, KERNEL_X: tl.constexpr, KERNEL_Y: tl.constexpr,
                  DILATION_X: tl.constexpr, DILATION_Y: tl.constexpr, CAUSAL_X: tl.constexpr,
                  CAUSAL_Y: tl.constexpr, HAS_MASK: tl.constexpr, INT8_IO: tl.constexpr,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_X: tl.constexpr,
                  BLOCK_Y: tl.constexpr, BLOCK_N: tl.constexpr):
    IEEE: tl.constexpr = Q.dtype.element_ty == tl.float32
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    tiles_x = ((X + DILATION_X - 1) // DILATION_X + BLOCK_X - 1) // BLOCK_X
    tiles_y = ((Y + DILATION_Y - 1) // DILATION_Y + BLOCK_Y - 1) // BLOCK_Y
    tile_y = pid % tiles_y
    rest = pid // tiles_y
    tile_x = rest % tiles_x
    rest = rest // tiles_x
    gy = rest % DILATION_Y
    gx = rest // DILATION_Y
    nx = (X - gx + DILATION_X - 1) // DILATION_X              # group (gx, gy) is nx x ny
    ny = (Y - gy + DILATION_Y - 1) // DILATION_Y
    row = b.to(tl.int64) * H + h
    q_base = Q + row * X * Y * HEAD_DIM
    k_base = K + row * X * Y * HEAD_DIM
    v_base = V + row * X * Y * HEAD_DIM_V
    o_base = OUT + row * X * Y * HEAD_DIM_V
    mask_base = KEY_MASK + b.to(tl.int64) * X * Y

    offs = tl.arange(0, BLOCK_X * BLOCK_Y)
    first_x = tile_x * BLOCK_X
    first_y = tile_y * BLOCK_Y
    jx = first_x + offs // BLOCK_Y
    jy = first_y + offs % BLOCK_Y
    lo_x, hi_x, tlo_x, thi_x = _axis_window(jx, first_x, nx, BLOCK_X, KERNEL_X, CAUSAL_X)
    lo_y, hi_y, tlo_y, thi_y = _axis_window(jy, first_y, ny, BLOCK_Y, KERNEL_Y, CAUSAL_Y)
    in_tensor = (jx < nx) & (jy < ny)
    q_pos = (gx + jx * DILATION_X) * Y + (gy + jy * DILATION_Y)
    d_offs = tl.arange(0, HEAD_DIM)
    dv_offs = tl.arange(0, HEAD_DIM_V)
    q = tl.load(q_base + q_pos[:, None] * HEAD_DIM + d_offs[None, :], mask=in_tensor[:, None], other=0)
    if INT8_IO:
        qk_scale = tl.load(Q_SCALE) * tl.load(K_SCALE) * (SCALE * 1.4426950408889634)
    else:
        qk_scale = SCALE * 1.4426950408889634

    span_y = thi_y - tlo_y
    total = (thi_x - tlo_x) * span_y                          # the key rectangle, row-major
    span_y = tl.maximum(span_y, 1)
    m_i = tl.full([BLOCK_X * BLOCK_Y], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_X * BLOCK_Y], tl.float32)
    acc = tl.zeros([BLOCK_X * BLOCK_Y, HEAD_DIM_V], tl.float32)
    for start in range(0, total, BLOCK_N):
        t = start + tl.arange(0, BLOCK_N)
        n_ok = t < total
        mx = tlo_x + t // span_y
        my = tlo_y + t % span_y
        k_pos = (gx + mx * DILATION_X) * Y + (gy + my * DILATION_Y)
        kt = tl.load(k_base + k_pos[None, :] * HEAD_DIM + d_offs[:, None], mask=n_ok[None, :], other=0)
        s = _scores(q, kt, qk_scale, INT8_IO, IEEE)
        allowed = ((mx[None, :] >= lo_x[:, None]) & (mx[None, :] < hi_x[:, None])
                   & (my[None, :] >= lo_y[:, None]) & (my[None, :] < hi_y[:, None]) & n_ok[None, :])
        if HAS_MASK:
            real = tl.load(mask_base + k_pos, mask=n_ok, other=0)
            allowed = allowed & (real != 0)[None, :]
        v = tl.load(v_base + k_pos[:, None] * HEAD_DIM_V + dv_offs[None, :], mask=n_ok[:, None], other=0)
        m_i, l_i, acc = _online_update(s, allowed, v, m_i, l_i, acc, INT8_IO, IEEE)

    # 2-D: the key mask removes keys only; a query left without keys outputs 0
    y = _finish(acc, l_i, in_tensor, V_SCALE, Y_SCALE, OUT.dtype.element_ty, INT8_IO)
    tl.store(o_base + q_pos[:, None] * HEAD_DIM_V + dv_offs[None, :], y, mask=in_tensor[:, None])


@_jit
def na1d_fwd_kernel(Q, K, V, KEY_MASK, B, H, L, OUT,
                    SCALE: tl.constexpr, KERNEL: tl.constexpr, DILATION: tl.constexpr, CAUSAL: tl.constexpr,
                    HAS_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    _na1d_program(Q, K, V, KEY_MASK, Q, Q, Q, Q, H, L, OUT, SCALE, KERNEL, DILATION, CAUSAL, HAS_MASK, False,
                  HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N)


@_jit
def na1d_int8_fwd_kernel(Q, K, V, KEY_MASK, Q_SCALE, K_SCALE, V_SCALE, Y_SCALE, B, H, L, OUT,
                         SCALE: tl.constexpr, KERNEL: tl.constexpr, DILATION: tl.constexpr,
                         CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HEAD_DIM: tl.constexpr,
                         HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    _na1d_program(Q, K, V, KEY_MASK, Q_SCALE, K_SCALE, V_SCALE, Y_SCALE, H, L, OUT, SCALE, KERNEL, DILATION,
                  CAUSAL, HAS_MASK, True, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N)


@_jit
def na2d_fwd_kernel(Q, K, V, KEY_MASK, B, H, X, Y, OUT,
                    SCALE: tl.constexpr, KERNEL_X: tl.constexpr, KERNEL_Y: tl.constexpr,
                    DILATION_X: tl.constexpr, DILATION_Y: tl.constexpr, CAUSAL_X: tl.constexpr,
                    CAUSAL_Y: tl.constexpr, HAS_MASK: tl.constexpr, HEAD_DIM: tl.constexpr,
                    HEAD_DIM_V: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    _na2d_program(Q, K, V, KEY_MASK, Q, Q, Q, Q, H, X, Y, OUT, SCALE, KERNEL_X, KERNEL_Y, DILATION_X, DILATION_Y,
                  CAUSAL_X, CAUSAL_Y, HAS_MASK, False, HEAD_DIM, HEAD_DIM_V, BLOCK_X, BLOCK_Y, BLOCK_N)


@_jit
def na2d_int8_fwd_kernel(Q, K, V, KEY_MASK, Q_SCALE, K_SCALE, V_SCALE, Y_SCALE, B, H, X, Y, OUT,
                         SCALE: tl.constexpr, KERNEL_X: tl.constexpr, KERNEL_Y: tl.constexpr,
                         DILATION_X: tl.constexpr, DILATION_Y: tl.constexpr, CAUSAL_X: tl.constexpr,
                         CAUSAL_Y: tl.constexpr, HAS_MASK: tl.constexpr, HEAD_DIM: tl.constexpr,
                         HEAD_DIM_V: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    _na2d_program(Q, K, V, KEY_MASK, Q_SCALE, K_SCALE, V_SCALE, Y_SCALE, H, X, Y, OUT, SCALE, KERNEL_X, KERNEL_Y,
                  DILATION_X, DILATION_Y, CAUSAL_X, CAUSAL_Y, HAS_MASK, True, HEAD_DIM, HEAD_DIM_V,
                  BLOCK_X, BLOCK_Y, BLOCK_N)


_KERNELS = {(1, False): na1d_fwd_kernel, (1, True): na1d_int8_fwd_kernel,
            (2, False): na2d_fwd_kernel, (2, True): na2d_int8_fwd_kernel}


# --------------------------------------------------------------------------------------------
# grid, tactics, signatures, AOT compilation
# --------------------------------------------------------------------------------------------

def _cdiv(a, b: int):
    """``ceil(a / b)`` for a non-negative ``a`` (an int or a symbolic expression) and an int ``b``."""
    return (a + (b - 1)) // b


def tile_2d(block_m) -> tuple[int, int]:
    """The 2-D query tile ``(BLOCK_X, BLOCK_Y)`` for ``block_m`` queries: as square as powers
    of two allow, the longer side along the contiguous Y axis. A pair passes through."""
    if isinstance(block_m, (tuple, list)):
        bx, by = (int(x) for x in block_m)
    else:
        block_m = int(block_m)
        by = 1 << math.ceil(math.log2(block_m) / 2)
        bx = block_m // by
    if not (_pow2(bx) and _pow2(by) and bx * by >= 16):
        raise UserError(f"neighborhood attention (Triton): 2-D query tile {bx} x {by} must be powers of two with "
                        "at least 16 queries", fix="use block_m in 16, 32, 64, 128")
    return bx, by


def grid_1d(B, H, L, block_m: int, dilation: int = 1):
    """``(cdiv(cdiv(L, d), BLOCK_M) * d, H, B)``: one program per query tile of one dilation group."""
    return (_cdiv(_cdiv(L, dilation), block_m) * dilation, H, B)


def grid_2d(B, H, X, Y, block_x: int, block_y: int, dilation_x: int = 1, dilation_y: int = 1):
    """``(tiles_x * tiles_y * d_x * d_y, H, B)`` with ``tiles_a = cdiv(cdiv(A, d_a), BLOCK_A)``."""
    tiles_x = _cdiv(_cdiv(X, dilation_x), block_x)
    tiles_y = _cdiv(_cdiv(Y, dilation_y), block_y)
    return (tiles_x * tiles_y * (dilation_x * dilation_y), H, B)


def launch_grid(ndim: int, *shape, block_m, dilation=1):
    """The launch grid from the shapes only: ``launch_grid(1, B, H, L, block_m=, dilation=)``
    or ``launch_grid(2, B, H, X, Y, block_m=(bx, by) | n, dilation=d | (dx, dy))``.

    Uses ``+ - * //`` only, so ``shape`` entries may be symbolic expressions."""
    if len(shape) != ndim + 2:
        raise ValueError(f"launch_grid({ndim}, ...) takes {ndim + 2} shape entries, got {len(shape)}")
    if ndim == 1:
        return grid_1d(*shape, int(block_m), int(per_axis(dilation, 1, "dilation")[0]))
    if ndim == 2:
        bx, by = tile_2d(block_m)
        dx, dy = (int(d) for d in per_axis(dilation, 2, "dilation"))
        return grid_2d(*shape, bx, by, dx, dy)
    raise ValueError(f"neighborhood attention (Triton) supports 1-D and 2-D, not {ndim}-D")


# Largest dynamic shared memory per block (bytes) by compute capability, with the opt-in
# attribute; without it a launch may use 48 KiB.
_SHARED_LIMITS = {75: 65536, 80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448,
                  120: 101376}


def max_shared_bytes(cc: int) -> int:
    """The most dynamic shared memory one block may use on ``sm_<cc>`` (to drop tactics whose
    ``compile_kernel(...).metadata.shared`` exceeds it)."""
    cc = int(cc)
    known = [c for c in _SHARED_LIMITS if c <= cc]
    return _SHARED_LIMITS[cc] if cc in _SHARED_LIMITS else _SHARED_LIMITS[max(known)] if known else 49152


def default_tactic(head_dim: int, head_dim_v: int | None = None) -> Tactic:
    """The default ``Tactic(block_m, block_n, num_warps, num_stages)`` for the head dims."""
    widest = max(head_dim, head_dim_v or head_dim)
    return TACTICS[0] if widest <= 64 else TACTICS[1]


_PTR = {"fp16": "*fp16", "float16": "*fp16", "half": "*fp16", "bf16": "*bf16", "bfloat16": "*bf16",
        "fp32": "*fp32", "float32": "*fp32", "float": "*fp32", "int8": "*i8", "i8": "*i8"}


def _dtype_key(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    if name not in _PTR:
        raise UserError(f"neighborhood attention (Triton): unsupported dtype {dtype!r}",
                        fix="use fp16, bf16, fp32 (or int8 for the INT8 kernels)")
    return _PTR[name][1:]


def kernel_signature(ndim: int, dtype: str, int8: bool = False) -> dict[str, str]:
    """The Triton signature ``{arg name: type}`` of a kernel, in argument order, constexprs
    included (``"constexpr"``). ``dtype`` is the I/O type of q, k, v and out ("fp16", "bf16",
    "fp32"); ``int8=True`` (or dtype "int8") selects the INT8 kernel."""
    if ndim not in (1, 2):
        raise ValueError(f"neighborhood attention (Triton) supports 1-D and 2-D, not {ndim}-D")
    ptr = "*" + _dtype_key(dtype)
    int8 = bool(int8) or ptr == "*i8"
    if int8:
        ptr = "*i8"
    sig = {"Q": ptr, "K": ptr, "V": ptr, "KEY_MASK": "*i8"}
    if int8:
        sig.update(Q_SCALE="*fp32", K_SCALE="*fp32", V_SCALE="*fp32", Y_SCALE="*fp32")
    sig.update({name: "i32" for name in (("B", "H", "L") if ndim == 1 else ("B", "H", "X", "Y"))})
    sig["OUT"] = ptr
    sig.update({name: "constexpr" for name in _CONSTEXPRS[ndim]})
    return sig


SIGNATURES = {(ndim, dtype): kernel_signature(ndim, dtype)
              for ndim in (1, 2) for dtype in ("fp16", "bf16", "fp32", "int8")}


def kernel_constexprs(ndim: int, *, kernel_size, dilation=1, is_causal=False, scale, head_dim: int,
                      head_dim_v: int | None = None, has_mask: bool, block_m, block_n: int) -> dict:
    """The constexpr values, keyed by argument name, for a kernel of ``ndim`` axes."""
    kernels = [int(x) for x in per_axis(kernel_size, ndim, "kernel_size")]
    dilations = [int(x) for x in per_axis(dilation, ndim, "dilation")]
    causals = [bool(x) for x in per_axis(is_causal, ndim, "is_causal")]
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    for axis, (kk, dd) in enumerate(zip(kernels, dilations)):
        check_window(kk * dd, kk, dd, axis)                     # k >= 1, d >= 1
    for name, value in (("head_dim", head_dim), ("head_dim_v", head_dim_v)):
        if value not in _HEAD_DIMS:
            raise UserError(f"neighborhood attention (Triton): {name} {value} is not supported",
                            fix=f"use a head dim in {_HEAD_DIMS}")
    if not (_pow2(block_n) and block_n >= 16):
        raise UserError(f"neighborhood attention (Triton): block_n {block_n} must be a power of two >= 16",
                        fix="use block_n in 16, 32, 64, 128")
    common = {"SCALE": float(scale), "HAS_MASK": bool(has_mask), "HEAD_DIM": int(head_dim),
              "HEAD_DIM_V": int(head_dim_v)}
    if ndim == 1:
        if not (_pow2(int(block_m)) and int(block_m) >= 16):
            raise UserError(f"neighborhood attention (Triton): block_m {block_m} must be a power of two >= 16",
                            fix="use block_m in 16, 32, 64, 128")
        values = {"SCALE": common["SCALE"], "KERNEL": kernels[0], "DILATION": dilations[0], "CAUSAL": causals[0],
                  "HAS_MASK": common["HAS_MASK"], "HEAD_DIM": common["HEAD_DIM"],
                  "HEAD_DIM_V": common["HEAD_DIM_V"], "BLOCK_M": int(block_m), "BLOCK_N": int(block_n)}
    elif ndim == 2:
        bx, by = tile_2d(block_m)
        values = {"SCALE": common["SCALE"], "KERNEL_X": kernels[0], "KERNEL_Y": kernels[1],
                  "DILATION_X": dilations[0], "DILATION_Y": dilations[1], "CAUSAL_X": causals[0],
                  "CAUSAL_Y": causals[1], "HAS_MASK": common["HAS_MASK"], "HEAD_DIM": common["HEAD_DIM"],
                  "HEAD_DIM_V": common["HEAD_DIM_V"], "BLOCK_X": bx, "BLOCK_Y": by, "BLOCK_N": int(block_n)}
    else:
        raise ValueError(f"neighborhood attention (Triton) supports 1-D and 2-D, not {ndim}-D")
    assert tuple(values) == _CONSTEXPRS[ndim]
    return values


def compile_kernel(ndim: int, dtype: str, *, kernel_size, dilation, is_causal, scale, head_dim: int,
                   head_dim_v: int, has_mask: bool, cc: int, block_m=None, block_n=None, num_warps=None,
                   num_stages=None, int8: bool = False, ptx_version: int | None = None):
    """Compile one kernel ahead of time for compute capability ``cc`` (e.g. 80, 89, 90); no GPU
    needed. Returns Triton's compiled kernel: ``.asm["ptx"]``, ``.metadata.name``,
    ``.metadata.num_warps``, ``.metadata.shared`` (dynamic shared memory in bytes).
    ``ptx_version`` (e.g. 80 = PTX ISA 8.0, CUDA 12.0 drivers on): the ISA the PTX declares;
    by default the newest Triton's ptxas knows, which the loading driver must support."""
    _require_triton()
    from triton.backends.compiler import GPUTarget

    int8 = bool(int8) or _dtype_key(dtype) == "i8"
    tactic = default_tactic(head_dim, head_dim_v)
    block_m = tactic[0] if block_m is None else block_m
    block_n = tactic[1] if block_n is None else block_n
    num_warps = tactic[2] if num_warps is None else num_warps
    num_stages = tactic[3] if num_stages is None else num_stages
    signature = kernel_signature(ndim, dtype, int8)
    constexprs = kernel_constexprs(ndim, kernel_size=kernel_size, dilation=dilation, is_causal=is_causal,
                                   scale=scale, head_dim=head_dim, head_dim_v=head_dim_v, has_mask=has_mask,
                                   block_m=block_m, block_n=block_n)
    # 16-byte aligned base pointers for q, k, v, out and the mask (vectorised row loads)
    aligned = ("Q", "K", "V", "KEY_MASK", "OUT")
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(signature) if name in aligned}
    src = triton.compiler.ASTSource(fn=_KERNELS[(ndim, int8)], signature=signature, constexprs=constexprs,
                                    attrs=attrs)
    options = {"num_warps": int(num_warps), "num_stages": int(num_stages), "enable_fp_fusion": True}
    if ptx_version is not None:
        options["ptx_version"] = int(ptx_version)
    return triton.compile(src, target=GPUTarget("cuda", int(cc), 32), options=options)


# --------------------------------------------------------------------------------------------
# PyTorch entry points
# --------------------------------------------------------------------------------------------

def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _require_triton():
    if triton is None:
        raise UserError(f"neighborhood attention (Triton) needs the triton package ({_TRITON_ERROR})",
                        fix="pip install triton (Linux; CUDA for GPU runs, TRITON_INTERPRET=1 for CPU)")


def _check_inputs(q, k, v, key_mask, kernel_size, dilation, is_causal, int8: bool):
    spatial = tuple(q.shape[2:-1])
    ndim = len(spatial)
    if ndim not in (1, 2) or k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        raise UserError(f"neighborhood attention (Triton) needs q, k (B, H, L | X, Y, D) of one shape and v "
                        f"(.., Dv); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}",
                        fix="check the tensor layouts (1-D or 2-D)")
    kernels = per_axis(kernel_size, ndim, "kernel_size")
    dilations = per_axis(dilation, ndim, "dilation")
    causals = per_axis(is_causal, ndim, "is_causal")
    if ndim == 1 and key_mask is not None:          # windows are placed on each row's own length
        check_window(kernels[0] * dilations[0], kernels[0], dilations[0])
    else:
        for axis, (n, kk, dd) in enumerate(zip(spatial, kernels, dilations)):
            check_window(n, kk, dd, axis)
    import torch

    want = (torch.int8,) if int8 else (torch.float16, torch.bfloat16, torch.float32)
    if q.dtype not in want or k.dtype != q.dtype or v.dtype != q.dtype:
        raise UserError(f"neighborhood attention (Triton): q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype}",
                        fix=f"give q, k, v one dtype of {', '.join(str(x) for x in want)}")
    if key_mask is not None:
        if tuple(key_mask.shape) != (q.shape[0], *spatial):
            raise UserError(f"neighborhood attention (Triton): key_mask {tuple(key_mask.shape)} is not "
                            f"{(q.shape[0], *spatial)}", fix="give key_mask as (batch, *spatial) bool")
        if ndim == 1:
            m = key_mask.bool()
            prefix = torch.arange(m.shape[-1], device=m.device)[None, :] < m.sum(-1)[:, None]
            if not torch.equal(prefix, m):
                raise UserError("neighborhood attention: a 1-D key_mask must mark each row's first tokens "
                                "(right padding)", fix="pad sequences on the right")
    return ndim, kernels, dilations, causals


def _launch(q, k, v, key_mask, kernel_size, dilation, is_causal, scale, block_m, block_n, num_warps, num_stages,
            scales=None):
    import torch

    _require_triton()
    int8 = scales is not None
    ndim, kernels, dilations, causals = _check_inputs(q, k, v, key_mask, kernel_size, dilation, is_causal, int8)
    head_dim, head_dim_v = q.shape[-1], v.shape[-1]
    tactic = default_tactic(head_dim, head_dim_v)
    block_m = tactic[0] if block_m is None else block_m
    block_n = tactic[1] if block_n is None else block_n
    num_warps = tactic[2] if num_warps is None else num_warps
    num_stages = tactic[3] if num_stages is None else num_stages
    scale = head_dim ** -0.5 if scale is None else float(scale)
    constexprs = kernel_constexprs(ndim, kernel_size=kernels, dilation=dilations, is_causal=causals, scale=scale,
                                   head_dim=head_dim, head_dim_v=head_dim_v, has_mask=key_mask is not None,
                                   block_m=block_m, block_n=block_n)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty(*q.shape[:-1], head_dim_v, dtype=q.dtype, device=q.device)
    if key_mask is None:
        mask = torch.ones(1, dtype=torch.int8, device=q.device)           # not read (HAS_MASK false)
    else:
        mask = key_mask.to(device=q.device, dtype=torch.bool).contiguous().view(torch.int8)
    b, h = q.shape[0], q.shape[1]
    spatial = tuple(int(n) for n in q.shape[2:-1])
    if ndim == 1:
        grid = grid_1d(b, h, spatial[0], constexprs["BLOCK_M"], constexprs["DILATION"])
    else:
        grid = grid_2d(b, h, *spatial, constexprs["BLOCK_X"], constexprs["BLOCK_Y"], constexprs["DILATION_X"],
                       constexprs["DILATION_Y"])
    scale_args = ()
    if int8:
        scale_args = tuple(torch.as_tensor(s, dtype=torch.float32, device=q.device).reshape(1) for s in scales)
    if out.numel() == 0:
        return out
    _KERNELS[(ndim, int8)][grid](q, k, v, mask, *scale_args, b, h, *spatial, out, **constexprs,
                                 num_warps=int(num_warps), num_stages=int(num_stages), enable_fp_fusion=True)
    return out


def neighborhood_attention_triton(q, k, v, kernel_size, dilation=1, is_causal=False, scale=None, key_mask=None, *,
                                  block_m=None, block_n=None, num_warps=None, num_stages=None):
    """Neighborhood attention with the fused kernel: ``reference.neighborhood_attention``
    without ``rpb``. ``q, k`` (B, H, L, D) or (B, H, X, Y, D), ``v`` (..., Dv); fp16, bf16 or
    fp32 (the output has the input dtype). CUDA tensors, or CPU tensors under
    ``TRITON_INTERPRET=1``. ``block_m`` in 2-D is a query count or an ``(X, Y)`` tile."""
    return _launch(q, k, v, key_mask, kernel_size, dilation, is_causal, scale, block_m, block_n, num_warps,
                   num_stages)


def neighborhood_attention_int8_triton(q, k, v, q_scale, k_scale, v_scale, y_scale, kernel_size, dilation=1,
                                       is_causal=False, scale=None, key_mask=None, *, block_m=None, block_n=None,
                                       num_warps=None, num_stages=None):
    """INT8 I/O form (``NeighborhoodAttention1DInt8`` / ``2DInt8``): ``q, k, v`` int8 with
    per-tensor scales (zero point 0); returns int8
    ``clamp(round_half_even(NA(q*q_scale, k*k_scale, v*v_scale) / y_scale), -128, 127)``."""
    return _launch(q, k, v, key_mask, kernel_size, dilation, is_causal, scale, block_m, block_n, num_warps,
                   num_stages, scales=(q_scale, k_scale, v_scale, y_scale))
