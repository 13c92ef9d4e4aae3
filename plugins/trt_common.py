"""Shared pieces of deploykit's TensorRT plugins (``<op>/trt_plugin.py``).

The plugins are Quickly Deployable Plugins (``tensorrt.plugin``): ``@trtp.register`` gives the
signature and output shape, ``@trtp.autotune`` the type combinations and tactics,
``@trtp.aot_impl`` a Triton kernel compiled to PTX for the GPU the engine is built on (so the
engine runs without Python), and ``@trtp.impl`` the same kernel launched from Python (the
``--jit`` build). This module holds what needs no TensorRT: dtype names, the target compute
capability, and turning a compiled kernel into the AOT tuple.
"""

from __future__ import annotations

import os

# TensorRT DataType names -> Triton's
_TRITON_DTYPES = {"FLOAT": "fp32", "HALF": "fp16", "BF16": "bf16", "INT8": "int8"}
# Float I/O the plugins accept ("|" alternatives, positionally matched across tensors).
FLOAT_TYPES = "FP32|FP16|BF16"


def triton_dtype(trt_dtype) -> str:
    """``trt.DataType.HALF`` -> ``"fp16"`` (and FLOAT, BF16, INT8)."""
    name = getattr(trt_dtype, "name", str(trt_dtype)).split(".")[-1].upper()
    if name not in _TRITON_DTYPES:
        raise ValueError(f"deploykit plugins take fp32, fp16, bf16 (or int8 in the INT8 forms), not {name}")
    return _TRITON_DTYPES[name]


def ptx_version() -> int:
    """The PTX ISA the plugins' kernels declare: 8.0 (CUDA 12.0 drivers and newer; enough for
    sm_80..sm_90), so an engine loads on any driver TensorRT 10.15+ supports, not only on
    drivers as new as Triton's bundled ptxas. ``DEPLOYKIT_PTX_VERSION`` overrides it."""
    return int(os.environ.get("DEPLOYKIT_PTX_VERSION", "80"))


def target_cc() -> int:
    """Compute capability the engine is built for, as an int (9.0 -> 90): the current CUDA
    device, or ``DEPLOYKIT_CUDA_CC`` (e.g. 87 to build for Jetson Orin elsewhere)."""
    forced = os.environ.get("DEPLOYKIT_CUDA_CC")
    if forced:
        return int(forced)
    import torch

    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def static_dim(expr, what: str) -> int:
    """A shape expression TensorRT knows at build time (head dims are compiled into the kernel)."""
    if not expr.is_constant:
        raise ValueError(f"{what} must be static in the network (it is compiled into the kernel)")
    return int(expr.constant_value)


# Dynamic shared memory a kernel may use without the launcher opting in to more (cudaFuncSetAttribute).
DEFAULT_SHARED_LIMIT = 48 * 1024


def compile_fitting(compile_tactic, tactics, first: int):
    """(tactic, ``compile_tactic(tactic)``) for tactic index ``first``, or, when its shared
    memory exceeds what every launcher grants, for the next tactics in order."""
    order = [first] + [i for i in range(len(tactics)) if i != first]
    for index in order:
        compiled = compile_tactic(tactics[index])
        if compiled.metadata.shared <= DEFAULT_SHARED_LIMIT:
            return tactics[index], compiled
    raise ValueError(f"no tactic fits in {DEFAULT_SHARED_LIMIT} bytes of shared memory")


def aot_result(trtp, compiled, grid, scalars):
    """(kernel name, PTX, launch parameters, extra int32 arguments) as ``@trtp.aot_impl`` returns.

    ``grid`` holds shape expressions (or ints), ``scalars`` the shape expressions passed
    between the input and output pointers."""
    params = trtp.KernelLaunchParams()
    params.grid_x, params.grid_y, params.grid_z = grid
    params.block_x = compiled.metadata.num_warps * 32
    params.shared_mem = compiled.metadata.shared
    extra = trtp.SymIntExprs(len(scalars))
    for i, value in enumerate(scalars):
        extra[i] = trtp.SymInt32(value)
    return compiled.metadata.name.encode(), compiled.asm["ptx"].encode(), params, extra


def torch_views(*tensors):
    """torch views of ``trtp.Tensor`` objects (they expose ``__cuda_array_interface__``)."""
    import torch

    return [torch.as_tensor(t, device="cuda") for t in tensors]
