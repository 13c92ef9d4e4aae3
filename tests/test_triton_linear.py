"""Triton linear attention kernels (plugins/linear_attention/triton_kernel.py).

* Parity with ``reference.linear_attention`` (and ``linear_attention_naive``) under Triton's
  interpreter on CPU. ``TRITON_INTERPRET=1`` must be set before triton is imported and would
  turn every later ``triton.compile`` in this process into the interpreter, so all interpreter
  cases run in one child process (``_INTERPRETER_SCRIPT``) and report back as JSON.
* AOT compilation to PTX for sm_80..sm_90 (no GPU needed): entry name, target, the leading
  parameters of the launch contract, no global scratch.
* The host-side pieces: signature order, the grid on symbolic shapes, validation, and the
  module importing without triton.

Tolerances (error = max |out - ref| / max |ref|, ref in float64 from the same rounded inputs,
so unnormalised outputs, whose sums grow with N, are compared relative to their own scale):

* fp32 1e-5: fp32 arithmetic over <= 48 rows (~1e-7; the interpreter multiplies in plain
  fp32, the GPU in 3xTF32, ~1e-6) plus the decay powers taken as ``exp2(n * log2(lam))`` in
  fp32 (~n ulp of log2(lam), n < 64: ~4e-6);
* fp16 4e-3: the output rounding alone is 2^-11 = 4.9e-4 relative, and phi(q), phi(k), the
  decayed scores and V rows are rounded to fp16 before the products, as the reference does;
* bf16 3e-2: the same roundings at 2^-8 = 3.9e-3 each;
* fp16 kernel vs the reference run wholly in fp16 (fp16 sums and state): 1e-2;
* int8: the kernel and the fp32 op quantise identically except where y / y_scale lies within
  rounding noise of a half-integer: at most 1 LSB apart, on under 2% of the elements.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys

import pytest

try:
    importlib.import_module("triton")
except ImportError as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"triton is not importable ({exc})", allow_module_level=True)

import torch

from deploykit.errors import UserError
from deploykit.plugins.linear_attention import triton_kernel as tk

TOL = {"float32": 1e-5, "float16": 4e-3, "bfloat16": 3e-2}
TOL_FP16_REFERENCE = 1e-2

# name -> case. Shapes stay tiny: the interpreter runs every program in numpy.
_BASE = dict(dtype="float32", B=2, H=2, N=37, D=16, DV=32, causal=False, decay=None, feature="elu1", normalize=True,
             chunk=16, mask="none", block_dv=None, naive=False, fp16_reference=False, int8=False)
CASES = {
    # non-causal: ragged / random / one empty mask row, N not a multiple of the chunk, one chunk
    "nc-elu1-norm-ragged": dict(mask="ragged", naive=True),
    "nc-relu-raw-48": dict(feature="relu", normalize=False, N=48),
    "nc-sigmoid-norm-onechunk-random": dict(feature="sigmoid", N=16, mask="random"),
    "nc-elu1-norm-emptyrow-dvtiles": dict(mask="empty_row", block_dv=16),
    "nc-relu-norm-n1": dict(feature="relu", B=1, N=1, D=32, DV=16),
    # causal, no decay / scalar decay / per-head decay / decay 1.0 (plain causal)
    "c-elu1-norm-ragged": dict(causal=True, mask="ragged", naive=True),
    "c-elu1-norm-decay-ragged": dict(causal=True, decay=[0.9, 0.5], mask="ragged", naive=True),
    "c-relu-raw-decay-scalar-48": dict(causal=True, feature="relu", normalize=False, decay=0.8, N=48),
    "c-sigmoid-norm-decay-onechunk": dict(causal=True, feature="sigmoid", decay=[0.9, 0.5], N=16),
    "c-sigmoid-raw-decay-short": dict(causal=True, feature="sigmoid", normalize=False, decay=[0.95, 1.0], N=5),
    "c-elu1-norm-decay1-random": dict(causal=True, decay=[1.0], N=48, mask="random"),
    "c-relu-norm-decay-d32dv16-dvtiles": dict(causal=True, feature="relu", decay=[0.7, 0.99], D=32, DV=16,
                                              N=40, mask="ragged"),
    "c-elu1-raw-decay-dvtiles-chunk32": dict(causal=True, normalize=False, decay=[0.9, 0.5], block_dv=16, chunk=32),
    "c-sigmoid-norm-chunk64-default": dict(causal=True, feature="sigmoid", decay=0.9, chunk=64, N=48),
    # 16-bit I/O
    "fp16-c-elu1-norm-decay-ragged": dict(dtype="float16", causal=True, decay=[0.9, 0.5], mask="ragged",
                                          fp16_reference=True),
    "fp16-c-relu-raw-decay-48": dict(dtype="float16", causal=True, feature="relu", normalize=False, decay=0.9, N=48),
    "fp16-nc-sigmoid-raw": dict(dtype="float16", feature="sigmoid", normalize=False, mask="random",
                                fp16_reference=True),
    "fp16-nc-elu1-norm-dvtiles": dict(dtype="float16", mask="ragged", block_dv=16),
    "bf16-c-elu1-norm-decay-ragged": dict(dtype="bfloat16", causal=True, decay=[0.9, 0.5], mask="ragged"),
    "bf16-nc-relu-norm-48": dict(dtype="bfloat16", feature="relu", N=48),
    # INT8 in / out (LinearAttentionInt8)
    "int8-c-elu1-norm-decay-ragged": dict(int8=True, causal=True, decay=[0.9, 0.5], mask="ragged"),
    "int8-nc-relu-raw": dict(int8=True, feature="relu", normalize=False, mask="random"),
}
CASES = {name: {**_BASE, **case} for name, case in CASES.items()}

_INTERPRETER_SCRIPT = r'''
import json, os, sys
assert os.environ.get("TRITON_INTERPRET") == "1"
import numpy as np
import torch
import triton.language as tl
from triton.runtime import interpreter

# Triton's interpreter keeps bf16 as its raw uint16 bits and hands those to numpy's matmul.
# Widening bf16 dot operands to fp32 first (exact: a bf16 is the top half of an fp32) gives
# the products the GPU computes.
_create_dot = interpreter.InterpreterBuilder.create_dot


def _widen(x):
    if x.dtype.scalar == tl.bfloat16:
        return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
    return x


def create_dot(self, a, b, d, *args):
    return _create_dot(self, _widen(a), _widen(b), d, *args)


interpreter.InterpreterBuilder.create_dot = create_dot

from deploykit.plugins.linear_attention.reference import linear_attention, linear_attention_naive
from deploykit.plugins.linear_attention.triton_kernel import linear_attention_int8_triton, linear_attention_triton


def mask_for(kind, b, n, g):
    if kind == "none":
        return None
    if kind == "random":
        m = torch.rand(b, n, generator=g) > 0.3
        m[:, 0] = True
        return m
    m = torch.ones(b, n, dtype=torch.bool)
    if kind == "ragged":
        for i in range(1, b):
            m[i, max(1, n - 11 * i):] = False
    elif kind == "empty_row":
        m[-1] = False
    return m


def rel_err(out, ref):
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


results = {}
for name, c in json.load(sys.stdin).items():
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    dtype = getattr(torch, c["dtype"])
    b, h, n, d, dv = c["B"], c["H"], c["N"], c["D"], c["DV"]
    q, k, v = (torch.randn(b, h, n, x, generator=g) for x in (d, d, dv))
    key_mask = mask_for(c["mask"], b, n, g)
    kw = dict(feature=c["feature"], causal=c["causal"], normalize=c["normalize"], key_mask=key_mask)
    decay = c["decay"]
    res = {}
    if c["int8"]:
        qs, ks, vs = 0.02, 0.015, 0.01
        qi, ki, vi = (torch.randint(-127, 128, t.shape, generator=g, dtype=torch.int8) for t in (q, k, v))
        y = linear_attention(qi.float() * qs, ki.float() * ks, vi.float() * vs, decay=decay,
                             chunk_size=c["chunk"], **kw)
        ys = float(y.abs().max()) / 100.0
        ref = torch.clamp(torch.round(y / ys), -128, 127).to(torch.int8)      # QuantizeLinear, ties to even
        out = linear_attention_int8_triton(qi, ki, vi, qs, ks, vs, ys, decay=decay, chunk_size=c["chunk"],
                                           block_dv=c["block_dv"], **kw)
        diff = (out.int() - ref.int()).abs()
        res.update(dtype=str(out.dtype), shape=list(out.shape), max_lsb=int(diff.max()),
                   mismatch=float((diff > 0).float().mean()))
    else:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        out = linear_attention_triton(q, k, v, decay=decay, chunk_size=c["chunk"], block_dv=c["block_dv"], **kw)
        # the float64 reference on the same inputs, with the decay rounded to the I/O dtype as
        # the reference itself (and the ONNX function) round it
        dec64 = None if decay is None else torch.tensor(decay, dtype=dtype).double()
        ref = linear_attention(q.double(), k.double(), v.double(), decay=dec64, chunk_size=c["chunk"], **kw)
        res.update(dtype=str(out.dtype), shape=list(out.shape), err=rel_err(out, ref),
                   finite=bool(torch.isfinite(out).all()))
        if c["naive"]:
            res["err_naive"] = rel_err(out, linear_attention_naive(q.double(), k.double(), v.double(), decay=dec64,
                                                                   **kw))
        if c["fp16_reference"]:
            res["err_fp16_reference"] = rel_err(out, linear_attention(q, k, v, decay=decay, chunk_size=c["chunk"],
                                                                      **kw))
    results[name] = res
print("RESULTS" + json.dumps(results))
'''


# ----------------------------------------------------------------------------------------------------
# AOT: PTX without a GPU

def _entry_params(ptx: str, name: str) -> list[str]:
    m = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\(([^)]*)\)", ptx)
    assert m, f"no .entry {name} in the PTX"
    return re.findall(r"\.param\s+\.(\w+)", m.group(1))


def _compile(dtype="fp16", *, cc, causal=True, decay=(0.9, 0.5), int8=False, **kw):
    args = dict(feature_map=0, is_causal=causal, normalize=True, decay=list(decay), chunk_size=64, eps=1e-6,
                head_dim=64, head_dim_v=64, heads=len(decay), has_mask=True, cc=cc, int8=int8)
    args.update(kw)
    return tk.compile_kernel(dtype, **args)


@pytest.mark.parametrize("cc", [80, 86, 87, 89, 90])
@pytest.mark.parametrize("causal", [True, False], ids=["causal-decay", "noncausal"])
def test_ptx_fp16(cc, causal):
    ck = _compile("fp16", cc=cc, causal=causal)
    ptx = ck.asm["ptx"]
    assert ck.metadata.name == "linear_attention_fwd"
    assert f".entry {ck.metadata.name}(" in ptx
    assert re.search(rf"^\.target sm_{cc}a?\b", ptx, re.MULTILINE), f"no .target sm_{cc}"
    # Q, K, V, KEY_MASK, B, H, N, OUT; then Triton's two scratch pointers, passed as null
    assert _entry_params(ptx, ck.metadata.name)[:8] == ["u64"] * 4 + ["u32"] * 3 + ["u64"]
    assert ck.metadata.global_scratch_size == 0
    assert ck.metadata.num_warps == tk._default_warps(64, 64, 64)
    assert isinstance(ck.metadata.shared, int) and ck.metadata.shared > 0


@pytest.mark.parametrize("dtype,cc,causal,decay", [("bf16", 80, True, (0.95,)), ("fp32", 89, False, (1.0,)),
                                                   ("bf16", 90, False, (1.0,))])
def test_ptx_other_dtypes(dtype, cc, causal, decay):
    ck = _compile(dtype, cc=cc, causal=causal, decay=decay, head_dim=32, head_dim_v=64, block_dv=32,
                  num_warps=4, num_stages=1)
    ptx = ck.asm["ptx"]
    assert f".entry {ck.metadata.name}(" in ptx and f".target sm_{cc}" in ptx
    assert ck.metadata.num_warps == 4
    assert ck.metadata.global_scratch_size == 0


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_smallest_tactic_fits_default_shared_memory(int8):
    # the heaviest operand types at the largest head dims still fit 48 KB with TACTICS[3]
    t = tk.TACTICS[3]
    ck = _compile("fp32", cc=80, decay=(0.9,), int8=int8, head_dim=128, head_dim_v=128, chunk_size=t.chunk,
                  block_dv=t.block_dv, num_warps=t.num_warps, num_stages=t.num_stages)
    assert ck.metadata.shared <= 48 * 1024


def test_ptx_int8_and_ptx_version():
    ck = _compile(cc=90, int8=True, decay=(0.9,), normalize=False, ptx_version=80)
    ptx = ck.asm["ptx"]
    assert ck.metadata.name == "linear_attention_int8_fwd"
    assert f".entry {ck.metadata.name}(" in ptx and ".target sm_90" in ptx
    assert re.search(r"^\.version 8\.0$", ptx, re.MULTILINE)
    # Q, K, V, KEY_MASK, Q_SCALE, K_SCALE, V_SCALE, Y_SCALE, B, H, N, OUT
    assert _entry_params(ptx, ck.metadata.name)[:12] == ["u64"] * 8 + ["u32"] * 3 + ["u64"]


# ----------------------------------------------------------------------------------------------------
# host side

def test_signature_matches_kernel_arguments():
    for int8, fn in ((False, tk.linear_attention_fwd), (True, tk.linear_attention_int8_fwd)):
        sig = tk.kernel_signature("bf16", int8=int8)
        assert list(sig) == list(fn.arg_names)
        assert [k for k, t in sig.items() if t == "constexpr"] == list(tk.CONSTEXPRS)
    sig = tk.kernel_signature("fp16")
    assert (sig["Q"], sig["KEY_MASK"], sig["B"], sig["OUT"]) == ("*fp16", "*u8", "i32", "*fp16")
    assert tk.kernel_signature("fp16", int8=True)["Y_SCALE"] == "*fp32"
    with pytest.raises(UserError):
        tk.kernel_signature("fp8")


class _Sym:
    """A shape expression: records the arithmetic applied to it."""

    def __init__(self, text):
        self.text = text

    @staticmethod
    def _text(x):
        return x.text if isinstance(x, _Sym) else str(x)

    def _op(self, other, op, reflected=False):
        a, b = (self._text(other), self.text) if reflected else (self.text, self._text(other))
        return _Sym(f"({a} {op} {b})")

    def __add__(self, o):
        return self._op(o, "+")

    def __sub__(self, o):
        return self._op(o, "-")

    def __mul__(self, o):
        return self._op(o, "*")

    def __rmul__(self, o):
        return self._op(o, "*", reflected=True)

    def __floordiv__(self, o):
        return self._op(o, "//")


def test_launch_grid():
    assert tk.launch_grid(2, 3, 100, 128, 64) == (12, 1, 1)
    assert tk.launch_grid(1, 1, 5, 32, 32) == (1, 1, 1)
    assert tk.launch_grid(1, 1, 5, 128, None) == (2, 1, 1)           # default BLOCK_DV = min(Dv, 64)
    gx, gy, gz = tk.launch_grid(_Sym("B"), _Sym("H"), _Sym("N"), 128, 32)
    assert (gx.text, gy, gz) == ("((4 * B) * H)", 1, 1)
    gx, _, _ = tk.launch_grid(_Sym("B"), _Sym("H"), _Sym("N"), _Sym("DV"), 32)
    assert gx.text == "(((((DV + 32) - 1) // 32) * B) * H)"


def test_decay_constexpr():
    assert tk._decay_constexpr(None, 2, True, "fp32") == ()
    assert tk._decay_constexpr([1.0, 1.0], 2, True, "fp32") == ()
    assert tk._decay_constexpr([0.9, 0.9], 2, True, "fp32") == (float(torch.tensor(0.9)),)
    assert tk._decay_constexpr([0.9, 0.5], 2, True, "fp16") == (float(torch.tensor(0.9).half()), 0.5)
    assert tk._decay_constexpr([0.9, 0.5], 2, False, "fp16") == ()        # non-causal: no decay
    for bad in ([0.9, 0.5, 0.1], [0.0], [1.5]):
        with pytest.raises(UserError):
            tk._decay_constexpr(bad, 2, True, "fp32")


def test_validation_before_launch():
    q = torch.zeros(1, 2, 8, 16)
    with pytest.raises(UserError, match="causal"):
        tk.linear_attention_triton(q, q, q, decay=0.9)
    with pytest.raises(UserError, match="power of two"):
        tk.linear_attention_triton(torch.zeros(1, 2, 8, 24), torch.zeros(1, 2, 8, 24), q)
    with pytest.raises(UserError, match="feature"):
        tk.linear_attention_triton(q, q, q, feature="softmax")
    with pytest.raises(UserError, match="dtype"):
        tk.linear_attention_triton(q.double(), q.double(), q.double())
    with pytest.raises(UserError, match="key_mask"):
        tk.linear_attention_triton(q, q, q, key_mask=torch.ones(1, 7, dtype=torch.bool))


def test_tactics_compile_choices():
    for t in tk.TACTICS:
        meta = tk._constexprs(dtype="fp16", feature_map=1, is_causal=True, normalize=True, decay=[0.9],
                              chunk_size=t.chunk, eps=1e-6, head_dim=128, head_dim_v=128, heads=None, has_mask=False,
                              block_dv=t.block_dv)
        assert meta["CHUNK"] == t.chunk and meta["BLOCK_DV"] == t.block_dv and t.num_warps in (4, 8)


def test_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
            "import torch\n"
            "from deploykit.errors import UserError\n"
            "from deploykit.plugins.linear_attention import triton_kernel as tk\n"
            "assert tk.launch_grid(1, 2, 3, 64, 32) == (4, 1, 1)\n"
            "try:\n"
            "    x = torch.zeros(1, 1, 4, 16)\n"
            "    tk.linear_attention_triton(x, x, x)\n"
            "except UserError as e:\n"
            "    assert 'triton' in str(e)\n"
            "else:\n"
            "    raise SystemExit('no error')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


# ----------------------------------------------------------------------------------------------------
# interpreter parity (one child process for every case)

@pytest.fixture(scope="module")
def interpreter_results():
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", _INTERPRETER_SCRIPT], input=json.dumps(CASES), env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    line = [x for x in run.stdout.splitlines() if x.startswith("RESULTS")][-1]
    return json.loads(line[len("RESULTS"):])


@pytest.mark.parametrize("name", list(CASES))
def test_interpreter_parity(interpreter_results, name):
    case, res = CASES[name], interpreter_results[name]
    assert res["shape"] == [case["B"], case["H"], case["N"], case["DV"]]
    if case["int8"]:
        assert res["dtype"] == "torch.int8"
        assert res["max_lsb"] <= 1 and res["mismatch"] < 0.02, res
        return
    assert res["dtype"] == f"torch.{case['dtype']}"
    assert res["finite"]
    tol = TOL[case["dtype"]]
    assert res["err"] < tol, f"{name}: error {res['err']:.2e} vs reference (tolerance {tol:.0e})"
    if "err_naive" in res:
        assert res["err_naive"] < tol, f"{name}: error {res['err_naive']:.2e} vs the naive definition"
    if "err_fp16_reference" in res:
        assert res["err_fp16_reference"] < TOL_FP16_REFERENCE, res
