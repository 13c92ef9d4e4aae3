"""TensorRT plugins for ``deploykit::NeighborhoodAttention1D`` / ``2D`` and their INT8 forms.

Quickly Deployable Plugins (TensorRT >= 10.15 / 11). Importing this module registers them;
``deploykit build`` does it before parsing, and TensorRT's ONNX parser maps each deploykit
node to the plugin of the same name in namespace ``plugin_namespace="deploykit"``. The
attributes are the ONNX node's, with the same names and types (checked against exported
nodes in the tests); ``aot_impl`` compiles ``triton_kernel`` for the build GPU, so an engine
built with ``--aot`` (the default) runs without Python.

Signature (inputs; attributes):

    NeighborhoodAttention1D(q, k, v, key_mask; kernel_size: int32[1], dilation: int32[1],
                            is_causal: int32[1], scale: float) -> out (B, H, L, Dv)
    NeighborhoodAttention2D(...; int32[2] each)             -> out (B, H, X, Y, Dv)
    NeighborhoodAttention{1D,2D}Int8(q, k, v, key_mask, q_scale, k_scale, v_scale, y_scale; same)

Head dims are compiled into the kernel, so they must be static in the network; batch and
the sequence (or grid) are dynamic. The INT8 forms take int8 q, k, v and per-tensor fp32
scales (Q -> plugin -> DQ in the calibrated graph) and return int8.
"""

from __future__ import annotations

from typing import List, Tuple

import numpy as np
import numpy.typing as npt
import tensorrt.plugin as trtp

from deploykit.plugins.neighborhood_attention import triton_kernel as tk
from deploykit.plugins.trt_common import (FLOAT_TYPES, aot_result, compile_fitting, ptx_version, static_dim,
                                         target_cc, torch_views, triton_dtype)

TACTIC_IDS = list(range(1, len(tk.TACTICS) + 1))      # tactic t -> tk.TACTICS[t - 1]


def _combination(int8: bool) -> List[trtp.AutoTuneCombination]:
    c = trtp.AutoTuneCombination()
    if int8:
        c.pos([0, 1, 2, 8], "INT8")
        c.pos([4, 5, 6, 7], "FP32")
    else:
        c.pos([0, 1, 2, 4], FLOAT_TYPES)              # q, k, v, out share one float type
    c.pos(3, "BOOL")
    c.tactics(TACTIC_IDS)
    return [c]


def _aot(ndim, q, v, kernel_size, dilation, is_causal, scale, tactic, int8):
    cc = target_cc()

    def compile_tactic(t):
        return tk.compile_kernel(
            ndim, "int8" if int8 else triton_dtype(q.dtype), kernel_size=[int(x) for x in kernel_size],
            dilation=[int(x) for x in dilation], is_causal=[bool(x) for x in is_causal], scale=float(scale),
            head_dim=static_dim(q.shape_expr[ndim + 2], "the head dim of q"),
            head_dim_v=static_dim(v.shape_expr[ndim + 2], "the head dim of v"), has_mask=True, cc=cc,
            block_m=t.block_m, block_n=t.block_n, num_warps=t.num_warps, num_stages=t.num_stages, int8=int8,
            ptx_version=ptx_version())

    # e.g. fp32 at head dim 128 with 64-key chunks needs > 48 KiB: a smaller tile is used instead
    used, compiled = compile_fitting(compile_tactic, tk.TACTICS, tactic - 1)
    shape = [q.shape_expr[i] for i in range(ndim + 2)]                # B, H, L | B, H, X, Y
    grid = tk.launch_grid(ndim, *shape, block_m=used.block_m, dilation=[int(x) for x in dilation])
    return aot_result(trtp, compiled, grid, shape)


def _run(q, k, v, key_mask, kernel_size, dilation, is_causal, scale, outputs, stream, tactic, scales=()):
    import torch

    tensors = torch_views(q, k, v, key_mask, *scales, outputs[0])
    block_m, block_n, num_warps, num_stages = tk.TACTICS[tactic - 1]
    kwargs = dict(kernel_size=[int(x) for x in kernel_size], dilation=[int(x) for x in dilation],
                  is_causal=[bool(x) for x in is_causal], scale=float(scale), key_mask=tensors[3],
                  block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages)
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        if scales:
            y = tk.neighborhood_attention_int8_triton(*tensors[:3], *tensors[4:8], **kwargs)
        else:
            y = tk.neighborhood_attention_triton(*tensors[:3], **kwargs)
        tensors[-1].copy_(y)


# ----------------------------------------------------------------------------- 1-D
@trtp.register("deploykit::NeighborhoodAttention1D")
def na1d_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, key_mask: trtp.TensorDesc,
              kernel_size: npt.NDArray[np.int32], dilation: npt.NDArray[np.int32],
              is_causal: npt.NDArray[np.int32], scale: float) -> trtp.TensorDesc:
    return v.like()                                   # (B, H, L, Dv)


@trtp.autotune("deploykit::NeighborhoodAttention1D")
def na1d_autotune(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, key_mask: trtp.TensorDesc,
                  kernel_size: npt.NDArray[np.int32], dilation: npt.NDArray[np.int32],
                  is_causal: npt.NDArray[np.int32], scale: float,
                  outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
    return _combination(int8=False)


@trtp.aot_impl("deploykit::NeighborhoodAttention1D")
def na1d_aot(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, key_mask: trtp.TensorDesc,
             kernel_size: npt.NDArray[np.int32], dilation: npt.NDArray[np.int32],
             is_causal: npt.NDArray[np.int32], scale: float, outputs: Tuple[trtp.TensorDesc], tactic: int):
    return _aot(1, q, v, kernel_size, dilation, is_causal, scale, tactic, int8=False)


@trtp.impl("deploykit::NeighborhoodAttention1D")
def na1d_impl(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, key_mask: trtp.Tensor,
              kernel_size: npt.NDArray[np.int32], dilation: npt.NDArray[np.int32],
              is_causal: npt.NDArray[np.int32], scale: float, outputs: Tuple[trtp.Tensor], stream: int,
              tactic: int) -> None:
    _run(q, k, v, key_mask, kernel_size, dilation, is_causal, scale, outputs, stream, tactic)


# ----------------------------------------------------------------------------- 2-D
@trtp.register("deploykit::NeighborhoodAttention2D")
def na2d_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, key_mask: trtp.TensorDesc,
              kernel_size: npt.NDArray[np.int32], dilation: npt.NDArray[np.int32],
              is_causal: npt.NDArray[np.int32], scale: float) -> trtp.TensorDesc:
    return v.like()                                   # (B, H, X, Y, Dv)


@trtp.autotune("deploykit::NeighborhoodAttention2D")
def na2d_autotune(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, key_mask: trtp.TensorDesc,
                  kernel_size: npt.NDArray[np.int32], dilation: npt.NDArray[np.int32],
                  is_causal: npt.NDArray[np.int32], scale: float,
                  outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
    return _combination(int8=False)


@trtp.aot_impl("deploykit::NeighborhoodAttention2D")
def na2d_aot(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, key_mask: trtp.TensorDesc,
             kernel_size: npt.NDArray[np.int32], dilation: npt.NDArray[np.int32],
             is_causal: npt.NDArray[np.int32], scale: float, outputs: Tuple[trtp.TensorDesc], tactic: int):
    return _aot(2, q, v, kernel_size, dilation, is_causal, scale, tactic, int8=False)


@trtp.impl("deploykit::NeighborhoodAttention2D")
def na2d_impl(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, key_mask: trtp.Tensor,
              kernel_size: npt.NDArray[np.int32], dilation: npt.NDArray[np.int32],
              is_causal: npt.NDArray[np.int32], scale: float, outputs: Tuple[trtp.Tensor], stream: int,
              tactic: int) -> None:
    _run(q, k, v, key_mask, kernel_size, dilation, is_causal, scale, outputs, stream, tactic)


# ----------------------------------------------------------------------------- INT8 forms
@trtp.register("deploykit::NeighborhoodAttention1DInt8")
def na1d_int8_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, key_mask: trtp.TensorDesc,
                   q_scale: trtp.TensorDesc, k_scale: trtp.TensorDesc, v_scale: trtp.TensorDesc,
                   y_scale: trtp.TensorDesc, kernel_size: npt.NDArray[np.int32], dilation: npt.NDArray[np.int32],
                   is_causal: npt.NDArray[np.int32], scale: float) -> trtp.TensorDesc:
    return v.like()                                   # int8 (B, H, L, Dv)


@trtp.autotune("deploykit::NeighborhoodAttention1DInt8")
def na1d_int8_autotune(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, key_mask: trtp.TensorDesc,
                       q_scale: trtp.TensorDesc, k_scale: trtp.TensorDesc, v_scale: trtp.TensorDesc,
                       y_scale: trtp.TensorDesc, kernel_size: npt.NDArray[np.int32],
                       dilation: npt.NDArray[np.int32], is_causal: npt.NDArray[np.int32], scale: float,
                       outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
    return _combination(int8=True)


@trtp.aot_impl("deploykit::NeighborhoodAttention1DInt8")
def na1d_int8_aot(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, key_mask: trtp.TensorDesc,
                  q_scale: trtp.TensorDesc, k_scale: trtp.TensorDesc, v_scale: trtp.TensorDesc,
                  y_scale: trtp.TensorDesc, kernel_size: npt.NDArray[np.int32], dilation: npt.NDArray[np.int32],
                  is_causal: npt.NDArray[np.int32], scale: float, outputs: Tuple[trtp.TensorDesc], tactic: int):
    return _aot(1, q, v, kernel_size, dilation, is_causal, scale, tactic, int8=True)


@trtp.impl("deploykit::NeighborhoodAttention1DInt8")
def na1d_int8_impl(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, key_mask: trtp.Tensor, q_scale: trtp.Tensor,
                   k_scale: trtp.Tensor, v_scale: trtp.Tensor, y_scale: trtp.Tensor,
                   kernel_size: npt.NDArray[np.int32], dilation: npt.NDArray[np.int32],
                   is_causal: npt.NDArray[np.int32], scale: float, outputs: Tuple[trtp.Tensor], stream: int,
                   tactic: int) -> None:
    _run(q, k, v, key_mask, kernel_size, dilation, is_causal, scale, outputs, stream, tactic,
         scales=(q_scale, k_scale, v_scale, y_scale))


@trtp.register("deploykit::NeighborhoodAttention2DInt8")
def na2d_int8_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, key_mask: trtp.TensorDesc,
                   q_scale: trtp.TensorDesc, k_scale: trtp.TensorDesc, v_scale: trtp.TensorDesc,
                   y_scale: trtp.TensorDesc, kernel_size: npt.NDArray[np.int32], dilation: npt.NDArray[np.int32],
                   is_causal: npt.NDArray[np.int32], scale: float) -> trtp.TensorDesc:
    return v.like()                                   # int8 (B, H, X, Y, Dv)


@trtp.autotune("deploykit::NeighborhoodAttention2DInt8")
def na2d_int8_autotune(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, key_mask: trtp.TensorDesc,
                       q_scale: trtp.TensorDesc, k_scale: trtp.TensorDesc, v_scale: trtp.TensorDesc,
                       y_scale: trtp.TensorDesc, kernel_size: npt.NDArray[np.int32],
                       dilation: npt.NDArray[np.int32], is_causal: npt.NDArray[np.int32], scale: float,
                       outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
    return _combination(int8=True)


@trtp.aot_impl("deploykit::NeighborhoodAttention2DInt8")
def na2d_int8_aot(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, key_mask: trtp.TensorDesc,
                  q_scale: trtp.TensorDesc, k_scale: trtp.TensorDesc, v_scale: trtp.TensorDesc,
                  y_scale: trtp.TensorDesc, kernel_size: npt.NDArray[np.int32], dilation: npt.NDArray[np.int32],
                  is_causal: npt.NDArray[np.int32], scale: float, outputs: Tuple[trtp.TensorDesc], tactic: int):
    return _aot(2, q, v, kernel_size, dilation, is_causal, scale, tactic, int8=True)


@trtp.impl("deploykit::NeighborhoodAttention2DInt8")
def na2d_int8_impl(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, key_mask: trtp.Tensor, q_scale: trtp.Tensor,
                   k_scale: trtp.Tensor, v_scale: trtp.Tensor, y_scale: trtp.Tensor,
                   kernel_size: npt.NDArray[np.int32], dilation: npt.NDArray[np.int32],
                   is_causal: npt.NDArray[np.int32], scale: float, outputs: Tuple[trtp.Tensor], stream: int,
                   tactic: int) -> None:
    _run(q, k, v, key_mask, kernel_size, dilation, is_causal, scale, outputs, stream, tactic,
         scales=(q_scale, k_scale, v_scale, y_scale))
