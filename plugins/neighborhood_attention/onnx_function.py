"""Neighborhood attention in ONNX: one ``deploykit`` node plus a local function ORT can run.

``NeighborhoodAttention1D`` (q, k, v: B, H, L, D; key_mask: B, L bool) and
``NeighborhoodAttention2D`` (B, H, X, Y, D; key_mask: B, X, Y) carry the attributes ``kernel_size``, ``dilation``, ``is_causal`` (ints, one per axis),
``scale`` (float) and ``plugin_namespace = "deploykit"`` (TensorRT looks the plugin up by
name and namespace). Names avoid every op TensorRT imports (e.g. ``Attention``).

The decomposition follows reference.py: per axis, the window of each query is computed
from the *dynamic* length (Range/Mod/Div/Min/Max), the ``prod(k)`` neighbour keys and
values are gathered (O(N*k) memory, never N x N), and softmax runs over the neighbours.
``key_mask`` (True = a real token) is always an input; models without padding pass
all-True (the exporter does it for them). In 1-D it marks right padding and each row's
windows are placed on its own length (gathered per row with GatherND), as in reference.py;
in 2-D it removes keys from the windows.
"""

from __future__ import annotations

from typing import Sequence

import onnx
import torch

from deploykit.plugins.common import DOMAIN, PLUGIN_NAMESPACE, script_env
from deploykit.plugins.neighborhood_attention.reference import check_window, neighborhood_attention, per_axis

OP_1D = "NeighborhoodAttention1D"
OP_2D = "NeighborhoodAttention2D"


def _window_functions(onnxscript, op, dk):
    """The helpers both ops call: one axis's window, and attention over gathered neighbours."""

    @onnxscript.script(dk, default_opset=op)
    def AxisWindow(length, real_length, kernel, dilation, causal):
        """(index, valid) for one axis of ``length`` positions whose first ``real_length`` are
        real: (L, k), or (B, L, k) when real_length is (B, 1). NATTEN's rules (reference.py)."""
        zero = op.Constant(value_int=0)
        one = op.Constant(value_int=1)
        i = op.Range(zero, length, one)
        g = op.Mod(i, dilation)
        j = op.Div(i, dilation)
        group_len = op.Max(op.Div(real_length - g + dilation - one, dilation), zero)
        width = op.Min(group_len, kernel)                  # a group shorter than k: all of it
        centred = op.Min(op.Max(j - op.Div(kernel, op.Constant(value_int=2)), zero), group_len - width)
        start = op.Where(causal, op.Expand(j - kernel + one, op.Shape(centred)), centred)
        last = op.Constant(value_ints=[-1])
        t = op.Range(zero, kernel, one)
        m = op.Unsqueeze(start, last) + t
        valid = op.Or(op.And(causal, op.GreaterOrEqual(m, zero)),          # (ORT has no boolean Where)
                      op.And(op.Not(causal), op.Less(t, op.Unsqueeze(width, last))))
        m = op.Min(op.Max(m, zero), op.Unsqueeze(op.Max(group_len - one, zero), last))
        index = op.Min(op.Unsqueeze(g, last) + m * dilation, length - one)
        return index, valid

    @onnxscript.script(dk, default_opset=op)
    def AttendNeighbours(q, keys, values, allowed, scale: float):
        """q (B, H, N, D), keys/values (B, H, N, K, D), allowed (B, N, K) -> (B, H, N, Dv)."""
        # Mul + ReduceSum rather than N batched (1 x D)(D x K) MatMuls: measured faster on ORT CPU.
        scaled = op.Unsqueeze(q * op.CastLike(op.Constant(value_float=scale), q), op.Constant(value_ints=[3]))
        scores = op.ReduceSum(scaled * keys, op.Constant(value_ints=[-1]), keepdims=0)      # (B, H, N, K)
        allowed = op.Unsqueeze(allowed, op.Constant(value_ints=[1]))                       # (B, 1, N, K)
        scores = op.Where(allowed, scores, op.CastLike(op.Constant(value_float=float("-inf")), q))
        probs = op.Where(allowed, op.Softmax(scores, axis=-1), op.CastLike(op.Constant(value_float=0.0), q))
        return op.ReduceSum(op.Unsqueeze(probs, op.Constant(value_ints=[-1])) * values, op.Constant(value_ints=[3]),
                            keepdims=0)

    return AxisWindow, AttendNeighbours


def _float_functions(onnxscript, op, dk, AxisWindow, AttendNeighbours):
    """The float ops, 1-D and 2-D, over the window helpers."""

    @onnxscript.script(dk, default_opset=op)
    def NeighborhoodAttention1D(q, k, v, key_mask, kernel_size: Sequence[int], dilation: Sequence[int],
                                is_causal: Sequence[int], scale: float, plugin_namespace: str):
        first = op.Constant(value_ints=[0])
        kernel = op.Squeeze(op.Gather(op.Constant(value_ints=kernel_size), first), first)
        dil = op.Squeeze(op.Gather(op.Constant(value_ints=dilation), first), first)
        causal = op.Cast(op.Squeeze(op.Gather(op.Constant(value_ints=is_causal), first), first), to=9)
        shape = op.Shape(q)
        length = op.Squeeze(op.Gather(shape, op.Constant(value_ints=[2])), first)
        # Right padding: each row's windows are placed on its own length (reference.py).
        real = op.ReduceSum(op.Cast(key_mask, to=7), op.Constant(value_ints=[1]), keepdims=1)    # (B, 1)
        index, valid = AxisWindow(length, real, kernel, dil, causal)                              # (B, L, k)
        batch = op.Slice(shape, first, op.Constant(value_ints=[1]))
        flat = op.Reshape(index, op.Concat(batch, op.Constant(value_ints=[-1]), axis=0))          # (B, L*k)
        rows = op.Unsqueeze(flat, op.Constant(value_ints=[2]))
        window = op.Shape(index)
        keys = op.GatherND(op.Transpose(k, perm=[0, 2, 1, 3]), rows, batch_dims=1)                 # (B, L*k, H, D)
        values = op.GatherND(op.Transpose(v, perm=[0, 2, 1, 3]), rows, batch_dims=1)
        heads = op.Slice(shape, op.Constant(value_ints=[1]), op.Constant(value_ints=[2]))
        keys = op.Transpose(op.Reshape(keys, op.Concat(window, heads, op.Constant(value_ints=[-1]), axis=0)),
                            perm=[0, 3, 1, 2, 4])                                                 # (B, H, L, k, D)
        values = op.Transpose(op.Reshape(values, op.Concat(window, heads, op.Constant(value_ints=[-1]), axis=0)),
                              perm=[0, 3, 1, 2, 4])
        allowed = op.And(valid, op.Reshape(op.GatherElements(key_mask, flat, axis=1), window))
        out = AttendNeighbours(q, keys, values, allowed, scale=scale)
        # padded queries output 0, as in reference.py
        return op.Where(op.Unsqueeze(key_mask, op.Constant(value_ints=[1, 3])), out,
                        op.CastLike(op.Constant(value_float=0.0), out))

    @onnxscript.script(dk, default_opset=op)
    def NeighborhoodAttention2D(q, k, v, key_mask, kernel_size: Sequence[int], dilation: Sequence[int],
                                is_causal: Sequence[int], scale: float, plugin_namespace: str):
        a0 = op.Constant(value_ints=[0])
        a1 = op.Constant(value_ints=[1])
        kernels = op.Constant(value_ints=kernel_size)
        dils = op.Constant(value_ints=dilation)
        causals = op.Cast(op.Constant(value_ints=is_causal), to=9)
        shape = op.Shape(q)
        nx = op.Squeeze(op.Gather(shape, op.Constant(value_ints=[2])), a0)
        ny = op.Squeeze(op.Gather(shape, op.Constant(value_ints=[3])), a0)
        ix, vx = AxisWindow(nx, nx, op.Squeeze(op.Gather(kernels, a0), a0), op.Squeeze(op.Gather(dils, a0), a0),
                            op.Squeeze(op.Gather(causals, a0), a0))
        iy, vy = AxisWindow(ny, ny, op.Squeeze(op.Gather(kernels, a1), a0), op.Squeeze(op.Gather(dils, a1), a0),
                            op.Squeeze(op.Gather(causals, a1), a0))
        # (X, 1, kx, 1) * Y + (1, Y, 1, ky) -> (X, Y, kx, ky) -> (X*Y, kx*ky), row-major like reference.py
        flat = op.Unsqueeze(ix, op.Constant(value_ints=[1, 3])) * ny + op.Unsqueeze(iy, op.Constant(value_ints=[0, 2]))
        valid = op.And(op.Unsqueeze(vx, op.Constant(value_ints=[1, 3])), op.Unsqueeze(vy, op.Constant(value_ints=[0, 2])))
        flat = op.Reshape(flat, op.Concat(op.Unsqueeze(nx * ny, a0), op.Constant(value_ints=[-1]), axis=0))
        valid = op.Reshape(valid, op.Shape(flat))
        head = op.Slice(shape, a0, op.Constant(value_ints=[2]))
        seq = op.Concat(head, op.Constant(value_ints=[-1]), op.Slice(shape, op.Constant(value_ints=[4]),
                                                                     op.Constant(value_ints=[5])), axis=0)
        vseq = op.Concat(head, op.Constant(value_ints=[-1]), op.Slice(op.Shape(v), op.Constant(value_ints=[4]),
                                                                      op.Constant(value_ints=[5])), axis=0)
        keys = op.Gather(op.Reshape(k, seq), flat, axis=2)
        values = op.Gather(op.Reshape(v, vseq), flat, axis=2)
        mask = op.Reshape(key_mask, op.Concat(op.Slice(shape, a0, a1), op.Constant(value_ints=[-1]), axis=0))
        allowed = op.And(op.Unsqueeze(valid, a0), op.Gather(mask, flat, axis=1))                   # (B, N, K)
        out = AttendNeighbours(op.Reshape(q, seq), keys, values, allowed, scale=scale)
        out_shape = op.Concat(op.Slice(shape, a0, op.Constant(value_ints=[4])), op.Slice(
            op.Shape(v), op.Constant(value_ints=[4]), op.Constant(value_ints=[5])), axis=0)
        return op.Reshape(out, out_shape)

    return NeighborhoodAttention1D, NeighborhoodAttention2D


def _int8_functions(onnxscript, op, dk, NeighborhoodAttention1D, NeighborhoodAttention2D):
    """The INT8 forms, each around its float op."""

    # INT8 forms (Q -> op -> DQ): q, k, v arrive as symmetric int8 from their QuantizeLinear, the
    # output leaves as int8 for its DequantizeLinear; the scales are the very initializers those
    # Q/DQ nodes use. ORT runs DQ -> float op -> Q, equal to the Q/DQ graph it replaces; a
    # TensorRT plugin takes the int8 tensors directly. The zero points are explicit: ORT's
    # QDQ propagation copies a DequantizeLinear as a Q/DQ pair, and a QuantizeLinear without
    # a zero point is uint8 (negative values would clip to 0).
    @onnxscript.script(dk, default_opset=op)
    def NeighborhoodAttention1DInt8(q, k, v, key_mask, q_scale, k_scale, v_scale, y_scale,
                                    kernel_size: Sequence[int], dilation: Sequence[int], is_causal: Sequence[int],
                                    scale: float, plugin_namespace: str):
        zero = op.Cast(op.Constant(value_int=0), to=3)
        y = NeighborhoodAttention1D(op.DequantizeLinear(q, q_scale, zero), op.DequantizeLinear(k, k_scale, zero),
                                    op.DequantizeLinear(v, v_scale, zero), key_mask, kernel_size=kernel_size,
                                    dilation=dilation, is_causal=is_causal, scale=scale,
                                    plugin_namespace=plugin_namespace)
        return op.QuantizeLinear(y, y_scale, zero)

    @onnxscript.script(dk, default_opset=op)
    def NeighborhoodAttention2DInt8(q, k, v, key_mask, q_scale, k_scale, v_scale, y_scale,
                                    kernel_size: Sequence[int], dilation: Sequence[int], is_causal: Sequence[int],
                                    scale: float, plugin_namespace: str):
        zero = op.Cast(op.Constant(value_int=0), to=3)
        y = NeighborhoodAttention2D(op.DequantizeLinear(q, q_scale, zero), op.DequantizeLinear(k, k_scale, zero),
                                    op.DequantizeLinear(v, v_scale, zero), key_mask, kernel_size=kernel_size,
                                    dilation=dilation, is_causal=is_causal, scale=scale,
                                    plugin_namespace=plugin_namespace)
        return op.QuantizeLinear(y, y_scale, zero)

    return NeighborhoodAttention1DInt8, NeighborhoodAttention2DInt8


def _functions():
    onnxscript, op, dk = script_env()
    helpers = _window_functions(onnxscript, op, dk)
    floats = _float_functions(onnxscript, op, dk, *helpers)
    return [*helpers, *floats, *_int8_functions(onnxscript, op, dk, *floats)]


def function_protos() -> list[onnx.FunctionProto]:
    return [f.to_function_proto() for f in _functions()]


def na_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size, dilation=1, is_causal=False,
          scale: float | None = None, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Neighborhood attention for models: the reference in torch, one deploykit node in ONNX export."""
    ndim = q.dim() - 3
    if ndim not in (1, 2) or not torch.onnx.is_in_onnx_export():
        return neighborhood_attention(q, k, v, kernel_size, dilation, is_causal, scale=scale, key_mask=key_mask)
    if key_mask is None:
        key_mask = torch.ones_like(q[:, 0, ..., 0], dtype=torch.bool)
    kernels = [int(x) for x in per_axis(kernel_size, ndim, "kernel_size")]
    dilations = [int(x) for x in per_axis(dilation, ndim, "dilation")]
    causals = [int(bool(x)) for x in per_axis(is_causal, ndim, "is_causal")]
    for axis, (n, kk, dd) in enumerate(zip(q.shape[2:-1], kernels, dilations)):
        if isinstance(n, int):
            check_window(n, kk, dd, axis)
    attrs = {"kernel_size": kernels, "dilation": dilations, "is_causal": causals,
             "scale": float(q.shape[-1] ** -0.5 if scale is None else scale), "plugin_namespace": PLUGIN_NAMESPACE}
    return torch.onnx.ops.symbolic(f"{DOMAIN}::{OP_1D if ndim == 1 else OP_2D}", (q, k, v, key_mask.bool()), attrs,
                                   dtype=q.dtype, shape=(*q.shape[:-1], v.shape[-1]), version=1)
