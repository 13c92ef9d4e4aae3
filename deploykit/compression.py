"""Compressed models: sizes, operation counts, and exact ONNX rewrites of compressed weights.

Generic over full-precision, binary and sparse models. A module tells these functions how
it is compressed through an optional ``compression_info()`` method returning a dict; every
key is optional and a module without the method is full precision:

``storage_bits``    ``{local parameter name: bits needed to store it}``. Parameters not named
                    are stored as 32-bit floats. (A binary weight: 1 bit per element.)
``binary_weights``  how many weight elements the module stores as 1 bit.
``scales``          how many of its parameters are quantization scales (kept as 32-bit floats).
``weight_bits``     linears: 1 when the weight used in the forward is binary, else 32.
``input_bits``      linears: 1 when the input used in the forward is binary, else 32.
``probabilities``   attention probability modules (``AttentionCore.prob_fn``): ``"binary"``
                    (0/1 attention, A.V becomes additions), ``"sparse"`` (A.V only over the
                    non-zeros) or ``"float"``.
``scaled``          with ``"binary"`` probabilities: each row is multiplied by one float.

Operation-count convention (BiViT, ICCV 2023; also Bi-Real Net, ReActNet):
``OPs = BOPs / 64 + FLOPs``, where FLOPs are *float multiply-accumulates* (one MAC = one
FLOP, not two) and BOPs are *binary* multiply-accumulates (XNOR + popcount), counted only
when **both** operands are binary (binary weights and binary inputs). A linear with binary
weights and float inputs still counts FLOPs (reported separately as
``linear_binary_weight_flops``): its products are sign flips of the inputs, but the
convention only discounts fully binary products.

Attention: ``Q.K^T`` is ``B*H*T*S*d`` float MACs. ``A.V`` with float ``A`` is
``B*H*T*S*d_v`` float MACs; with binary ``A`` it needs no multiplication, only one addition
per selected key and output element: ``nnz(A) * d_v`` additions, measured on the example
(the selected keys depend on the data). Those additions enter FLOPs one for one (an upper
bound: an addition is no dearer than a MAC), plus ``B*H*T*d_v`` multiplies for a scaled
binary ``A``; ``attention_av_dense_macs`` keeps what a dense float ``MatMul`` would execute.
Softmax, norms, activations and other element-wise work are not counted; only linears,
convolutions and the two attention products are.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

BOPS_PER_OP = 64       # OPs = BOPs / 64 + FLOPs

# ONNX Runtime (CPU) fuses ``DequantizeLinear(int8 weight) -> MatMul`` into ``MatMulNBits``
# and by default runs it with int8 *activations* (accuracy level 4): not the graph's float
# arithmetic. Accuracy level 1 keeps the fused 8-bit weight storage and computes in fp32,
# which reproduces the float graph (verified bit for bit on the binary test models).
from deploykit import runners as _runners  # noqa: E402

ORT_EXACT_SESSION_CONFIG = _runners.ORT_EXACT_SESSION_CONFIG   # one definition; OrtRunner sets it


# ----------------------------------------------------------------------------- torch: sizes and counts
def _info(module: nn.Module) -> dict[str, Any]:
    fn = getattr(module, "compression_info", None)
    return dict(fn()) if callable(fn) else {}


def parameter_stats(module: nn.Module) -> dict[str, int]:
    """Parameter count and storage: ``float_bytes`` (every parameter as fp32) and
    ``packed_bytes`` (each parameter stored as its module declares, rounded up to whole
    bytes per tensor; 4 bytes per element otherwise)."""
    params = float_bytes = packed_bytes = binary = scales = 0
    seen: set[int] = set()
    for m in module.modules():
        info = _info(m)
        bits = info.get("storage_bits", {})
        binary += int(info.get("binary_weights", 0))
        scales += int(info.get("scales", 0))
        for name, p in m.named_parameters(recurse=False):
            if id(p) in seen:               # shared (tied) parameters are stored once
                continue
            seen.add(id(p))
            params += p.numel()
            float_bytes += 4 * p.numel()
            packed_bytes += math.ceil(bits[name] / 8) if name in bits else 4 * p.numel()
    return {"parameters": params, "float_bytes": float_bytes, "packed_bytes": packed_bytes,
            "binary_weights": binary, "scales": scales}


def _call(module: nn.Module, example_inputs: Any) -> None:
    if isinstance(example_inputs, dict):
        module(**{k: torch.as_tensor(v) for k, v in example_inputs.items()})
    elif isinstance(example_inputs, (tuple, list)):
        module(*[torch.as_tensor(v) for v in example_inputs])
    else:
        module(torch.as_tensor(example_inputs))


def _attention_kind(m: nn.Module) -> str | None:
    from deploykit.recipes.attention import AttentionCore, is_hf_self_attention, is_timm_attention

    if isinstance(m, AttentionCore):
        return "core"
    if is_hf_self_attention(m) and not isinstance(getattr(m, "core", None), AttentionCore):
        return "hf"
    if is_timm_attention(m) and not isinstance(getattr(m, "core", None), AttentionCore):
        return "timm"
    return None


class _OpCounter:
    """Forward hooks that count one forward's MACs by kind (see the module docstring)."""

    def __init__(self) -> None:
        self.counts = {"linear_float_flops": 0, "linear_binary_weight_flops": 0, "linear_bops": 0,
                       "conv_flops": 0, "attention_qk_flops": 0, "attention_av_flops": 0,
                       "attention_av_adds": 0, "attention_scale_mults": 0, "attention_av_dense_macs": 0,
                       "attention_mixer_flops": 0}
        self.nnz: dict[int, int] = {}        # id(prob module) -> non-zeros of its last output
        self.handles: list = []

    def linear(self, m, args, out):
        x = args[0]
        rows = x.numel() // m.in_features
        macs = rows * m.in_features * m.out_features
        info = _info(m)
        wb, ib = info.get("weight_bits", 32), info.get("input_bits", 32)
        if wb == 1 and ib == 1:
            self.counts["linear_bops"] += macs
        elif wb == 1:
            self.counts["linear_binary_weight_flops"] += macs
        else:
            self.counts["linear_float_flops"] += macs

    def conv(self, m, args, out):
        k = math.prod(m.kernel_size) * (m.in_channels // m.groups)
        self.counts["conv_flops"] += out.numel() * k

    def prob(self, m, args, out):
        self.nnz[id(m)] = int(torch.count_nonzero(out))

    def attention_products(self, b: int, h: int, t: int, s: int, d: int, dv: int, prob: nn.Module | None) -> None:
        counts = self.counts
        counts["attention_qk_flops"] += b * h * t * s * d
        dense = b * h * t * s * dv
        counts["attention_av_dense_macs"] += dense
        info = _info(prob) if prob is not None else {}
        kind = info.get("probabilities", "float")
        if kind == "binary" and id(prob) in self.nnz:
            counts["attention_av_adds"] += self.nnz[id(prob)] * dv
            if info.get("scaled"):
                counts["attention_scale_mults"] += b * h * t * dv
        elif kind == "sparse" and id(prob) in self.nnz:
            counts["attention_av_flops"] += self.nnz[id(prob)] * dv
        else:
            counts["attention_av_flops"] += dense

    def core(self, m, args, out):
        _, q, k, v = args[:4]
        b, h, t, d = q.shape
        s, dv = k.shape[-2], v.shape[-1]
        if m.mixer is None:
            self.attention_products(b, h, t, s, d, dv, m.prob_fn if isinstance(m.prob_fn, nn.Module) else None)
        elif m.mixer.kind == "linear":      # phi(K)^T V, then phi(Q) (K^T V) and the normaliser
            self.counts["attention_mixer_flops"] += 2 * b * h * t * d * dv + b * h * t * d
        else:                               # neighborhood: a window of keys per query
            ks = m.mixer.kernel_size
            window = math.prod(ks) if isinstance(ks, (list, tuple)) else int(ks)
            if m.mixer.grid is not None and not isinstance(ks, (list, tuple)):
                window = int(ks) ** len(m.mixer.grid)
            self.counts["attention_mixer_flops"] += b * h * t * min(window, s) * (d + dv)

    def plain_attention(self, kind):
        def hook(m, args, kwargs, out):
            x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
            b, t = x.shape[0], x.shape[1]
            if kind == "timm":
                h, d = int(m.num_heads), int(m.head_dim)
            else:
                h, d = int(m.num_attention_heads), int(m.attention_head_size)
            self.attention_products(b, h, t, t, d, d, None)
        return hook

    def attach(self, module: nn.Module) -> None:
        for m in module.modules():
            if isinstance(m, nn.Linear):
                self.handles.append(m.register_forward_hook(self.linear))
            elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                self.handles.append(m.register_forward_hook(self.conv))
            kind = _attention_kind(m)
            if kind == "core":
                self.handles.append(m.register_forward_hook(self.core))
                if isinstance(m.prob_fn, nn.Module):
                    self.handles.append(m.prob_fn.register_forward_hook(self.prob))
            elif kind is not None:
                self.handles.append(m.register_forward_hook(self.plain_attention(kind), with_kwargs=True))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def flops(self) -> int:
        c = self.counts
        return (c["linear_float_flops"] + c["linear_binary_weight_flops"] + c["conv_flops"]
                + c["attention_qk_flops"] + c["attention_av_flops"] + c["attention_av_adds"]
                + c["attention_scale_mults"] + c["attention_mixer_flops"])


def model_stats(module: nn.Module, example_inputs: Any) -> dict[str, Any]:
    """Sizes and operation counts of ``module`` for one forward of ``example_inputs``.

    ``example_inputs``: a tensor, a tuple/list of positional inputs, or a dict of keyword
    inputs (numpy arrays are accepted). Pass a batch of one for per-example counts (the
    counts cover the whole batch given). The forward runs in eval mode without gradients;
    each submodule's train/eval mode is restored afterwards.

    Returns ``parameters``, ``float_bytes``, ``packed_bytes``, ``binary_weights``,
    ``scales`` (see :func:`parameter_stats`), ``flops`` (float MACs), ``bops`` (binary
    MACs), ``ops = bops / 64 + flops`` and a ``breakdown`` (see the module docstring for the
    convention).
    """
    counter = _OpCounter()
    counter.attach(module)
    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()
        with torch.no_grad():
            _call(module, example_inputs)
    finally:
        counter.detach()
        for m, mode in modes.items():
            m.training = mode
    flops = counter.flops()
    bops = counter.counts["linear_bops"]
    first = example_inputs if not isinstance(example_inputs, (tuple, list, dict)) else \
        (next(iter(example_inputs.values())) if isinstance(example_inputs, dict) else example_inputs[0])
    return {**parameter_stats(module), "batch": int(np.shape(first)[0]) if np.ndim(first) else 1,
            "flops": int(flops), "bops": int(bops), "ops": bops / BOPS_PER_OP + flops, "breakdown": counter.counts,
            "convention": "OPs = BOPs/64 + FLOPs; FLOPs are float multiply-accumulates (1 MAC = 1 FLOP), "
                          "BOPs binary MACs (binary weights and binary inputs); A.V with binary A counted "
                          "as additions"}


# ----------------------------------------------------------------------------- ONNX: sizes
def onnx_file_stats(path: str | Path) -> dict[str, Any]:
    """File size and what its initializers hold: ``file_bytes``, ``initializer_bytes``
    (elements x element size, also for external data), ``initializers``,
    ``int8_initializers`` / ``int8_initializer_bytes``, ``float_initializer_bytes``,
    ``nodes`` and ``dequantize_nodes``."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    total = int8_count = int8_bytes = float_bytes = 0
    for init in model.graph.initializer:
        dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
        size = math.prod(init.dims) * np.dtype(dtype).itemsize
        total += size
        if init.data_type == onnx.TensorProto.INT8:
            int8_count += 1
            int8_bytes += size
        elif init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                                onnx.TensorProto.BFLOAT16):
            float_bytes += size
    file_bytes = path.stat().st_size + sum(p.stat().st_size for p in _external_files(model, path.parent))
    return {"file_bytes": int(file_bytes), "initializer_bytes": int(total), "initializers": len(model.graph.initializer),
            "int8_initializers": int8_count, "int8_initializer_bytes": int(int8_bytes),
            "float_initializer_bytes": int(float_bytes), "nodes": len(model.graph.node),
            "dequantize_nodes": sum(n.op_type == "DequantizeLinear" for n in model.graph.node)}


def _external_files(model: onnx.ModelProto, folder: Path) -> list[Path]:
    names = {e.value for i in model.graph.initializer for e in i.external_data if e.key == "location"}
    return [folder / n for n in sorted(names) if (folder / n).is_file()]


# ----------------------------------------------------------------------------- ONNX: binary initializers
def _channel_axis(graph_consumers: dict[str, list[tuple[onnx.NodeProto, int]]], name: str) -> int | None:
    """The output-channel axis of the 2-D weight ``name`` from how every consumer reads it:
    ``MatMul(x, W)`` -> 1 (``W`` is ``[in, out]``), ``Gemm(x, W, transB=1)`` -> 0,
    ``Gemm(x, W)`` -> 1, ``Transpose(perm=[1, 0]) -> MatMul/Gemm`` -> the mapped axis.
    ``None`` when any consumer reads it otherwise (or they disagree)."""
    axes = set()
    for node, index in graph_consumers.get(name, []):
        if node.op_type == "MatMul" and index == 1:
            axes.add(1)
        elif node.op_type == "Gemm" and index == 1:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axes.add(0 if trans_b else 1)
        elif node.op_type == "Transpose":
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
            if perm != [1, 0]:
                return None
            inner = _channel_axis(graph_consumers, node.output[0])
            if inner is None:
                return None
            axes.add(1 - inner)
        else:
            return None
    return axes.pop() if len(axes) == 1 else None


def binary_channels(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``(int8 signs, scales)`` when every slice of ``weight`` along ``axis`` takes only the
    values ``+s_c`` and ``-s_c`` (``s_c > 0``, finite) and ``signs * s_c`` reproduces
    ``weight`` bit for bit; otherwise ``None``."""
    if weight.ndim != 2 or weight.dtype != np.float32:
        return None
    mags = np.abs(weight)
    other = 1 - axis
    scale = mags.max(axis=other)
    if not np.all(np.isfinite(scale)) or not np.all(scale > 0):
        return None
    if not np.all(mags == np.expand_dims(scale, other)):
        return None
    signs = np.where(weight > 0, 1, -1).astype(np.int8)          # no zeros: |w| = s_c > 0
    rebuilt = signs.astype(np.float32) * np.expand_dims(scale, other).astype(np.float32)
    if not np.array_equal(rebuilt.view(np.uint32), weight.view(np.uint32)):
        return None
    return signs, scale.astype(np.float32)


def binarize_initializers(model: onnx.ModelProto, *, min_channel_size: int = 8) -> list[dict[str, Any]]:
    """Store binary weights as int8 ``±1`` + a per-channel float scale + ``DequantizeLinear``.

    Finds float32 2-D initializers read as the weight of ``MatMul`` (``[in, out]``) or
    ``Gemm`` (``transB`` 0 or 1, also through a ``Transpose``) whose every output channel
    takes only the values ``±s_c``, and replaces each, in place, by an int8 initializer of
    the signs, a float32 scale vector and ``DequantizeLinear(axis = output-channel axis)``
    producing the original value name, so its consumers are unchanged. A weight is only
    rewritten when ``int8 * scale`` reproduces the original floats bit for bit; the graph
    then computes exactly what it computed before (ONNX Runtime dequantizes with one float
    multiply by ``±1``, which is exact). Channels shorter than ``min_channel_size`` are left
    alone (an int8 copy plus a scale would not be smaller).

    Run the result in ONNX Runtime with :data:`ORT_EXACT_SESSION_CONFIG` (session config
    entries): its default CPU session fuses each weight-only ``DequantizeLinear -> MatMul``
    into ``MatMulNBits`` computed on int8-quantized activations, which is an approximation.
    The rewritten graph records ``deploykit.binary_initializers`` (the count) in its metadata.

    Returns one entry per rewritten weight: ``name``, ``shape``, ``axis``, ``channels``,
    ``consumers``, ``float_bytes``, ``int8_bytes``, ``scale_bytes``. Calibration refuses
    graphs that already hold Q/DQ, so run this as the last step on an exported FP32 graph.
    """
    graph = model.graph
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    graph_inputs = {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    from deploykit.onnx_utils import name_allocator

    fresh = name_allocator(model)

    done: list[dict[str, Any]] = []
    new_nodes = []
    for init in list(graph.initializer):
        if init.name in graph_inputs or init.name in outputs or len(init.dims) != 2 \
                or init.data_type != onnx.TensorProto.FLOAT or init.name not in consumers:
            continue
        axis = _channel_axis(consumers, init.name)
        if axis is None or init.dims[1 - axis] < min_channel_size:
            continue
        weight = numpy_helper.to_array(init)
        found = binary_channels(weight, axis)
        if found is None:
            continue
        signs, scale = found
        q_name, s_name = fresh(f"{init.name}_int8"), fresh(f"{init.name}_scale")
        graph.initializer.remove(init)
        graph.initializer.append(numpy_helper.from_array(signs, q_name))
        graph.initializer.append(numpy_helper.from_array(scale, s_name))
        new_nodes.append(helper.make_node("DequantizeLinear", [q_name, s_name], [init.name], axis=axis,
                                          name=fresh(f"{init.name}_DequantizeLinear")))
        done.append({"name": init.name, "shape": list(weight.shape), "axis": axis, "channels": int(scale.size),
                     "consumers": [n.name or n.op_type for n, _ in consumers[init.name]],
                     "float_bytes": int(weight.nbytes), "int8_bytes": int(signs.nbytes),
                     "scale_bytes": int(scale.nbytes)})
    for node in reversed(new_nodes):        # initializers only: placing them first keeps the order topological
        graph.node.insert(0, node)
    if done:
        from deploykit.onnx_utils import set_metadata

        set_metadata(model, {"binary_initializers": len(done)})
    return done
