"""The fused neighborhood-attention Triton kernels (plugins/neighborhood_attention/triton_kernel.py).

* Parity with reference.py under Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors).
  The interpreter runs in one subprocess for all cases: the variable must be set before
  Triton decorates the kernels, and the rest of the suite compiles real PTX.
* AOT compilation to PTX for sm_80 .. sm_90 without a GPU, and the launch contract a
  TensorRT plugin relies on (argument order, constexprs, grid from shapes only).

Tolerances (outputs are O(1): softmax averages of standard normal values):

* fp32: the interpreter computes every product in fp32 like the reference; only summation
  order and ``exp2`` with the folded ``log2 e`` differ, ~1e-6 -> ``1e-5`` abs + rel.
* fp16 I/O: both sides see the same fp16 inputs (the reference runs in fp32 on them). The
  kernel rounds P to fp16 for ``P @ V`` (relative 2^-11 per term, <= 5e-4 * max|v| in all)
  and the output to fp16 (2^-11 * |y|): ``2e-3`` abs + rel.
* bf16 I/O: the same two roundings at 2^-8 relative: ``1.5e-2`` abs + rel.
* INT8 I/O: the kernel's float op differs from DequantizeLinear -> fp32 op by the fp16
  rounding of P, so a value within that of a rounding boundary may land one step away:
  at most 1 LSB, on under 2% of the outputs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

import torch  # noqa: E402

from deploykit.errors import UserError  # noqa: E402
from deploykit.plugins.neighborhood_attention import triton_kernel as tk  # noqa: E402

TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.5e-2}


def _case(name, shape, kernel, dilation=1, causal=False, dtype="float32", dv=None, lengths=None, mask2d=None,
          block_m=16, block_n=16, int8=False):
    return dict(name=name, shape=list(shape), kernel=kernel, dilation=dilation, causal=causal, dtype=dtype, dv=dv,
                lengths=lengths, mask2d=mask2d, block_m=block_m, block_n=block_n, int8=int8)


CASES = [
    # 1-D: borders, odd / even k, dilation, causal, lengths not multiples of the blocks
    _case("1d_odd_k", (2, 2, 37, 32), 5),
    _case("1d_even_k_dilated", (1, 2, 37, 32), 4, 3),
    _case("1d_causal_dilated", (1, 2, 37, 32), 4, 3, True),
    _case("1d_causal_k7_blocks_32x16", (2, 1, 40, 32), 7, 2, True, block_m=32),
    _case("1d_window_is_row", (1, 1, 20, 32), 20),
    _case("1d_k1", (1, 1, 19, 32), 1, 2),
    # 1-D ragged rows: full, partial, shorter than k * d (whole group), empty
    _case("1d_mask", (4, 1, 37, 32), 3, 2, lengths=[37, 30, 5, 0]),
    _case("1d_mask_causal", (4, 1, 37, 32), 3, 2, True, lengths=[37, 30, 5, 0]),
    _case("1d_mask_k_times_d_over_L", (2, 1, 6, 32), 4, 2, lengths=[6, 3]),
    # head dims
    _case("1d_d64_dv32", (1, 2, 33, 64), 5, dv=32),
    _case("1d_dv64_causal_even_k", (1, 1, 21, 32), 6, 1, True, dv=64),
    # 16-bit I/O
    _case("1d_fp16_mask", (2, 2, 37, 32), 5, 2, dtype="float16", lengths=[37, 17]),
    _case("1d_fp16_causal_d64", (1, 2, 40, 64), 8, 1, True, dtype="float16"),
    _case("1d_bf16_mask", (2, 1, 37, 32), 5, 2, dtype="bfloat16", lengths=[37, 9]),
    # 2-D: per-axis k / dilation / causal, key mask, tile shapes
    _case("2d_mixed_axes_dv64", (1, 2, 11, 13, 32), [3, 4], [2, 1], [False, True], dv=64),
    _case("2d_mask_tile_2x8", (2, 1, 9, 10, 32), [5, 3], [1, 3], [True, False],
          mask2d={"seed": 1, "p": 0.7, "empty": [1]}, block_m=[2, 8]),
    _case("2d_even_k_tile_4x8", (1, 1, 7, 6, 32), [2, 2], 1, False, block_m=32),
    _case("2d_causal_both_d64", (1, 1, 8, 9, 64), [3, 3], [2, 2], [True, True]),
    _case("2d_fp16_mask", (1, 2, 10, 11, 32), [3, 5], [3, 1], False, dtype="float16",
          mask2d={"seed": 2, "p": 0.7, "empty": []}),
    _case("2d_bf16", (1, 1, 9, 9, 32), [3, 3], 1, False, dtype="bfloat16"),
    # INT8 I/O
    _case("1d_int8_mask", (2, 2, 37, 32), 5, 2, lengths=[37, 11], int8=True),
    _case("2d_int8", (1, 2, 9, 10, 32), [3, 3], [1, 2], [False, True], int8=True),
]

# Runs in a subprocess with TRITON_INTERPRET=1; prints one JSON line of per-case results.
_INTERPRETER_SCRIPT = r'''
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"
import numpy as np
import torch
import triton.language as tl

bf16_note = None
try:
    # The interpreter multiplies bf16 dot operands as their raw 16-bit patterns; upcast
    # them to fp32 first (the kernels' bf16 loads, casts and stores are unaffected).
    from triton.runtime import interpreter as _interp
    _dot = _interp.InterpreterBuilder.create_dot

    def _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype == tl.bfloat16 or b.dtype == tl.bfloat16:
            a = _interp.TensorHandle(_interp._convert_float(a.data, a.dtype, tl.float32, None).view(np.float32),
                                     tl.float32)
            b = _interp.TensorHandle(_interp._convert_float(b.data, b.dtype, tl.float32, None).view(np.float32),
                                     tl.float32)
        return _dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    _interp.InterpreterBuilder.create_dot = _create_dot
except Exception as exc:
    bf16_note = f"bf16 dot cannot be run by this Triton interpreter ({exc!r})"

from deploykit.plugins.neighborhood_attention.reference import neighborhood_attention
from deploykit.plugins.neighborhood_attention.triton_kernel import (
    neighborhood_attention_int8_triton, neighborhood_attention_triton)


def quantize(x, s):
    return torch.clamp(torch.round(x / s), -128, 127).to(torch.int8)       # round half to even


results = {}
for c in json.loads(sys.argv[1]):
    if c["dtype"] == "bfloat16" and bf16_note:
        results[c["name"]] = {"skip": bf16_note}
        continue
    g = torch.Generator().manual_seed(len(c["name"]))
    shape = c["shape"]
    dv = c["dv"] or shape[-1]
    q, k, v = (torch.randn(*s, generator=g) for s in (shape, shape, shape[:-1] + [dv]))
    b, spatial = shape[0], shape[2:-1]
    mask, padded = None, torch.zeros(b, *spatial, dtype=torch.bool)
    if c["lengths"] is not None:
        mask = torch.arange(spatial[0])[None, :] < torch.tensor(c["lengths"])[:, None]
        padded = ~mask                                # padded queries must output 0
    if c["mask2d"] is not None:
        mg = torch.Generator().manual_seed(c["mask2d"]["seed"])
        mask = torch.rand(b, *spatial, generator=mg) < c["mask2d"]["p"]
        for row in c["mask2d"]["empty"]:
            mask[row] = False
            padded[row] = True                        # no key left: those queries output 0
    args = dict(kernel_size=c["kernel"], dilation=c["dilation"], is_causal=c["causal"], key_mask=mask)
    blocks = dict(block_m=c["block_m"], block_n=c["block_n"], num_warps=1, num_stages=1)
    pad = padded[:, None, ..., None].expand(*shape[:-1], dv)
    if c["int8"]:
        qs, ks, vs = (float(t.abs().max()) / 127 for t in (q, k, v))
        q8, k8, v8 = quantize(q, qs), quantize(k, ks), quantize(v, vs)
        y = neighborhood_attention(q8.float() * qs, k8.float() * ks, v8.float() * vs, **args)
        ys = float(y.abs().max()) / 127
        want = quantize(y, ys)
        got = neighborhood_attention_int8_triton(q8, k8, v8, qs, ks, vs, ys, **args, **blocks)
        diff = (got.int() - want.int()).abs()
        results[c["name"]] = {"dtype": str(got.dtype), "shape": list(got.shape), "max_lsb": int(diff.max()),
                              "mismatch": float((diff > 0).float().mean()),
                              "pad_max": int(got.int()[pad].abs().max()) if pad.any() else 0}
        continue
    dtype = getattr(torch, c["dtype"])
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    want = neighborhood_attention(q.float(), k.float(), v.float(), **args)
    got = neighborhood_attention_triton(q, k, v, **args, **blocks)
    err = (got.float() - want).abs()
    results[c["name"]] = {"dtype": str(got.dtype), "shape": list(got.shape), "max_err": float(err.max()),
                          "max_ref": float(want.abs().max()), "err_over_ref": float((err / (1 + want.abs())).max()),
                          "pad_max": float(got.float()[pad].abs().max()) if pad.any() else 0.0}
print("RESULTS " + json.dumps(results))
'''


@pytest.fixture(scope="module")
def interpreted():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _INTERPRETER_SCRIPT, json.dumps(CASES)], capture_output=True,
                          text=True, env=env, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULTS "):])


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_interpreter_matches_reference(interpreted, case):
    r = interpreted[case["name"]]
    if "skip" in r:
        pytest.skip(r["skip"])
    dv = case["dv"] or case["shape"][-1]
    assert r["shape"] == case["shape"][:-1] + [dv]
    if case["int8"]:
        assert r["dtype"] == "torch.int8"
        assert r["max_lsb"] <= 1 and r["mismatch"] < 0.02, r
        assert r["pad_max"] == 0, r
        return
    assert r["dtype"] == f"torch.{case['dtype']}"
    assert r["err_over_ref"] <= TOL[case["dtype"]], r            # |err| <= tol * (1 + |ref|)
    assert r["pad_max"] == 0.0, r                                 # padded / keyless queries output exactly 0
    assert r["max_ref"] > 0.1                                     # a real comparison, not zeros vs zeros


# ---------------------------------------------------------------------------------------------
# AOT compilation (no GPU needed)

def _ptx_cases():
    cases = [(cc, ndim, "fp16") for cc in (80, 86, 87, 89, 90) for ndim in (1, 2)]
    return cases + [(80, 1, "bf16"), (90, 2, "bf16"), (89, 1, "fp32"), (86, 2, "int8"), (90, 1, "int8")]


@pytest.mark.parametrize("cc,ndim,dtype", _ptx_cases(), ids=lambda x: str(x))
def test_compiles_to_ptx(cc, ndim, dtype):
    int8 = dtype == "int8"
    head_dim = 128 if (dtype == "fp16" and cc == 90) else 64
    tactic = tk.default_tactic(head_dim)
    compiled = tk.compile_kernel(ndim, dtype, kernel_size=7 if ndim == 1 else (7, 5), dilation=(2 if ndim == 1 else
                                 (1, 2)), is_causal=False if ndim == 1 else (False, True), scale=head_dim ** -0.5,
                                 head_dim=head_dim, head_dim_v=head_dim, has_mask=True, cc=cc, int8=int8)
    ptx = compiled.asm["ptx"]
    name = compiled.metadata.name
    assert name == tk.KERNEL_NAMES[(ndim, int8)]
    assert f".entry {name}(" in ptx
    assert re.search(rf"\.target sm_{cc}a?\b", ptx)
    assert compiled.metadata.num_warps == tactic.num_warps
    assert 0 < compiled.metadata.shared <= tk.max_shared_bytes(cc)
    assert getattr(compiled.metadata, "global_scratch_size", 0) == 0
    # the entry's parameters: the runtime arguments of the signature, then Triton's two scratch pointers
    runtime = [t for t in tk.kernel_signature(ndim, dtype, int8).values() if t != "constexpr"]
    params = ptx.split(f".entry {name}(", 1)[1].split(")", 1)[0]
    assert params.count(".param") == len(runtime) + 2
    if dtype != "fp32":
        assert "mma" in ptx                                            # tensor cores for QK^T and PV


def test_compile_rejects_bad_blocks():
    with pytest.raises(UserError, match="block_n"):
        tk.compile_kernel(1, "fp16", kernel_size=7, dilation=1, is_causal=False, scale=0.125, head_dim=64,
                          head_dim_v=64, has_mask=False, cc=80, block_n=24)
    with pytest.raises(UserError, match="head_dim"):
        tk.compile_kernel(1, "fp16", kernel_size=7, dilation=1, is_causal=False, scale=0.125, head_dim=48,
                          head_dim_v=48, has_mask=False, cc=80)


# ---------------------------------------------------------------------------------------------
# launch contract

@pytest.mark.parametrize("ndim,int8", [(1, False), (1, True), (2, False), (2, True)])
def test_signature_matches_kernel_arguments(ndim, int8):
    fn = tk._KERNELS[(ndim, int8)]
    sig = tk.kernel_signature(ndim, "int8" if int8 else "fp16")
    assert list(sig) == fn.arg_names
    assert [n for n, t in sig.items() if t == "constexpr"] == [p.name for p in fn.params if p.is_constexpr]
    head = ["Q", "K", "V", "KEY_MASK"] + (["Q_SCALE", "K_SCALE", "V_SCALE", "Y_SCALE"] if int8 else [])
    dims = ["B", "H", "L"] if ndim == 1 else ["B", "H", "X", "Y"]
    assert [n for n, t in sig.items() if t != "constexpr"] == head + dims + ["OUT"]
    assert all(sig[n] == "i32" for n in dims) and sig["KEY_MASK"] == "*i8"
    assert sig["Q"] == sig["OUT"] == ("*i8" if int8 else "*fp16")
    assert tk.SIGNATURES[(ndim, "int8" if int8 else "fp16")] == sig
    assert tk.kernel_signature(ndim, "bf16")["V"] == "*bf16" and tk.kernel_signature(ndim, "fp32")["Q"] == "*fp32"
    constexprs = tk.kernel_constexprs(ndim, kernel_size=3, dilation=1, is_causal=False, scale=0.125, head_dim=32,
                                      has_mask=False, block_m=64, block_n=32)
    assert list(constexprs) == [n for n, t in sig.items() if t == "constexpr"]


class _Sym:
    """A shape expression supporting only what a TensorRT plugin's SymInt32 does: + - * //."""

    def __init__(self, value, text):
        self.value, self.text = value, text

    def _op(self, other, sym, fn):
        ov, ot = (other.value, other.text) if isinstance(other, _Sym) else (other, str(other))
        return _Sym(fn(self.value, ov), f"({self.text} {sym} {ot})")

    def __add__(self, o):
        return self._op(o, "+", lambda a, b: a + b)

    def __sub__(self, o):
        return self._op(o, "-", lambda a, b: a - b)

    def __mul__(self, o):
        return self._op(o, "*", lambda a, b: a * b)

    def __floordiv__(self, o):
        return self._op(o, "//", lambda a, b: a // b)


def test_grid_from_shapes_only():
    assert tk.launch_grid(1, 2, 3, 37, block_m=16, dilation=3) == (3 * 1, 3, 2)       # ceil(37/3)=13 -> 1 tile
    assert tk.launch_grid(1, 2, 3, 100, block_m=16, dilation=1) == (7, 3, 2)
    assert tk.launch_grid(2, 2, 3, 11, 13, block_m=(4, 4), dilation=(2, 1)) == (2 * 4 * 2, 3, 2)
    assert tk.launch_grid(2, 1, 1, 64, 64, block_m=64, dilation=1) == (64, 1, 1)      # 8 x 8 tiles of 8 x 8
    assert tk.tile_2d(16) == (4, 4) and tk.tile_2d(32) == (4, 8) and tk.tile_2d(128) == (8, 16)
    for ndim, shape, bm, dil in [(1, (2, 4, 1000), 64, 3), (2, (2, 4, 56, 57), 64, (2, 3))]:
        syms = [_Sym(n, name) for n, name in zip(shape, "BHXY")]
        got = tk.launch_grid(ndim, *syms, block_m=bm, dilation=dil)
        assert tuple(g.value for g in got) == tk.launch_grid(ndim, *shape, block_m=bm, dilation=dil)
    # every query position falls in exactly one program's tile
    for L, d, bm in [(37, 3, 16), (64, 1, 64), (5, 4, 16)]:
        grid = tk.grid_1d(1, 1, L, bm, d)[0]
        covered = sorted(g + (t * bm + r) * d for p in range(grid) for g, t in [(p % d, p // d)]
                         for r in range(bm) if g + (t * bm + r) * d < L)
        assert covered == list(range(L))


def test_tactics():
    assert all(len(t) == 4 for t in tk.TACTICS)
    assert tk.default_tactic(32) in tk.TACTICS and tk.default_tactic(128) in tk.TACTICS
    for t in tk.TACTICS:
        tk.kernel_constexprs(2, kernel_size=3, scale=1.0, head_dim=64, has_mask=True, block_m=t.block_m,
                             block_n=t.block_n)


# ---------------------------------------------------------------------------------------------
# validation (raised before any launch, so no GPU or interpreter needed)

def test_validation_like_reference():
    q = torch.zeros(1, 1, 10, 32)
    with pytest.raises(UserError, match="exceeds the length"):
        tk.neighborhood_attention_triton(q, q, q, 4, dilation=3)
    with pytest.raises(UserError, match="right padding"):
        tk.neighborhood_attention_triton(q, q, q, 3, key_mask=torch.tensor([[True, False] * 5]))
    with pytest.raises(UserError, match="dtype"):
        tk.neighborhood_attention_triton(q, q, q.half(), 3)
    with pytest.raises(UserError, match="head_dim"):
        tk.neighborhood_attention_triton(torch.zeros(1, 1, 10, 48), torch.zeros(1, 1, 10, 48), q, 3)
    q2 = torch.zeros(1, 1, 6, 7, 32)
    with pytest.raises(UserError, match="kernel_size has 3 entries"):
        tk.neighborhood_attention_triton(q2, q2, q2, (3, 3, 3))
    with pytest.raises(UserError, match="axis 1"):
        tk.neighborhood_attention_triton(q2, q2, q2, (3, 4), dilation=(1, 2))
    with pytest.raises(UserError, match="dtype"):
        tk.neighborhood_attention_int8_triton(q, q, q, 1.0, 1.0, 1.0, 1.0, 3)


def test_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
            "from deploykit.errors import UserError\n"
            "from deploykit.plugins.neighborhood_attention import triton_kernel as tk\n"
            "assert tk.launch_grid(1, 1, 1, 10, block_m=16) == (1, 1, 1) and tk.kernel_signature(1, 'fp16')\n"
            "try:\n    tk.compile_kernel(1, 'fp16', kernel_size=3, dilation=1, is_causal=False, scale=1.0,"
            " head_dim=32, head_dim_v=32, has_mask=False, cc=80)\n"
            "except UserError as e:\n    print('raised', 'triton' in str(e))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "raised True" in proc.stdout, proc.stderr[-2000:]
