"""Triton kernels for deploykit's linear attention op (``reference.py`` is the specification).

Math (per batch b, head h; ``phi`` the feature map, ``lam`` the head's decay)::

    out_i = phi(q_i) S_i / (phi(q_i) z_i + eps)      (numerator only when normalize=False)
    S_i   = sum_j M_ij phi(k_j) v_j^T,   z_i = sum_j M_ij phi(k_j)

with ``M_ij = 1`` (non-causal) or ``M_ij = lam^(i-j)`` for ``j <= i``, else 0 (causal;
``lam = 1`` is plain causal attention). Keys whose ``key_mask`` byte is 0 get ``phi(k) = 0``.
Query rows are never masked: a padded query row gets the same formula as a real one, exactly
as in ``reference.linear_attention``.

Algorithm
---------
One program per (dv-tile, batch * head). Every program keeps its state in fp32 registers.

* Causal (Lightning Attention-2): the program walks the sequence in chunks of ``CHUNK``
  rows. For chunk c with rows ``t = 0..C-1``::

      O_c = (phi(Q_c) phi(K_c)^T * Dm) V_c + (phi(Q_c) * lam^(t+1)) S      (numerator)
      den = rowsum(phi(Q_c) phi(K_c)^T * Dm) + (phi(Q_c) * lam^(t+1)) z
      S  <- lam^C S + (phi(K_c) * lam^(C-1-t))^T V_c,   z <- lam^C z + sum_t lam^(C-1-t) phi(k_t)

  with ``Dm[i, j] = lam^(i-j)`` for ``i >= j`` else 0. ``S`` is (D, BLOCK_DV), ``z`` is (D,).
  The row weights are applied where they cost least: ``lam^(t+1)`` to the rows of
  ``phi(Q_c) S`` after the product, ``lam^(C-1-t)`` to the rows of ``V_c`` before
  ``phi(K_c)^T V_c``. The vectors ``lam^(t+1)``, ``lam^(C-1-t)`` and ``lam^C`` depend only on
  the head, so they are built once per program, before the loop; ``Dm`` is rebuilt per chunk
  with ``exp2`` (cheaper in registers than keeping it live). Rows past N load as zero and
  their ``phi(k)`` is zeroed (``phi(0)`` is 1 for elu+1 and 1/2 for sigmoid), so N need not
  be a multiple of CHUNK.
* Non-causal, two passes in one launch: the program first accumulates ``S = phi(K)^T V``
  and ``z = sum_j phi(k_j)`` over all N rows, then walks the rows again and writes
  ``phi(Q) S / (phi(Q) z + eps)``.

Precision: inputs are fp16, bf16 or fp32; every sum accumulates in fp32. With 16-bit I/O the
chunk-local products (``phi(Q) phi(K)^T``, ``P V``, ``phi(K)^T V``) take 16-bit operands on the
tensor cores, as the reference computes them in the input dtype; products with the fp32 state
``S`` use fp32 operands (TF32 tensor cores: the fp32 exponent range, so long unnormalised sums
cannot overflow as they would in fp16). With fp32 I/O every product is fp32-accurate 3xTF32
(``input_precision="tf32x3"``), correct but register-heavy (ptxas spills at D = 128): fp16
and bf16 are the deployment types. The decay values are rounded to the I/O dtype first, as the
reference (``torch.as_tensor(decay, dtype=q.dtype)``) and the ONNX function (``CastLike``) do.

INT8 variant (``LinearAttentionInt8``: DequantizeLinear -> float op -> QuantizeLinear): q, k, v
are int8 with per-tensor fp32 scales; the float op runs in fp32 (TF32 products), and the
output is ``clamp(round_half_even(y / y_scale), -128, 127)`` as int8.

Launch contract (a TensorRT plugin launches the PTX with exactly these arguments)
--------------------------------------------------------------------------------
Positional arguments, in order::

    linear_attention_fwd(Q, K, V, KEY_MASK, B, H, N, OUT, <constexprs>)
    linear_attention_int8_fwd(Q, K, V, KEY_MASK, Q_SCALE, K_SCALE, V_SCALE, Y_SCALE,
                              B, H, N, OUT, <constexprs>)

* ``Q, K``: (B, H, N, D) contiguous; ``V, OUT``: (B, H, N, DV) contiguous; fp16/bf16/fp32
  (int8 for Q, K, V, OUT in the INT8 variant). Q, K, V and OUT must be 16-byte aligned (the
  AOT signature declares it; TensorRT allocates plugin I/O at 256 bytes).
* ``KEY_MASK``: (B, N) bytes, 1 = real token (a bool tensor passed as ``*u8``); not read when
  ``HAS_MASK`` is False (any pointer will do).
* ``Q_SCALE, K_SCALE, V_SCALE, Y_SCALE``: pointers to one fp32 each (per-tensor scales,
  zero point 0).
* ``B, H, N``: int32, straight from the shapes. B is not read by the kernel (the grid
  carries it) but is part of the signature.
* Constexprs (compile-time): ``D``, ``DV`` (head dims, powers of two, 16..128), ``FEATURE_MAP``
  (0 elu+1, 1 relu, 2 sigmoid), ``NORMALIZE`` (bool), ``EPS`` (float), ``CAUSAL`` (bool),
  ``CHUNK`` (rows per block along N, power of two in 16..128), ``BLOCK_DV`` (power of two
  dividing DV, >= 16), ``HAS_MASK`` (bool) and ``DECAY``: a tuple of Python floats, baked into the
  code. ``()`` means no decay (also used when every value is 1.0), ``(lam,)`` one decay for
  all heads, ``(lam_0, ..., lam_{H-1})`` one per head, which must then have exactly H
  entries. The kernel picks its head's value with a ``tl.static_range`` loop of
  ``tl.where(h == i, DECAY[i], lam)`` on ``h = (program // n_dv_tiles) % H``: the plugin's
  launch arguments stay int32 shape expressions only.
* Triton >= 3.4 appends two hidden ``.u64`` parameters to the PTX entry (global and profile
  scratch). These kernels use no scratch (``metadata.global_scratch_size == 0``), so a
  launcher passes null for both after OUT.
* Grid: ``launch_grid(B, H, N, DV, BLOCK_DV)`` =
  ``(((DV + BLOCK_DV - 1) // BLOCK_DV) * B * H, 1, 1)``; program ``p`` handles dv-tile
  ``p % n_dv`` of batch-head ``p // n_dv`` (adjacent programs share a head, so the Q/K
  re-reads of the dv-tiles hit L2; one grid axis avoids the 65535 limit of grid y/z).
  Block size ``num_warps * 32`` threads; dynamic shared memory ``metadata.shared`` bytes
  (above 48 KB the launcher opts in with ``cuFuncSetAttribute(...,
  CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, ...)``, as Triton's own launcher does, up
  to the target's ``MAX_SHARED``).

Cost and parallelism
--------------------
Per (b, h), with ``T = DV / BLOCK_DV`` dv-tiles: the causal kernel spends per token
``C D T`` (scores, recomputed per tile) ``+ C DV`` (P V) ``+ 2 D DV`` (inter-chunk term and
state update) multiply-adds, reads Q and K T times (adjacent programs, so mostly from L2),
V once and writes OUT once: memory O(N (D + DV)), compute O(N (C (D T + DV) + D DV)). The
non-causal kernel spends ``2 D DV`` per token (pass 1: phi(K)^T V, pass 2: phi(Q) S) and
reads K, Q T times, V once. Parallelism is ``B * H * DV / BLOCK_DV`` programs, each sequential along N:
plenty for batched inference (B * H >= a few hundred), but short of the SM count for
B * H * DV / BLOCK_DV < #SMs (e.g. B=1, H=8), where smaller ``BLOCK_DV`` tactics raise the
program count at the price of more Q/K re-reads. Designs with more parallelism that still
fit one launch, not implemented here: (a) causal, chunk-parallel with a decoupled look-back
scan: a program per (chunk, dv-tile, b*h) computes its chunk's intra part and summary
``(sum_t lam^(C-1-t) phi(k_t) v_t^T, ...)``, publishes it to a workspace with a flag and
combines its predecessors' published prefixes (``S_c = lam^C S_{c-1} + summary_{c-1}``) before
the inter-chunk term; it needs a workspace and flags reset per launch (an epoch counter
avoids a memset) and relies on forward progress of earlier programs. (b) non-causal, N
split over P programs per (dv-tile, b*h) with atomically reduced partial states: the second
pass then needs a grid-wide barrier (cooperative launch), which a plain one-kernel plugin
cannot guarantee.
"""

from __future__ import annotations

import math
from collections import namedtuple

from deploykit.errors import UserError
from deploykit.plugins.linear_attention.reference import EPS, FEATURE_MAPS

try:
    import triton
    import triton.language as tl
    _TRITON_ERROR = None
except ImportError as exc:          # the module stays importable; the functions raise
    triton = None
    _TRITON_ERROR = exc

    class _LanguageStub:
        constexpr = None

    tl = _LanguageStub()

    def _jit(fn):
        return fn
else:
    _jit = triton.jit

__all__ = ["linear_attention_triton", "linear_attention_int8_triton", "kernel_signature", "compile_kernel",
           "launch_grid", "TACTICS", "Tactic", "CONSTEXPRS", "KERNEL_NAMES", "MAX_SHARED"]

KERNEL_NAMES = {False: "linear_attention_fwd", True: "linear_attention_int8_fwd"}
CONSTEXPRS = ("D", "DV", "FEATURE_MAP", "NORMALIZE", "EPS", "CAUSAL", "CHUNK", "BLOCK_DV", "HAS_MASK", "DECAY")

# A plugin autotune's choices: CHUNK (rows per block along N), BLOCK_DV (capped at DV), warps,
# pipeline stages. Any of them computes the same function. ptxas register spills, causal with
# decay, fp16 / bf16, sm_80 and sm_90: the first spills at most 80 bytes (fp16, D = 128) and
# nothing at D <= 64; the second and fourth spill nothing at D <= 128; the third spills nothing
# on sm_90 at D <= 64 and a few hundred bytes elsewhere; the fifth (one dv-tile at Dv = 128, Q
# and K read once per (b, h)) a few hundred bytes. Shared memory at D = Dv = 128, causal: the
# first needs <= 47 KB with 16-bit I/O, the fourth <= 43 KB for every I/O type (fp32 and int8
# included), so some tactic always fits the 48 KB a launcher grants without opting in.
Tactic = namedtuple("Tactic", "chunk block_dv num_warps num_stages")
TACTICS = [
    Tactic(32, 64, 8, 2),
    Tactic(32, 32, 8, 2),       # twice the programs at Dv = 128 (small B * H)
    Tactic(64, 64, 8, 2),       # half the iterations
    Tactic(16, 32, 4, 2),       # the smallest tiles: the most programs, the least shared memory
    Tactic(32, 128, 8, 2),
]

# Largest dynamic shared memory per block (bytes) by compute capability.
MAX_SHARED = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}

_DTYPES = {"fp16": "fp16", "float16": "fp16", "half": "fp16", "bf16": "bf16", "bfloat16": "bf16",
           "fp32": "fp32", "float32": "fp32", "float": "fp32"}


def _require_triton():
    if triton is None:
        raise UserError(f"the linear attention Triton kernels need triton, which is not importable here "
                        f"({_TRITON_ERROR})",
                        fix="pip install triton (Linux, with an NVIDIA GPU or TRITON_INTERPRET=1)")


# ----------------------------------------------------------------------------------------------------
# kernels


@_jit
def _feature(x, FEATURE_MAP: tl.constexpr):
    x = x.to(tl.float32)
    if FEATURE_MAP == 0:
        y = tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))      # elu(x) + 1
    elif FEATURE_MAP == 1:
        y = tl.maximum(x, 0.0)
    else:
        y = tl.sigmoid(x)
    return y


@_jit
def _load(ptr, rows, cols, n, WIDTH: tl.constexpr, scale, INT8: tl.constexpr):
    """A (rows, cols) tile of a row-major (n, WIDTH) matrix (rows >= n read 0): the I/O
    dtype as stored, or dequantised to fp32 for int8."""
    x = tl.load(ptr + rows[:, None] * WIDTH + cols[None, :], mask=(rows < n)[:, None], other=0.0)
    if INT8:
        x = x.to(tl.float32) * scale
    return x


@_jit
def _head_decay(h, DECAY: tl.constexpr):
    """This head's decay: DECAY[0] for every head, or DECAY[h] (a static select chain)."""
    lam = h.to(tl.float32) * 0.0 + DECAY[0]
    for i in tl.static_range(1, len(DECAY)):
        lam = tl.where(h == i, DECAY[i], lam)
    return lam


@_jit
def _keys(k_ptr, m_ptr, r, offs_d, N, D: tl.constexpr, k_scale, FEATURE_MAP: tl.constexpr,
          HAS_MASK: tl.constexpr, INT8: tl.constexpr):
    """phi(K) of one block (fp32), zero on padded keys and on rows >= N."""
    in_range = r < N
    keep = in_range
    if HAS_MASK:
        keep = keep & (tl.load(m_ptr + r, mask=in_range, other=0) != 0)
    fk = _feature(_load(k_ptr, r, offs_d, N, D, k_scale, INT8), FEATURE_MAP)
    return tl.where(keep[:, None], fk, 0.0)


@_jit
def _linear_attention_core(Q, K, V, KEY_MASK, q_scale, k_scale, v_scale, y_scale, H, N, OUT,
                           D: tl.constexpr, DV: tl.constexpr, FEATURE_MAP: tl.constexpr, NORMALIZE: tl.constexpr,
                           EPS: tl.constexpr, CAUSAL: tl.constexpr, CHUNK: tl.constexpr, BLOCK_DV: tl.constexpr,
                           HAS_MASK: tl.constexpr, DECAY: tl.constexpr, INT8: tl.constexpr):
    tl.static_assert(DV % BLOCK_DV == 0)
    N_DV: tl.constexpr = DV // BLOCK_DV
    pid = tl.program_id(0)
    pid_dv = pid % N_DV
    pid_bh = pid // N_DV
    h = pid_bh % H
    b = pid_bh // H

    # Operand types of the products. 16-bit I/O: chunk-local products in the I/O dtype, products
    # with the fp32 state in TF32. fp32 I/O: 3xTF32 throughout (fp32-accurate on the tensor
    # cores). int8: dequantised fp32 operands, TF32.
    if INT8:
        DOT_TY = tl.float32
    else:
        DOT_TY = Q.dtype.element_ty
    PREC: tl.constexpr = "tf32x3" if Q.dtype.element_ty == tl.float32 else "tf32"
    DECAYED: tl.constexpr = CAUSAL and len(DECAY) > 0

    rows = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, D)
    offs_v = pid_dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    bh = pid_bh.to(tl.int64)
    q_ptr = Q + bh * N * D
    k_ptr = K + bh * N * D
    v_ptr = V + bh * N * DV
    o_ptr = OUT + bh * N * DV
    m_ptr = KEY_MASK + b.to(tl.int64) * N

    state = tl.zeros((D, BLOCK_DV), dtype=tl.float32)     # sum_j w_j phi(k_j) v_j^T
    zstate = tl.zeros((D,), dtype=tl.float32)             # sum_j w_j phi(k_j)

    if CAUSAL:
        dist = rows[:, None] - rows[None, :]
        if DECAYED:
            log2lam = tl.log2(_head_decay(h, DECAY))
            q_decay = tl.exp2((rows + 1).to(tl.float32) * log2lam)              # lam^(t+1)
            k_decay = tl.exp2((CHUNK - 1 - rows).to(tl.float32) * log2lam)      # lam^(C-1-t)
            chunk_decay = tl.exp2(log2lam * CHUNK)                             # lam^C
        for start in range(0, N, CHUNK):
            r = start + rows
            fk = _keys(k_ptr, m_ptr, r, offs_d, N, D, k_scale, FEATURE_MAP, HAS_MASK, INT8)
            if DECAYED:
                kz = tl.sum(fk * k_decay[:, None], axis=0)
            else:
                kz = tl.sum(fk, axis=0)
            fk = fk.to(DOT_TY)
            fq = _feature(_load(q_ptr, r, offs_d, N, D, q_scale, INT8), FEATURE_MAP).to(DOT_TY)
            v = _load(v_ptr, r, offs_v, N, DV, v_scale, INT8)
            # intra-chunk: (phi(Q) phi(K)^T * Dm) V, Dm[i, j] = lam^(i-j) for i >= j
            scores = tl.dot(fq, tl.trans(fk), input_precision=PREC)
            if DECAYED:
                scores = tl.where(dist >= 0, scores * tl.exp2(tl.maximum(dist, 0).to(tl.float32) * log2lam), 0.0)
            else:
                scores = tl.where(dist >= 0, scores, 0.0)
            num = tl.dot(scores.to(DOT_TY), v.to(DOT_TY), input_precision=PREC)
            # inter-chunk: lam^(t+1) phi(q_t) S
            fq32 = fq.to(tl.float32)
            if DECAYED:
                num += q_decay[:, None] * tl.dot(fq32, state, input_precision=PREC)
            else:
                num = tl.dot(fq32, state, num, input_precision=PREC)
            if NORMALIZE:
                inter = tl.sum(fq32 * zstate[None, :], axis=1)
                if DECAYED:
                    inter = inter * q_decay
                num = num / (tl.sum(scores, axis=1) + inter + EPS)[:, None]
            _store(o_ptr, r, offs_v, N, DV, num, y_scale, INT8)
            # S <- lam^C S + (phi(K) * lam^(C-1-t))^T V, the row weights applied to V
            if DECAYED:
                vd = (v.to(tl.float32) * k_decay[:, None]).to(DOT_TY)
                state = state * chunk_decay
                zstate = zstate * chunk_decay + kz
            else:
                vd = v.to(DOT_TY)
                zstate = zstate + kz
            state = tl.dot(tl.trans(fk), vd, state, input_precision=PREC)
    else:
        for start in range(0, N, CHUNK):                  # pass 1: S = phi(K)^T V, z = sum phi(k)
            r = start + rows
            fk = _keys(k_ptr, m_ptr, r, offs_d, N, D, k_scale, FEATURE_MAP, HAS_MASK, INT8)
            zstate = zstate + tl.sum(fk, axis=0)
            v = _load(v_ptr, r, offs_v, N, DV, v_scale, INT8)
            state = tl.dot(tl.trans(fk.to(DOT_TY)), v.to(DOT_TY), state, input_precision=PREC)
        for start in range(0, N, CHUNK):                  # pass 2: phi(Q) S / (phi(Q) z + eps)
            r = start + rows
            fq = _feature(_load(q_ptr, r, offs_d, N, D, q_scale, INT8), FEATURE_MAP)
            if DOT_TY != tl.float32:
                fq = fq.to(DOT_TY).to(tl.float32)          # phi(q) in the I/O dtype, as the reference
            out = tl.dot(fq, state, input_precision=PREC)
            if NORMALIZE:
                out = out / (tl.sum(fq * zstate[None, :], axis=1) + EPS)[:, None]
            _store(o_ptr, r, offs_v, N, DV, out, y_scale, INT8)


@_jit
def _store(ptr, rows, cols, n, WIDTH: tl.constexpr, out, y_scale, INT8: tl.constexpr):
    if INT8:
        # QuantizeLinear: saturate(round_half_even(y / y_scale)). Clamping first is exact (the
        # bounds are integers); adding and subtracting 1.5 * 2^23 rounds |y| <= 2^22 to the
        # nearest integer, ties to even, in fp32 round-to-nearest arithmetic.
        y = tl.div_rn(out, tl.zeros_like(out) + y_scale)
        y = tl.minimum(tl.maximum(y, -128.0), 127.0)
        y = (y + 12582912.0) - 12582912.0
        val = y.to(tl.int8)
    else:
        val = out.to(ptr.dtype.element_ty)
    tl.store(ptr + rows[:, None] * WIDTH + cols[None, :], val, mask=(rows < n)[:, None])


@_jit
def linear_attention_fwd(Q, K, V, KEY_MASK, B, H, N, OUT,
                         D: tl.constexpr, DV: tl.constexpr, FEATURE_MAP: tl.constexpr, NORMALIZE: tl.constexpr,
                         EPS: tl.constexpr, CAUSAL: tl.constexpr, CHUNK: tl.constexpr, BLOCK_DV: tl.constexpr,
                         HAS_MASK: tl.constexpr, DECAY: tl.constexpr):
    _linear_attention_core(Q, K, V, KEY_MASK, 1.0, 1.0, 1.0, 1.0, H, N, OUT, D, DV, FEATURE_MAP, NORMALIZE, EPS,
                           CAUSAL, CHUNK, BLOCK_DV, HAS_MASK, DECAY, False)


@_jit
def linear_attention_int8_fwd(Q, K, V, KEY_MASK, Q_SCALE, K_SCALE, V_SCALE, Y_SCALE, B, H, N, OUT,
                              D: tl.constexpr, DV: tl.constexpr, FEATURE_MAP: tl.constexpr,
                              NORMALIZE: tl.constexpr, EPS: tl.constexpr, CAUSAL: tl.constexpr,
                              CHUNK: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_MASK: tl.constexpr,
                              DECAY: tl.constexpr):
    _linear_attention_core(Q, K, V, KEY_MASK, tl.load(Q_SCALE), tl.load(K_SCALE), tl.load(V_SCALE),
                           tl.load(Y_SCALE), H, N, OUT, D, DV, FEATURE_MAP, NORMALIZE, EPS, CAUSAL, CHUNK,
                           BLOCK_DV, HAS_MASK, DECAY, True)


# ----------------------------------------------------------------------------------------------------
# host side: parameters, grid, AOT compilation


def _pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def _kernel_chunk(chunk_size: int) -> int:
    """CHUNK for a requested chunk size: the chunk length only blocks the computation (every
    chunk length computes the same function), so any value maps to a power of two in 16..128."""
    c = int(chunk_size)
    if c < 1:
        raise UserError(f"linear attention: chunk_size must be positive, got {chunk_size}", fix="e.g. chunk_size: 64")
    return min(128, max(16, 1 << (c - 1).bit_length()))


def _default_block_dv(head_dim_v: int) -> int:
    return min(int(head_dim_v), 64)


def _default_warps(head_dim: int, block_dv: int, chunk: int) -> int:
    return 8 if head_dim * max(block_dv, chunk) >= 64 * 64 else 4


def _check_dims(head_dim: int, head_dim_v: int, block_dv: int) -> None:
    for name, x in (("head dim D", head_dim), ("head dim Dv", head_dim_v)):
        if not (_pow2(int(x)) and 16 <= x <= 128):
            raise UserError(f"linear attention kernel: {name} = {x} is not a power of two in 16..128",
                            fix="use the PyTorch reference (or the ONNX decomposition) for this shape")
    if not (_pow2(int(block_dv)) and 16 <= block_dv <= head_dim_v):
        raise UserError(f"linear attention kernel: block_dv = {block_dv} must be a power of two in 16..Dv "
                        f"({head_dim_v})", fix="pick block_dv from 16, 32, 64, 128")


def _round_to(values: list[float], dtype: str) -> list[float]:
    import torch

    tdt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    return [float(x) for x in torch.tensor(values, dtype=torch.float64).to(tdt).to(torch.float64)]


def _decay_constexpr(decay, heads: int | None, causal: bool, dtype: str) -> tuple:
    """DECAY for the kernel: () without decay (or all 1.0), else the values rounded to the I/O dtype."""
    if decay is None:
        return ()
    if isinstance(decay, (int, float)):
        values = [float(decay)]
    else:
        import torch

        values = [float(x) for x in torch.as_tensor(decay, dtype=torch.float64).reshape(-1).tolist()]
    values = _round_to(values, dtype)            # checked after rounding, as the reference does
    if not values or any(not (0.0 < x <= 1.0) or math.isnan(x) for x in values) or (
            heads is not None and len(values) not in (1, heads)):
        raise UserError("linear attention: decay needs one value in (0, 1] per head (or one for all)",
                        fix="e.g. decay: [0.99, 0.95, ...]")
    if not causal:
        return ()
    if all(x == 1.0 for x in values):
        return ()
    if len(set(values)) == 1:
        return (values[0],)
    return tuple(values)


def launch_grid(B, H, N, head_dim_v, block_dv):
    """The launch grid: one program per (dv-tile, batch * head), on grid x.

    Uses only + - * // so it also evaluates on symbolic shape expressions (N is not needed)."""
    del N
    if block_dv is None:
        block_dv = _default_block_dv(head_dim_v)
    return ((head_dim_v + block_dv - 1) // block_dv * B * H, 1, 1)


def kernel_signature(dtype: str, int8: bool = False) -> dict[str, str]:
    """Triton's signature dict (argument name -> type, constexprs as "constexpr"), in order.

    ``dtype`` names the I/O type (fp16/bf16/fp32); with ``int8`` the I/O is int8 and the
    scales fp32, and ``dtype`` is not used."""
    if int8:
        io = "*i8"
    else:
        if dtype not in _DTYPES:
            raise UserError(f"linear attention kernel: unsupported dtype '{dtype}'", fix="use fp16, bf16 or fp32")
        io = "*" + _DTYPES[dtype]
    sig = {"Q": io, "K": io, "V": io, "KEY_MASK": "*u8"}
    if int8:
        sig.update({"Q_SCALE": "*fp32", "K_SCALE": "*fp32", "V_SCALE": "*fp32", "Y_SCALE": "*fp32"})
    sig.update({"B": "i32", "H": "i32", "N": "i32", "OUT": io})
    sig.update({name: "constexpr" for name in CONSTEXPRS})
    return sig


def _constexprs(*, dtype: str, feature_map: int, is_causal: bool, normalize: bool, decay, chunk_size: int,
                eps: float, head_dim: int, head_dim_v: int, heads: int | None, has_mask: bool, block_dv) -> dict:
    if int(feature_map) not in (0, 1, 2):
        raise UserError(f"linear attention: unknown feature_map {feature_map}", fix="0 elu+1, 1 relu, 2 sigmoid")
    block_dv = _default_block_dv(head_dim_v) if block_dv is None else min(int(block_dv), int(head_dim_v))
    _check_dims(int(head_dim), int(head_dim_v), block_dv)
    return {"D": int(head_dim), "DV": int(head_dim_v), "FEATURE_MAP": int(feature_map),
            "NORMALIZE": bool(normalize), "EPS": float(eps), "CAUSAL": bool(is_causal),
            "CHUNK": _kernel_chunk(chunk_size), "BLOCK_DV": block_dv, "HAS_MASK": bool(has_mask),
            "DECAY": _decay_constexpr(decay, heads, bool(is_causal), dtype)}


def compile_kernel(dtype: str, *, feature_map: int, is_causal: bool, normalize: bool, decay: list[float],
                   chunk_size: int, eps: float, head_dim: int, head_dim_v: int, heads: int | None, has_mask: bool,
                   cc: int, block_dv=None, num_warps=None, num_stages=None, int8=False, ptx_version=None):
    """AOT-compile one specialisation for ``sm_<cc>``; returns Triton's ``CompiledKernel``
    (``.asm["ptx"]``, ``.metadata.name``, ``.metadata.num_warps``, ``.metadata.shared``).

    ``decay``: the ONNX attribute (one value, or one per head; 1.0 = none). With several values
    the kernel must be launched with ``H == len(decay)`` (checked here when ``heads`` is given).
    ``heads`` may be None when it is not known at build time. ``int8=True`` compiles the
    ``LinearAttentionInt8`` kernel (int8 I/O, fp32 scales, the op in fp32): ``dtype`` is then
    not used. ``num_warps`` / ``num_stages`` default to 8 or 4 by tile size / 2 (``TACTICS``
    lists tuned sets). The caller checks ``.metadata.shared`` against what its launcher grants
    (48 KB without opting in; at most ``MAX_SHARED[cc]``).

    ``ptx_version`` (e.g. 80 for PTX ISA 8.0): the PTX ISA the output declares. By default
    Triton writes the newest its bundled ptxas knows (with Triton 3.9: 8.8 for sm_8x, 9.4
    for sm_90), which the driver that JIT-compiles the PTX must support; 80 (CUDA 12.0
    drivers and newer) compiles for every target here."""
    _require_triton()
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    io = "fp32" if int8 else _DTYPES.get(dtype)
    if io is None:
        raise UserError(f"linear attention kernel: unsupported dtype '{dtype}'", fix="use fp16, bf16 or fp32")
    constexprs = _constexprs(dtype=io, feature_map=feature_map, is_causal=is_causal, normalize=normalize,
                             decay=decay, chunk_size=chunk_size, eps=eps, head_dim=head_dim, head_dim_v=head_dim_v,
                             heads=heads, has_mask=has_mask, block_dv=block_dv)
    fn = linear_attention_int8_fwd if int8 else linear_attention_fwd
    signature = kernel_signature(io, int8=int8)
    names = list(signature)
    aligned = ("Q", "K", "V", "OUT")
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    if num_warps is None:
        num_warps = _default_warps(constexprs["D"], constexprs["BLOCK_DV"], constexprs["CHUNK"])
    options = {"num_warps": int(num_warps), "num_stages": int(2 if num_stages is None else num_stages),
               "enable_fp_fusion": True}
    if ptx_version is not None:
        options["ptx_version"] = int(ptx_version)
    return triton.compile(src, target=GPUTarget("cuda", int(cc), 32), options=options)


# ----------------------------------------------------------------------------------------------------
# PyTorch entry points (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)


def _check_inputs(q, k, v, key_mask, dtypes):
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise UserError(f"linear attention needs q, k (B, H, N, D) and v (B, H, N, Dv); got {tuple(q.shape)}, "
                        f"{tuple(k.shape)}, {tuple(v.shape)}", fix="check the tensor layouts")
    if q.dtype not in dtypes or k.dtype != q.dtype or v.dtype != q.dtype:
        raise UserError(f"linear attention kernel: q, k, v must share one dtype of {', '.join(map(str, dtypes))}; "
                        f"got {q.dtype}, {k.dtype}, {v.dtype}", fix="cast the inputs")
    if key_mask is not None and tuple(key_mask.shape) != (q.shape[0], q.shape[2]):
        raise UserError(f"linear attention: key_mask must be (B, N) = {(q.shape[0], q.shape[2])}, "
                        f"got {tuple(key_mask.shape)}", fix="pass one bool per key, True = real token")


def _launch(fn, q, k, v, scales, *, feature, causal, decay, normalize, chunk_size, eps, key_mask, block_dv, out_dtype,
            dtype_name):
    import torch

    _require_triton()
    if feature not in FEATURE_MAPS:
        raise UserError(f"linear attention: unknown feature map '{feature}'",
                        fix=f"use one of {', '.join(FEATURE_MAPS)}")
    if decay is not None and not causal:
        raise UserError("linear attention: decay needs causal=True (lambda^(i-j) is defined for j <= i)",
                        fix="set causal: true or drop decay")
    b, h, n, d = q.shape
    dv = v.shape[-1]
    meta = _constexprs(dtype=dtype_name, feature_map=FEATURE_MAPS.index(feature), is_causal=causal,
                       normalize=normalize, decay=decay, chunk_size=chunk_size, eps=eps, head_dim=d, head_dim_v=dv,
                       heads=h, has_mask=key_mask is not None, block_dv=block_dv)
    out = torch.empty((b, h, n, dv), dtype=out_dtype, device=q.device)
    if n == 0 or b * h == 0:
        return out
    if key_mask is None:
        mask = torch.ones(1, dtype=torch.uint8, device=q.device)
    else:
        mask = key_mask.to(device=q.device, dtype=torch.bool).contiguous().view(torch.uint8)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    grid = launch_grid(b, h, n, dv, meta["BLOCK_DV"])
    num_warps = _default_warps(d, meta["BLOCK_DV"], meta["CHUNK"])
    fn[grid](q, k, v, mask, *scales, b, h, n, out, **meta, num_warps=num_warps, num_stages=2, enable_fp_fusion=True)
    return out


def linear_attention_triton(q, k, v, *, feature: str = "elu1", causal: bool = False, decay=None,
                            normalize: bool = True, chunk_size: int = 64, eps: float = EPS, key_mask=None,
                            block_dv=None):
    """``reference.linear_attention`` on the Triton kernel (fp16 / bf16 / fp32, same dtype out)."""
    import torch

    _check_inputs(q, k, v, key_mask, (torch.float16, torch.bfloat16, torch.float32))
    name = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[q.dtype]
    return _launch(linear_attention_fwd, q, k, v, (), feature=feature, causal=causal, decay=decay,
                   normalize=normalize, chunk_size=chunk_size, eps=eps, key_mask=key_mask, block_dv=block_dv,
                   out_dtype=q.dtype, dtype_name=name)


def linear_attention_int8_triton(q, k, v, q_scale, k_scale, v_scale, y_scale, *, feature: str = "elu1",
                                 causal: bool = False, decay=None, normalize: bool = True, chunk_size: int = 64,
                                 eps: float = EPS, key_mask=None, block_dv=None):
    """``LinearAttentionInt8``: int8 q, k, v and per-tensor fp32 scales in, int8 out
    (``clamp(round_half_even(y / y_scale), -128, 127)`` of the fp32 op on the dequantised inputs)."""
    import torch

    _check_inputs(q, k, v, key_mask, (torch.int8,))
    scales = [torch.as_tensor(s, dtype=torch.float32, device=q.device).reshape(1).contiguous()
              for s in (q_scale, k_scale, v_scale, y_scale)]
    return _launch(linear_attention_int8_fwd, q, k, v, scales, feature=feature, causal=causal, decay=decay,
                   normalize=normalize, chunk_size=chunk_size, eps=eps, key_mask=key_mask, block_dv=block_dv,
                   out_dtype=torch.int8, dtype_name="fp32")
