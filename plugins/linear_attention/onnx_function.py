"""Linear attention in ONNX: one ``deploykit::LinearAttention`` node plus a local function.

Attributes: ``feature_map`` (0 elu+1, 1 relu, 2 sigmoid), ``is_causal``, ``normalize``
(ints), ``decay`` (floats, one per head or one for all; 1 = none), ``chunk_size``, ``eps``,
``plugin_namespace = "deploykit"``. Inputs q, k (B, H, N, D), v (B, H, N, Dv), key_mask
(B, N) bool, always present (all True without padding): padded keys get ``phi(k) = 0``.

Decomposition (reference.py's math, memory linear in N):

* non-causal: ``phi(Q) (phi(K)^T V)`` and the matching denominator: two MatMuls;
* causal: the sequence is zero-padded to a multiple of ``chunk_size`` C and cut into chunks;
  inside a chunk a (C x C) masked, decayed product; across chunks each chunk's summary
  ``sum_t lam^(C-1-t) phi(k_t) v_t^T`` is combined by a (chunks x chunks) decay matrix
  ``lam^(C (c - 1 - c'))`` for c' < c, so no (N x N) tensor and no loop. Padded keys sit
  after every real query and never reach one; the padded rows are sliced off.
"""

from __future__ import annotations

from typing import Sequence

import onnx
import torch

from deploykit.plugins.common import DOMAIN, PLUGIN_NAMESPACE, script_env
from deploykit.plugins.linear_attention.reference import EPS, FEATURE_MAPS, linear_attention

OP = "LinearAttention"


def _feature_map_function(onnxscript, op, dk):
    @onnxscript.script(dk, default_opset=op)
    def FeatureMap(x, feature_map: int):
        code = op.Constant(value_int=feature_map)
        if code == 0:
            y = op.Elu(x) + op.CastLike(op.Constant(value_float=1.0), x)
        else:
            if code == 1:
                y = op.Relu(x)
            else:
                y = op.Sigmoid(x)
        return y

    return FeatureMap


def _float_function(onnxscript, op, dk, FeatureMap):
    @onnxscript.script(dk, default_opset=op)
    def LinearAttention(q, k, v, key_mask, feature_map: int, is_causal: int, normalize: int, decay: Sequence[float],
                        chunk_size: int, eps: float, plugin_namespace: str):
        fq = FeatureMap(q, feature_map=feature_map)
        fk = FeatureMap(k, feature_map=feature_map) * op.CastLike(
            op.Unsqueeze(key_mask, op.Constant(value_ints=[1, 3])), k)
        epsilon = op.CastLike(op.Constant(value_float=eps), q)
        causal = op.Constant(value_int=is_causal)
        if causal == 0:
            num = op.MatMul(fq, op.MatMul(op.Transpose(fk, perm=[0, 1, 3, 2]), v))
            den = op.MatMul(fq, op.Transpose(op.ReduceSum(fk, op.Constant(value_ints=[2]), keepdims=1),
                                             perm=[0, 1, 3, 2]))
        else:
            shape = op.Shape(q)
            n = op.Gather(shape, op.Constant(value_ints=[2]))
            c = op.Unsqueeze(op.Constant(value_int=chunk_size), op.Constant(value_ints=[0]))
            pad = op.Mod(c - op.Mod(n, c), c)
            pads = op.Concat(op.Constant(value_ints=[0, 0, 0, 0, 0, 0]), pad, op.Constant(value_ints=[0]), axis=0)
            nc = op.Div(n + pad, c)
            fq_p = op.Pad(fq, pads)
            fk_p = op.Pad(fk, pads)
            v_p = op.Pad(v, pads)
            head = op.Slice(shape, op.Constant(value_ints=[0]), op.Constant(value_ints=[2]))
            d = op.Slice(shape, op.Constant(value_ints=[3]), op.Constant(value_ints=[4]))
            dv = op.Slice(op.Shape(v), op.Constant(value_ints=[3]), op.Constant(value_ints=[4]))
            qc = op.Reshape(fq_p, op.Concat(head, nc, c, d, axis=0))          # (B, H, nc, C, D)
            kc = op.Reshape(fk_p, op.Concat(head, nc, c, d, axis=0))
            vc = op.Reshape(v_p, op.Concat(head, nc, c, dv, axis=0))
            lam = op.CastLike(op.Reshape(op.Constant(value_floats=decay), op.Constant(value_ints=[-1, 1, 1])), q)
            zero = op.Constant(value_int=0)
            one = op.Constant(value_int=1)
            pos = op.CastLike(op.Range(zero, op.Squeeze(c, op.Constant(value_ints=[0])), one), q)   # (C,)
            dist = op.Unsqueeze(pos, op.Constant(value_ints=[1])) - op.Unsqueeze(pos, op.Constant(value_ints=[0]))
            zf = op.CastLike(op.Constant(value_float=0.0), q)
            causal_c = op.CastLike(op.GreaterOrEqual(dist, zf), q)
            intra = causal_c * op.Pow(lam, op.Max(dist, zf))                    # (H|1, C, C)
            scores = op.MatMul(qc, op.Transpose(kc, perm=[0, 1, 2, 4, 3])) * op.Unsqueeze(intra, op.Constant(
                value_ints=[1]))                                                 # (B, H, nc, C, C)
            q_decay = op.Pow(op.Reshape(lam, op.Constant(value_ints=[-1, 1, 1, 1])),
                             op.Reshape(pos + op.CastLike(one, q), op.Constant(value_ints=[1, 1, -1, 1])))
            k_decay = op.Pow(op.Reshape(lam, op.Constant(value_ints=[-1, 1, 1, 1])),
                             op.Reshape(op.CastLike(c - one, q) - pos, op.Constant(value_ints=[1, 1, -1, 1])))
            kd = kc * k_decay                                                   # (B, H, nc, C, D)
            kv = op.MatMul(op.Transpose(kd, perm=[0, 1, 2, 4, 3]), vc)          # (B, H, nc, D, Dv)
            ksum = op.ReduceSum(kd, op.Constant(value_ints=[3]), keepdims=0)   # (B, H, nc, D)
            ci = op.CastLike(op.Range(zero, op.Squeeze(nc, op.Constant(value_ints=[0])), one), q)
            cdist = op.Unsqueeze(ci, op.Constant(value_ints=[1])) - op.Unsqueeze(ci, op.Constant(value_ints=[0]))
            before = op.CastLike(op.Greater(cdist, zf), q)                      # c' < c
            cfl = op.CastLike(c, q)
            across = before * op.Pow(lam, op.Max(cdist - op.CastLike(one, q), zf) * cfl)   # (H|1, nc, nc)
            flat_kv = op.Reshape(kv, op.Concat(head, nc, op.Constant(value_ints=[-1]), axis=0))
            state = op.Reshape(op.MatMul(across, flat_kv), op.Shape(kv))        # (B, H, nc, D, Dv)
            zstate = op.MatMul(across, ksum)                                    # (B, H, nc, D)
            qd = qc * q_decay
            num_c = op.MatMul(scores, vc) + op.MatMul(qd, state)
            den_c = op.ReduceSum(scores, op.Constant(value_ints=[-1]), keepdims=1) + op.MatMul(
                qd, op.Unsqueeze(zstate, op.Constant(value_ints=[-1])))
            out_shape = op.Concat(head, op.Constant(value_ints=[-1]), dv, axis=0)
            den_shape = op.Concat(head, op.Constant(value_ints=[-1, 1]), axis=0)
            start = op.Constant(value_ints=[0])
            num = op.Slice(op.Reshape(num_c, out_shape), start, n, op.Constant(value_ints=[2]))
            den = op.Slice(op.Reshape(den_c, den_shape), start, n, op.Constant(value_ints=[2]))
        if op.Constant(value_int=normalize) == 0:
            out = op.Identity(num)
        else:
            out = num / (den + epsilon)
        return out

    return LinearAttention


def _int8_function(onnxscript, op, dk, LinearAttention):
    # INT8 form (Q -> op -> DQ), as NeighborhoodAttention1DInt8: int8 q, k, v and output, scales
    # shared with the Q/DQ nodes around it.
    @onnxscript.script(dk, default_opset=op)
    def LinearAttentionInt8(q, k, v, key_mask, q_scale, k_scale, v_scale, y_scale, feature_map: int,
                            is_causal: int, normalize: int, decay: Sequence[float], chunk_size: int, eps: float,
                            plugin_namespace: str):
        zero = op.Cast(op.Constant(value_int=0), to=3)
        y = LinearAttention(op.DequantizeLinear(q, q_scale, zero), op.DequantizeLinear(k, k_scale, zero),
                            op.DequantizeLinear(v, v_scale, zero), key_mask, feature_map=feature_map,
                            is_causal=is_causal, normalize=normalize, decay=decay, chunk_size=chunk_size, eps=eps,
                            plugin_namespace=plugin_namespace)
        return op.QuantizeLinear(y, y_scale, zero)

    return LinearAttentionInt8


def _functions():
    onnxscript, op, dk = script_env()
    feature_map = _feature_map_function(onnxscript, op, dk)
    linear = _float_function(onnxscript, op, dk, feature_map)
    return [feature_map, linear, _int8_function(onnxscript, op, dk, linear)]


def function_protos() -> list[onnx.FunctionProto]:
    return [f.to_function_proto() for f in _functions()]


def linear_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, feature: str = "elu1",
                        causal: bool = False, decay=None, normalize: bool = True, chunk_size: int = 64,
                        eps: float = EPS, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Linear attention for models: the reference in torch, one deploykit node in ONNX export."""
    if not torch.onnx.is_in_onnx_export():
        return linear_attention(q, k, v, feature=feature, causal=causal, decay=decay, normalize=normalize,
                                chunk_size=chunk_size, eps=eps, key_mask=key_mask)
    if key_mask is None:
        key_mask = torch.ones_like(q[:, 0, :, 0], dtype=torch.bool)
    if feature not in FEATURE_MAPS:
        linear_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], feature=feature)   # raises the one-line error
    # Attributes are constants: decay must be Python numbers (a float or one per head) at export.
    decays = [1.0] if decay is None else [float(x) for x in (decay if isinstance(decay, (list, tuple)) else [decay])]
    attrs = {"feature_map": FEATURE_MAPS.index(feature), "is_causal": int(bool(causal)), "normalize": int(normalize),
             "decay": decays, "chunk_size": int(chunk_size), "eps": float(eps), "plugin_namespace": PLUGIN_NAMESPACE}
    return torch.onnx.ops.symbolic(f"{DOMAIN}::{OP}", (q, k, v, key_mask.bool()), attrs, dtype=q.dtype,
                                   shape=(*q.shape[:-1], v.shape[-1]), version=1)
