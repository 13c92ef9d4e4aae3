"""TensorRT plugins for ``deploykit::LinearAttention`` and ``deploykit::LinearAttentionInt8``.

Quickly Deployable Plugins (TensorRT >= 10.15 / 11). Importing this module registers them;
``deploykit build`` does it before parsing, and TensorRT's ONNX parser maps each deploykit
node to the plugin of the same name in namespace ``plugin_namespace="deploykit"``. The
attributes below are the ONNX node's, with the same names and types (``tests`` check the
two against each other); ``aot_impl`` compiles ``triton_kernel`` for the build GPU, so an
engine built with ``--aot`` (the default) runs without Python.

Signature (inputs, then attributes):

    LinearAttention(q, k, v, key_mask; feature_map: int, is_causal: int, normalize: int,
                    decay: float32[], chunk_size: int, eps: float) -> out (B, H, N, Dv)
    LinearAttentionInt8(q, k, v, key_mask, q_scale, k_scale, v_scale, y_scale; same attributes)

The INT8 form takes int8 q, k, v (Q -> plugin -> DQ in the calibrated graph) and per-tensor
fp32 scales, and returns int8.
"""

from __future__ import annotations

from typing import List, Tuple

import numpy as np
import numpy.typing as npt
import tensorrt.plugin as trtp

from deploykit.plugins.linear_attention import triton_kernel as tk
from deploykit.plugins.trt_common import (FLOAT_TYPES, aot_result, compile_fitting, ptx_version, static_dim,
                                         target_cc, torch_views, triton_dtype)

TACTIC_IDS = list(range(1, len(tk.TACTICS) + 1))      # tactic t -> tk.TACTICS[t - 1]


@trtp.register("deploykit::LinearAttention")
def linear_attention_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, key_mask: trtp.TensorDesc,
                          feature_map: int, is_causal: int, normalize: int, decay: npt.NDArray[np.float32],
                          chunk_size: int, eps: float) -> trtp.TensorDesc:
    return v.like()                                   # (B, H, N, Dv), the I/O type


@trtp.autotune("deploykit::LinearAttention")
def linear_attention_autotune(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc,
                              key_mask: trtp.TensorDesc, feature_map: int, is_causal: int, normalize: int,
                              decay: npt.NDArray[np.float32], chunk_size: int, eps: float,
                              outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
    c = trtp.AutoTuneCombination()
    c.pos([0, 1, 2, 4], FLOAT_TYPES)                  # q, k, v, out share one float type
    c.pos(3, "BOOL")
    c.tactics(TACTIC_IDS)
    return [c]


def _aot(q, v, feature_map, is_causal, normalize, decay, chunk_size, eps, tactic, int8):
    heads = q.shape_expr[1]
    cc = target_cc()

    def compile_tactic(t):
        return tk.compile_kernel(
            "fp32" if int8 else triton_dtype(q.dtype), feature_map=int(feature_map), is_causal=bool(is_causal),
            normalize=bool(normalize), decay=[float(x) for x in decay], chunk_size=t.chunk, eps=float(eps),
            head_dim=static_dim(q.shape_expr[3], "the head dim of q"),
            head_dim_v=static_dim(v.shape_expr[3], "the head dim of v"),
            heads=int(heads.constant_value) if heads.is_constant else None, has_mask=True, cc=cc,
            block_dv=t.block_dv, num_warps=t.num_warps, num_stages=t.num_stages, int8=int8,
            ptx_version=ptx_version())

    # The chunk is a tactic (the attribute chunk_size only shapes the ONNX decomposition;
    # every chunk size computes the same function).
    used, compiled = compile_fitting(compile_tactic, tk.TACTICS, tactic - 1)
    B, H, N = q.shape_expr[0], q.shape_expr[1], q.shape_expr[2]
    dv = static_dim(v.shape_expr[3], "the head dim of v")
    grid = tk.launch_grid(B, H, N, dv, min(used.block_dv, dv))
    return aot_result(trtp, compiled, grid, (B, H, N))


@trtp.aot_impl("deploykit::LinearAttention")
def linear_attention_aot(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, key_mask: trtp.TensorDesc,
                         feature_map: int, is_causal: int, normalize: int, decay: npt.NDArray[np.float32],
                         chunk_size: int, eps: float, outputs: Tuple[trtp.TensorDesc], tactic: int):
    return _aot(q, v, feature_map, is_causal, normalize, decay, chunk_size, eps, tactic, int8=False)


@trtp.impl("deploykit::LinearAttention")
def linear_attention_impl(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, key_mask: trtp.Tensor, feature_map: int,
                          is_causal: int, normalize: int, decay: npt.NDArray[np.float32], chunk_size: int,
                          eps: float, outputs: Tuple[trtp.Tensor], stream: int, tactic: int) -> None:
    import torch

    from deploykit.plugins.linear_attention.reference import FEATURE_MAPS

    tq, tk_, tv, mask, out = torch_views(q, k, v, key_mask, outputs[0])
    t = tk.TACTICS[tactic - 1]
    decays = [float(x) for x in decay]
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        out.copy_(tk.linear_attention_triton(
            tq, tk_, tv, feature=FEATURE_MAPS[int(feature_map)], causal=bool(is_causal),
            decay=None if all(x == 1.0 for x in decays) else decays, normalize=bool(normalize),
            chunk_size=t.chunk, eps=float(eps), key_mask=mask, block_dv=t.block_dv))


# ----------------------------------------------------------------------------- INT8 form
@trtp.register("deploykit::LinearAttentionInt8")
def linear_attention_int8_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc,
                               key_mask: trtp.TensorDesc, q_scale: trtp.TensorDesc, k_scale: trtp.TensorDesc,
                               v_scale: trtp.TensorDesc, y_scale: trtp.TensorDesc, feature_map: int, is_causal: int,
                               normalize: int, decay: npt.NDArray[np.float32], chunk_size: int,
                               eps: float) -> trtp.TensorDesc:
    return v.like()                                   # int8 (B, H, N, Dv)


@trtp.autotune("deploykit::LinearAttentionInt8")
def linear_attention_int8_autotune(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc,
                                   key_mask: trtp.TensorDesc, q_scale: trtp.TensorDesc, k_scale: trtp.TensorDesc,
                                   v_scale: trtp.TensorDesc, y_scale: trtp.TensorDesc, feature_map: int,
                                   is_causal: int, normalize: int, decay: npt.NDArray[np.float32], chunk_size: int,
                                   eps: float, outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
    c = trtp.AutoTuneCombination()
    c.pos([0, 1, 2, 8], "INT8")
    c.pos(3, "BOOL")
    c.pos([4, 5, 6, 7], "FP32")
    c.tactics(TACTIC_IDS)
    return [c]


@trtp.aot_impl("deploykit::LinearAttentionInt8")
def linear_attention_int8_aot(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc,
                              key_mask: trtp.TensorDesc, q_scale: trtp.TensorDesc, k_scale: trtp.TensorDesc,
                              v_scale: trtp.TensorDesc, y_scale: trtp.TensorDesc, feature_map: int, is_causal: int,
                              normalize: int, decay: npt.NDArray[np.float32], chunk_size: int, eps: float,
                              outputs: Tuple[trtp.TensorDesc], tactic: int):
    return _aot(q, v, feature_map, is_causal, normalize, decay, chunk_size, eps, tactic, int8=True)


@trtp.impl("deploykit::LinearAttentionInt8")
def linear_attention_int8_impl(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, key_mask: trtp.Tensor,
                               q_scale: trtp.Tensor, k_scale: trtp.Tensor, v_scale: trtp.Tensor,
                               y_scale: trtp.Tensor, feature_map: int, is_causal: int, normalize: int,
                               decay: npt.NDArray[np.float32], chunk_size: int, eps: float,
                               outputs: Tuple[trtp.Tensor], stream: int, tactic: int) -> None:
    import torch

    from deploykit.plugins.linear_attention.reference import FEATURE_MAPS

    tq, tk_, tv, mask, qs, ks, vs, ys, out = torch_views(q, k, v, key_mask, q_scale, k_scale, v_scale, y_scale,
                                                         outputs[0])
    t = tk.TACTICS[tactic - 1]
    decays = [float(x) for x in decay]
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        out.copy_(tk.linear_attention_int8_triton(
            tq, tk_, tv, qs, ks, vs, ys, feature=FEATURE_MAPS[int(feature_map)], causal=bool(is_causal),
            decay=None if all(x == 1.0 for x in decays) else decays, normalize=bool(normalize),
            chunk_size=t.chunk, eps=float(eps), key_mask=mask, block_dv=t.block_dv))
