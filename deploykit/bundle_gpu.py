"""GPU pieces of an edge bundle: a TensorRT calibration cache and the plugin kernels' PTX.

Two functions an edge-bundle packager calls when it packages for a GPU target.

``calibration_cache(ranges, trt_version, fp32_model)``
    deploykit's calibration ranges (``<int8 model>.ranges.json``, written by
    ``deploykit.quantize.calibrate``; or its ``tensors`` mapping; or the ``TensorRange``
    objects of ``CalibrationResult.ranges``) as a TensorRT *implicit* INT8 calibration
    cache. TensorRT < 11 (e.g. JetPack 6 on Jetson Orin: TensorRT 10.3) builds INT8 from
    such a cache without running calibration (``trtexec --int8 --calib=<file>`` or an
    ``IInt8EntropyCalibrator2`` whose ``read_calibration_cache`` returns it). The ranges are
    keyed by the FP32 network's tensor names: ``calibrate`` collects them on the
    shape-inferred FP32 graph, whose names are the exported model's; TensorRT's ONNX parser
    names its tensors after the ONNX ones, so the cache applies to the FP32 ONNX model as is.
    Ranges collected on a SmoothQuant-smoothed graph belong to that graph, not to the FP32
    one, and are refused.

    The format is text: a header line ``TRT-<NV_TENSORRT_VERSION>-EntropyCalibration2``, then
    one line ``<tensor name>: <8 hex digits>`` per tensor, the hex being the big-endian
    IEEE-754 float32 bit pattern of the scale ``amax / 127``. Checked against:

    * ONNX Runtime's TensorRT execution provider, ``ReadDynamicRange`` in
      ``tensorrt_execution_provider_utils.h``: "Native TensorRT generated calibration table
      ... tensor name : scale in 32-bit single precision IEEE754 format", example
      ``TRT-7103-EntropyCalibration2`` / ``data_0: 4000889d``; it parses the hex with
      ``strtoul(.., 16)`` as the float's bit pattern and takes ``dynamic range = scale * 127``.
    * NVIDIA TAO Toolkit's exporters (``nvidia_tao_tf1 .. export``,
      ``_calibration_cache_from_dict``): ``"TRT-{}-EntropyCalibration2"`` header, then
      ``tensor + ": " + hex(bits of float32(amax / 127.0))`` per tensor, with the version
      number ``NV_TENSORRT_MAJOR * 1000 + NV_TENSORRT_MINOR * 100 + NV_TENSORRT_PATCH``
      (TensorRT 8: ``TRT-8601-..``).
    * NVIDIA/TensorRT ``include/NvInferRuntimeBase.h`` (TensorRT 10):
      ``NV_TENSORRT_VERSION_INT(major, minor, patch) ((major) *10000L + (minor) *100L +
      (patch) *1L)``, so TensorRT 10.3.0 writes ``TRT-100300-EntropyCalibration2``
      (public TensorRT 10.3 caches read ``TRT-100300-EntropyCalibration2``). TensorRT checks
      the header against its own version: the cache must name the target's exact version.

    Symmetric INT8: ``amax = max(|lo|, |hi|)`` of the calibrated range (the one the Q/DQ
    model uses); tensors whose range saw NaN/inf or mask sentinels (kept float by
    ``calibrate``), or whose amax is zero or not finite, are left out: TensorRT then keeps
    the layers around them in float. deploykit calibrates the inputs (and outputs) of the
    quantized op types only (MatMul / Gemm for ``gpu-trt``), so the cache holds those.

``plugin_ptx(model, compute_capability)``
    The PTX the TensorRT plugins' ``aot_impl`` (``plugins/*/trt_plugin.py``) would compile for
    every ``deploykit`` node of ``model``, for a target GPU (``"8.7"``: Jetson Orin), with no
    GPU here: the node's attributes, fp32 for the float ops and int8 for the ``*Int8`` forms,
    the kernel's default tactic (falling back like the plugin when it needs more than 48 KiB
    of shared memory), the PTX ISA of ``trt_common.ptx_version()`` (8.0 unless
    ``DEPLOYKIT_PTX_VERSION`` says otherwise). Head dims are compiled into the kernels, so
    they must be static: they come from ONNX shape inference (it sees through the model's
    local functions), the model's own value_info, or a walk back through Reshape /
    Transpose / Q / DQ; a node whose head dim cannot be found is skipped with a note.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import math
import re
import struct
from collections.abc import Mapping
from typing import Any

import onnx
from onnx import numpy_helper

from deploykit.errors import UserError
from deploykit.plugins import DOMAIN, INT8_FORMS

log = logging.getLogger(__name__)

ALGORITHM = "EntropyCalibration2"
INT8_MAX = 127.0
_HEADER = re.compile(r"^TRT-(\d+)-(\w+)$")


# ----------------------------------------------------------------------------- calibration cache
def trt_version_number(trt_version: str) -> int:
    """``"10.3.0"`` -> 100300 (NV_TENSORRT_VERSION: major * 10000 + minor * 100 + patch from
    TensorRT 10 on, major * 1000 + minor * 100 + patch before)."""
    m = re.fullmatch(r"\s*(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:\.\d+)?\s*", str(trt_version))
    if not m:
        raise UserError(f"TensorRT version '{trt_version}' is not of the form major.minor.patch",
                        fix="give e.g. 10.3.0 (Jetson Orin, JetPack 6)")
    major, minor, patch = (int(x) if x else 0 for x in m.groups())
    if minor > 99 or patch > 99:
        raise UserError(f"TensorRT version '{trt_version}' has a minor or patch number above 99",
                        fix="give the version as TensorRT prints it, e.g. 10.3.0")
    if major >= 11:
        raise UserError(f"TensorRT {trt_version} builds INT8 only from explicit Q/DQ (no calibration cache)",
                        fix="ship the Q/DQ model for TensorRT >= 11; the cache is for TensorRT < 11")
    return major * (10000 if major >= 10 else 1000) + minor * 100 + patch


def _range_bounds(value: Any) -> tuple[float, float, bool]:
    """(lo, hi, masked) of one entry: a TensorRange, its ``to_dict()``, or a (lo, hi) pair."""
    if isinstance(value, Mapping):
        lo = value.get("lo", value.get("min"))
        hi = value.get("hi", value.get("max"))
        masked = bool(value.get("masked", False) or value.get("nonfinite", 0) or value.get("sentinel", 0))
    elif hasattr(value, "lo") and hasattr(value, "hi"):
        lo, hi, masked = value.lo, value.hi, bool(getattr(value, "masked", False))
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        (lo, hi), masked = value, False
    else:
        raise UserError(f"calibration range {value!r} is neither a TensorRange, its dict nor a (lo, hi) pair",
                        fix="pass the .ranges.json written by deploykit calibrate (or its 'tensors')")
    if lo is None or hi is None:
        raise UserError(f"calibration range {value!r} has no lo/hi", fix="pass deploykit's .ranges.json")
    return float(lo), float(hi), masked


def _tensor_ranges(ranges: Mapping[str, Any]) -> Mapping[str, Any]:
    """The per-tensor mapping of ``ranges`` (a whole .ranges.json document or the mapping itself);
    refuses ranges collected on a smoothed graph."""
    if "tensors" in ranges and isinstance(ranges["tensors"], Mapping):
        if ranges.get("smoothing"):
            raise UserError(
                "the ranges were collected on a SmoothQuant-smoothed graph: its activations differ from the "
                "FP32 model's, so a calibration cache for the FP32 network would carry wrong scales",
                fix="calibrate without SmoothQuant (quantize.smoothquant.alpha: null) for an implicit-INT8 "
                    "target, or ship the Q/DQ model")
        return ranges["tensors"]
    return ranges


def _network_tensors(model: onnx.ModelProto) -> set[str]:
    """Activation tensor names of the FP32 network: graph inputs, node outputs, graph outputs."""
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        raise UserError("fp32_model holds Q/DQ nodes: the calibration cache is for the FP32 network",
                        fix="pass the FP32 export the ranges were calibrated on")
    names = {i.name for i in model.graph.input} | {o.name for o in model.graph.output}
    names |= {o for n in model.graph.node for o in n.output if o}
    return names - {i.name for i in model.graph.initializer}


def calibration_cache(ranges: Mapping[str, Any], trt_version: str = "10.3.0",
                      fp32_model: onnx.ModelProto | None = None) -> str:
    """TensorRT implicit-INT8 calibration cache text (``TRT-<version>-EntropyCalibration2``)
    from deploykit's calibration ranges.

    ``ranges``: the ``.ranges.json`` document ``deploykit calibrate`` writes next to the Q/DQ
    model (or its ``"tensors"`` mapping, or ``{name: TensorRange}``). ``trt_version``: the
    target's TensorRT (< 11), whose version the header must name. ``fp32_model``: when given,
    only tensors of that network are written, and ranges matching none of them are an error.
    """
    version = trt_version_number(trt_version)
    tensors = _tensor_ranges(ranges)
    present = _network_tensors(fp32_model) if fp32_model is not None else None
    lines = [f"TRT-{version}-{ALGORITHM}"]
    skipped: dict[str, list[str]] = {"masked": [], "zero or non-finite": [], "not in the FP32 model": []}
    for name, value in tensors.items():
        name = str(name)
        if "\n" in name or "\r" in name:
            raise UserError(f"tensor name {name!r} holds a line break; a calibration cache cannot name it",
                            fix="rename the tensor in the ONNX model")
        lo, hi, masked = _range_bounds(value)
        if masked:
            skipped["masked"].append(name)
            continue
        amax = max(abs(lo), abs(hi))
        scale = amax / INT8_MAX
        if not math.isfinite(amax) or amax == 0.0 or not 0.0 < abs(_f32(scale)) < math.inf:
            skipped["zero or non-finite"].append(name)
            continue
        if present is not None and name not in present:
            skipped["not in the FP32 model"].append(name)
            continue
        lines.append(f"{name}: {struct.pack('>f', scale).hex()}")
    if present is not None and len(lines) == 1 and skipped["not in the FP32 model"]:
        missing = skipped["not in the FP32 model"]
        raise UserError(f"none of the calibrated tensors is in fp32_model (e.g. {', '.join(missing[:3])})",
                        fix="pass the FP32 model the ranges were calibrated on")
    for why, names in skipped.items():
        if names:
            log.info("calibration cache: %d tensor(s) left out (%s): %s", len(names), why, ", ".join(names[:10]))
    return "\n".join(lines) + "\n"


def _f32(x: float) -> float:
    """``x`` rounded to float32 (inf when it overflows)."""
    try:
        return struct.unpack(">f", struct.pack(">f", x))[0]
    except OverflowError:
        return math.inf


def read_calibration_cache(text: str) -> dict[str, float]:
    """``{tensor name: scale}`` of a TensorRT calibration cache (the scales as float32 values;
    the dynamic range TensorRT uses is ``127 * scale``)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or not _HEADER.match(lines[0].strip()):
        raise UserError("not a TensorRT calibration cache (no 'TRT-<version>-<algorithm>' header)",
                        fix="give the text of a calibration cache")
    out: dict[str, float] = {}
    for line in lines[1:]:
        name, sep, bits = line.rpartition(":")
        bits = bits.strip()
        if not sep or not re.fullmatch(r"[0-9a-fA-F]{1,8}", bits):
            raise UserError(f"calibration cache line {line!r} is not '<tensor>: <hex float32>'",
                            fix="give the text of a calibration cache")
        out[name] = struct.unpack(">f", int(bits, 16).to_bytes(4, "big"))[0]
    return out


# ----------------------------------------------------------------------------- plugin PTX
def parse_compute_capability(compute_capability: str | int) -> int:
    """``"8.7"`` / ``"87"`` / ``"sm_87"`` -> 87."""
    text = str(compute_capability).strip().lower().removeprefix("sm_").removeprefix("sm")
    m = re.fullmatch(r"(\d+)\.(\d)", text)
    if m:
        return int(m.group(1)) * 10 + int(m.group(2))
    if re.fullmatch(r"\d{2,3}", text):
        return int(text)
    raise UserError(f"compute capability '{compute_capability}' is not like 8.7",
                    fix="give major.minor, e.g. 8.7 (Jetson Orin), 8.6, 8.9, 9.0")


_INT8_OPS = tuple(INT8_FORMS.values())
_NA_OPS = ("NeighborhoodAttention1D", "NeighborhoodAttention2D",
           "NeighborhoodAttention1DInt8", "NeighborhoodAttention2DInt8")
_LINEAR_OPS = ("LinearAttention", "LinearAttentionInt8")
# ops whose output has its first input's shape (a walk back for a static dim passes through)
_SAME_SHAPE = {"QuantizeLinear", "DequantizeLinear", "Cast", "CastLike", "Identity", "Relu", "Elu", "Sigmoid",
               "Neg", "Abs", "Erf", "Tanh", "Softplus", "Dropout"}


class _Shapes:
    """Static dims of a model's tensors: shape inference (through the local functions), the
    model's own value_info, and a walk back through Reshape / Transpose / Q / DQ."""

    def __init__(self, model: onnx.ModelProto, notes: list[str]):
        self.dims: dict[str, list[int | None]] = {}
        self._add(model.graph)
        try:
            self._add(onnx.shape_inference.infer_shapes(model, data_prop=True).graph)
        except Exception as exc:  # noqa: BLE001 - a model shape inference cannot handle still has value_info
            notes.append(f"onnx shape inference failed ({type(exc).__name__}: {exc}); using the model's value_info")
        self.producer = {o: n for n in model.graph.node for o in n.output if o}
        self.constants = {i.name: i for i in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for a in node.attribute:
                    if a.name == "value":
                        self.constants[node.output[0]] = a.t

    def _add(self, graph: onnx.GraphProto) -> None:
        for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
            t = vi.type.tensor_type
            if not vi.type.HasField("tensor_type") or not t.HasField("shape"):
                continue
            dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim]
            old = self.dims.get(vi.name)
            if old is not None and len(old) == len(dims):
                dims = [a if a is not None else b for a, b in zip(old, dims)]
            self.dims[vi.name] = dims

    def rank(self, name: str) -> int | None:
        dims = self.dims.get(name)
        return None if dims is None else len(dims)

    def dim(self, name: str, axis: int, depth: int = 0) -> int | None:
        """Static size of ``axis`` (negative: from the end) of ``name``, or None."""
        dims = self.dims.get(name)
        if dims is not None and -len(dims) <= axis < len(dims) and dims[axis] is not None:
            return dims[axis]
        node = self.producer.get(name)
        if node is None or depth > 32 or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "Reshape" and len(node.input) > 1 and node.input[1] in self.constants:
            shape = numpy_helper.to_array(self.constants[node.input[1]]).reshape(-1).tolist()
            if -len(shape) <= axis < len(shape) and int(shape[axis]) > 0:
                return int(shape[axis])
            return None
        if node.op_type == "Transpose":
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            if perm is None:   # default: reverse the axes
                rank = self.rank(node.input[0]) or self.rank(name)
                if rank is None:
                    return None
                perm = list(range(rank))[::-1]
            rank = len(perm)
            if not -rank <= axis < rank:
                return None
            return self.dim(node.input[0], perm[axis % rank] - rank, depth + 1)
        if node.op_type in _SAME_SHAPE:
            return self.dim(node.input[0], axis, depth + 1)
        return None


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _ints(value: Any, n: int) -> list[int]:
    values = [int(x) for x in (value if isinstance(value, (list, tuple)) else [value])]
    return values * n if len(values) == 1 else values


def _axes(values: list[int]) -> str:
    return "x".join(str(v) for v in values)


def _head_dims(node: onnx.NodeProto, shapes: _Shapes) -> tuple[int, int] | str:
    """(q's head dim, v's head dim) of an attention node, or why they are not static."""
    head_dim = shapes.dim(node.input[0], -1)
    head_dim_v = shapes.dim(node.input[2], -1) if len(node.input) > 2 else None
    if head_dim_v is None and node.output:
        head_dim_v = shapes.dim(node.output[0], -1)
    if head_dim is None or head_dim_v is None:
        return (f"the head dim of q ({node.input[0]})" if head_dim is None else
                f"the head dim of v ({node.input[2]})") + " is not static in the model"
    return head_dim, head_dim_v


def _na_job(node: onnx.NodeProto, shapes: _Shapes) -> tuple[dict[str, Any], str] | str:
    """(compile arguments, file stem) for a neighborhood-attention node, or why it is skipped."""
    ndim = 2 if "2D" in node.op_type else 1
    a = _attrs(node)
    kernel = _ints(a.get("kernel_size", 1), ndim)
    dilation = _ints(a.get("dilation", 1), ndim)
    causal = [bool(x) for x in _ints(a.get("is_causal", 0), ndim)]
    dims = _head_dims(node, shapes)
    if isinstance(dims, str):
        return dims
    head_dim, head_dim_v = dims
    scale = float(a["scale"]) if "scale" in a else head_dim ** -0.5
    int8 = node.op_type in _INT8_OPS
    args = dict(ndim=ndim, dtype="int8" if int8 else "fp32", kernel_size=kernel, dilation=dilation,
                is_causal=causal, scale=scale, head_dim=head_dim, head_dim_v=head_dim_v, int8=int8)
    hd = f"hd{head_dim}" + (f"x{head_dim_v}" if head_dim_v != head_dim else "")
    causal_tag = ("_causal" if ndim == 1 else f"_causal{_axes([int(c) for c in causal])}") if any(causal) else ""
    stem = f"{node.op_type}_k{_axes(kernel)}_d{_axes(dilation)}{causal_tag}_{hd}_{args['dtype']}"
    return args, stem


def _linear_job(node: onnx.NodeProto, shapes: _Shapes) -> tuple[dict[str, Any], str] | str:
    """(compile arguments, file stem) for a linear-attention node, or why it is skipped."""
    from deploykit.plugins.linear_attention.reference import FEATURE_MAPS

    a = _attrs(node)
    dims = _head_dims(node, shapes)
    if isinstance(dims, str):
        return dims
    head_dim, head_dim_v = dims
    decay = a.get("decay", [1.0])
    decay = [float(x) for x in (decay if isinstance(decay, (list, tuple)) else [decay])]
    feature_map = int(a.get("feature_map", 0))
    int8 = node.op_type in _INT8_OPS
    args = dict(dtype="int8" if int8 else "fp32", feature_map=feature_map, is_causal=bool(a.get("is_causal", 0)),
                normalize=bool(a.get("normalize", 1)), decay=decay, eps=float(a.get("eps", 1e-6)),
                head_dim=head_dim, head_dim_v=head_dim_v, heads=shapes.dim(node.input[0], -3), int8=int8)
    feature = FEATURE_MAPS[feature_map] if 0 <= feature_map < len(FEATURE_MAPS) else f"fm{feature_map}"
    hd = f"hd{head_dim}" + (f"x{head_dim_v}" if head_dim_v != head_dim else "")
    tags = ("_causal" if args["is_causal"] else "") + ("" if all(d == 1.0 for d in decay) else "_decay") + \
        ("" if args["normalize"] else "_unnormalized")
    return args, f"{node.op_type}_{feature}{tags}_{hd}_{args['dtype']}"


def _compile(op_type: str, args: dict[str, Any], cc: int):
    """(tactic used, Triton CompiledKernel) as the plugin's ``aot_impl`` compiles them."""
    from deploykit.plugins.trt_common import compile_fitting, ptx_version

    if op_type in _NA_OPS:
        from deploykit.plugins.neighborhood_attention import triton_kernel as tk

        a = dict(args)
        ndim, dtype = a.pop("ndim"), a.pop("dtype")

        def compile_tactic(t):
            return tk.compile_kernel(ndim, dtype, **a, has_mask=True, cc=cc, block_m=t.block_m,
                                     block_n=t.block_n, num_warps=t.num_warps, num_stages=t.num_stages,
                                     ptx_version=ptx_version())

        first = tk.TACTICS.index(tk.default_tactic(args["head_dim"], args["head_dim_v"]))
        return compile_fitting(compile_tactic, tk.TACTICS, first)
    from deploykit.plugins.linear_attention import triton_kernel as tk

    a = dict(args)
    a.pop("dtype")   # float forms compile fp32 I/O; the Int8 kernel (int8=True) ignores the dtype

    def compile_tactic(t):
        return tk.compile_kernel("fp32", **a, chunk_size=t.chunk, has_mask=True, cc=cc, block_dv=t.block_dv,
                                 num_warps=t.num_warps, num_stages=t.num_stages, ptx_version=ptx_version())

    return compile_fitting(compile_tactic, tk.TACTICS, 0)   # the first tactic: the plugin's tactic 1


def _key(op_type: str, args: dict[str, Any]) -> str:
    return repr((op_type, sorted(args.items())))


def plugin_ptx(model: onnx.ModelProto, compute_capability: str) -> tuple[dict[str, str], list[str]]:
    """``({file name: PTX}, notes)`` of the deploykit plugin kernels ``model`` needs on
    ``compute_capability`` (e.g. ``"8.7"``).

    One file per distinct compilation, named like
    ``NeighborhoodAttention1D_k7_d1_hd32_fp32_sm87.ptx``. Notes name each file's kernel and
    launch parameters and the nodes it serves, and every node skipped (head dim not static,
    a shape the kernels do not support) with the reason. A model without deploykit nodes
    gives ``({}, [])``; without Triton, ``({}, ["triton is not installed: ..."])``.
    """
    cc = parse_compute_capability(compute_capability)
    nodes = [n for n in model.graph.node if n.domain == DOMAIN]
    if not nodes:
        return {}, []
    try:
        importlib.import_module("triton")
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install
        return {}, [f"triton is not installed: {type(exc).__name__}: {exc} (pip install triton, Linux x86_64)"]
    notes: list[str] = []
    shapes = _Shapes(model, notes)
    files: dict[str, str] = {}
    done: dict[str, str] = {}           # compilation key -> file name
    served: dict[str, list[str]] = {}   # file name -> node names
    note_at: dict[str, int] = {}        # file name -> index of its note
    for node in nodes:
        label = f"{node.op_type} node '{node.name or node.output[0]}'"
        if node.op_type in _NA_OPS:
            job = _na_job(node, shapes)
        elif node.op_type in _LINEAR_OPS:
            job = _linear_job(node, shapes)
        else:
            notes.append(f"{label}: skipped, no deploykit plugin kernel for this op")
            continue
        if isinstance(job, str):
            notes.append(f"{label}: skipped, {job} (head dims are compiled into the kernel)")
            continue
        args, stem = job
        key = _key(node.op_type, args)
        if key in done:
            served[done[key]].append(node.name or node.output[0])
            continue
        try:
            tactic, compiled = _compile(node.op_type, args, cc)
        except (UserError, ValueError) as exc:
            notes.append(f"{label}: skipped, the kernel does not compile for these shapes: {exc}")
            continue
        name = f"{stem}_sm{cc}.ptx"
        if name in files:   # same readable name, other attributes (e.g. scale, eps, decay values)
            name = f"{stem}_{hashlib.sha1(key.encode()).hexdigest()[:8]}_sm{cc}.ptx"
        files[name] = compiled.asm["ptx"]
        done[key] = name
        served[name] = [node.name or node.output[0]]
        meta = compiled.metadata
        note_at[name] = len(notes)
        notes.append(f"{name}: kernel {meta.name}, {meta.num_warps * 32} threads per block, {meta.shared} bytes of "
                     f"dynamic shared memory, tactic {tuple(tactic)} ({type(tactic).__name__} "
                     f"{', '.join(tactic._fields)})")
    for name, index in note_at.items():
        notes[index] += f"; node(s) {', '.join(served[name])}"
    return files, notes
