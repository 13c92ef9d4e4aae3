"""ONNX (Q/DQ, deploykit plugins) -> TensorRT engine (its runner: ``deploykit.runners.tensorrt``).

Written to TensorRT's Python API for 10.15+ and 11 (a model without deploykit ops also builds
on 10.0+, e.g. JetPack 6's 10.3, where deploykit ops build from their ONNX-function
decomposition instead of the plugins):

* a **strongly typed** network (explicit quantization: the Q/DQ nodes decide where INT8 runs;
  TensorRT 11 has no other INT8 path), parsed by the ONNX parser;
* deploykit's custom nodes carry ``plugin_namespace="deploykit"``; the plugin definitions
  (``deploykit.plugins.<op>.trt_plugin``, Quickly Deployable Plugins) are imported before
  parsing so the parser finds them, and the build marks each node ``aot=1`` (on a copy; the
  input file is never touched) so the engine holds the AOT-compiled Triton kernels and runs
  without Python;
* one optimization profile from the recipe's shapes (batch and sequence ranges);
* a timing cache, read if present and written back after the build;
* TensorRT's sparse-weights flag when the model holds 2:4 weights
  (``deploykit.sparsity.check_2_4``): TensorRT may then pick sparse tensor-core kernels for
  those layers (whole-model gains reported elsewhere are 1.05-1.2x, not 2x).

Outputs, each written atomically: ``<name>.engine``, ``<name>.build.log`` (TensorRT's log),
``<name>.json`` (TensorRT version, GPU, compute capability, flags, profile, plugins, the ONNX
file's sha256, build seconds).

Where TensorRT or a CUDA device is missing, :func:`require_tensorrt` says exactly which
(``deploykit doctor`` shows the same facts) and nothing TensorRT is touched: creating a
TensorRT object without a device can crash the process instead of raising.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from deploykit.errors import UserError
from deploykit.io import atomic_path, refuse_overwriting_inputs, write_json

PLUGIN_MODULES = ("deploykit.plugins.neighborhood_attention.trt_plugin",
                  "deploykit.plugins.linear_attention.trt_plugin")


# ----------------------------------------------------------------------------- preconditions
@dataclass
class TrtEnvironment:
    version: str
    gpu: str
    compute_capability: str        # e.g. "9.0"


TENSORRT_MIN = (10, 0)      # the API deploykit's builder and runner use (tensor addresses, execute_async_v3)


def require_tensorrt(where: str | Path | None = None, *, plugins: bool = True) -> TrtEnvironment:
    """A real TensorRT and a CUDA device, or a UserError naming what is missing: >= 10.15 when
    the model has deploykit ops (``plugins``: the ONNX parser's plugin path), else >= 10.0
    (JetPack 6's TensorRT 10.3 builds plain Q/DQ models).

    Uses the probes deploykit doctor shows (:mod:`deploykit.probes`): ``import tensorrt`` runs in
    a child process first (a stub can hang or crash), and the device comes from torch / nvidia-smi."""
    from deploykit.probes import TENSORRT_MIN_FOR_PLUGINS, Context, gpu_info, tensorrt_facts, version_tuple

    minimum = TENSORRT_MIN_FOR_PLUGINS if plugins else TENSORRT_MIN
    need = ".".join(map(str, minimum))
    facts = tensorrt_facts()
    if not facts["real"]:
        raise UserError(f"TensorRT is not usable here: {facts['error']}", path=where,
                        fix=f"install TensorRT >= {need} (tensorrt-cu12 / tensorrt-cu13 from NVIDIA's index) on a "
                            "machine with an NVIDIA GPU; deploykit doctor shows what this machine has")
    if version_tuple(facts["version"])[:2] < minimum:
        why = "deploykit's plugin path (the model has deploykit ops)" if plugins else "deploykit's engine code"
        raise UserError(f"TensorRT {facts['version']} is older than {need}, which {why} needs",
                        path=where, fix=f"install TensorRT >= {need}")
    info = gpu_info(Context())
    if not info.torch_cuda or not info.devices:
        raise UserError(f"no CUDA device usable from here ({info.reason or 'torch.cuda.is_available() is False'})",
                        path=where, fix="build engines on the target GPU machine; deploykit doctor explains why")
    device = info.devices[0]
    cc = ".".join(map(str, device.cc)) if getattr(device, "cc", None) else "unknown"
    return TrtEnvironment(version=facts["version"], gpu=device.name, compute_capability=cc)


def tensorrt_status(*, plugins: bool = False) -> tuple[TrtEnvironment | None, str | None]:
    """``(environment, None)`` where TensorRT and a CUDA device are usable here, else ``(None, why
    not)``: :func:`require_tensorrt`'s checks (a stub ``tensorrt`` is not TensorRT), without raising."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return None, "TensorRT is not installed"
    try:
        return require_tensorrt(plugins=plugins), None
    except UserError as exc:
        return None, exc.message


# ----------------------------------------------------------------------------- shapes
@dataclass
class ShapeRanges:
    """min / opt / max per symbolic axis kind; fixed axes keep their size."""
    batch: tuple[int, int, int] = (1, 8, 32)
    sequence: tuple[int, int, int] = (1, 128, 128)

    @classmethod
    def from_recipe(cls, rec) -> ShapeRanges:
        return cls.from_shapes(rec.bench.batches, rec.bench.seq_len, rec.model.options.get("max_length"))

    @classmethod
    def from_shapes(cls, batches: list[int], seq_len: int, max_length: int | None = None) -> ShapeRanges:
        """Batch 1 .. the largest bench batch (opt: the middle one); sequence 1 .. the model's
        max_length (opt: bench.seq_len)."""
        batches = sorted(batches)
        longest = int(max_length or seq_len)
        return cls(batch=(1, batches[len(batches) // 2], batches[-1]), sequence=(1, min(seq_len, longest), longest))

    def validate(self) -> None:
        for name, (lo, opt, hi) in (("batch", self.batch), ("sequence", self.sequence)):
            if not 1 <= lo <= opt <= hi:
                raise UserError(f"bad {name} range {lo},{opt},{hi}", fix="give min <= opt <= max, all >= 1")


def optimization_profile(model: onnx.ModelProto, ranges: ShapeRanges,
                         where: str | Path = "") -> dict[str, tuple[tuple[int, ...], ...]]:
    """``{input: (min_shape, opt_shape, max_shape)}`` for the model's inputs. A symbolic axis
    named like a batch takes ``ranges.batch``, any other symbolic axis ``ranges.sequence``."""
    ranges.validate()
    profile = {}
    initializers = {i.name for i in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        shapes: list[list[int]] = [[], [], []]
        for axis, dim in enumerate(dims):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                triple = (dim.dim_value,) * 3
            else:
                name = dim.dim_param.lower()
                triple = ranges.batch if (axis == 0 or "batch" in name) else ranges.sequence
            for k in range(3):
                shapes[k].append(int(triple[k]))
        profile[value.name] = tuple(tuple(s) for s in shapes)
    return profile


def plugin_ready_copy(model: onnx.ModelProto, *, aot: bool = True) -> tuple[onnx.ModelProto, list[str]]:
    """A copy whose deploykit nodes ask the parser for the AOT plugin implementation
    (``aot=1``, as TensorRT's ONNX parser expects); the op types found."""
    from deploykit.plugins import DOMAIN, PLUGIN_NAMESPACE

    out = onnx.ModelProto()
    out.CopyFrom(model)
    ops = []
    for node in out.graph.node:
        if node.domain != DOMAIN:
            continue
        ops.append(node.op_type)
        attrs = {a.name: a for a in node.attribute}
        if onnx.helper.get_attribute_value(attrs["plugin_namespace"]).decode() != PLUGIN_NAMESPACE:
            raise UserError(f"node {node.name} names plugin namespace "
                            f"{onnx.helper.get_attribute_value(attrs['plugin_namespace'])!r}",
                            fix=f"re-export: deploykit nodes carry plugin_namespace={PLUGIN_NAMESPACE!r}")
        if aot and "aot" not in attrs:
            node.attribute.append(onnx.helper.make_attribute("aot", 1))
    return out, sorted(set(ops))


# ----------------------------------------------------------------------------- build
@dataclass
class BuildResult:
    engine: Path
    log: Path
    metadata: Path
    info: dict[str, Any] = field(default_factory=dict)


def _logger(trt, lines: list[str], verbose: bool):
    class Collect(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            lines.append(f"[{severity.name}] {msg}")
            if verbose or severity <= trt.ILogger.Severity.WARNING:
                print(f"[TensorRT {severity.name}] {msg}", flush=True)

    return Collect()


def build_engine(onnx_path: str | Path, out_path: str | Path, *, ranges: ShapeRanges | None = None,
                 timing_cache: str | Path | None = None, workspace_mib: int = 4096, aot: bool = True,
                 verbose: bool = False, target: str | None = None) -> BuildResult:
    """Build ``out_path`` (.engine) from ``onnx_path``; see the module docstring."""
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if not onnx_path.is_file():
        raise UserError("ONNX file not found", path=onnx_path, fix="check the path (deploykit export writes one)")
    refuse_overwriting_inputs(out_path, (onnx_path,))
    model = onnx.load(str(onnx_path))
    profile = optimization_profile(model, ranges or ShapeRanges(), onnx_path)
    ready, plugin_ops = plugin_ready_copy(model, aot=aot)
    from deploykit.sparsity import check_2_4

    sparse = check_2_4(model)
    env = require_tensorrt(onnx_path, plugins=False)   # nothing TensorRT is touched before this passes
    ready, decomposed, plugin_ops = _plugin_path(model, ready, plugin_ops, env)
    if target is not None:                     # an engine only runs on the GPU and TensorRT it was built with
        from deploykit.targets import check_engine, get_target

        check_engine({"compute_capability": env.compute_capability, "tensorrt": env.version, "gpu": env.gpu},
                     get_target(target), onnx_path)

    import importlib

    import tensorrt as trt

    for module in PLUGIN_MODULES if plugin_ops else []:    # registers the Quickly Deployable Plugins
        importlib.import_module(module)
    lines: list[str] = []
    logger = _logger(trt, lines, verbose)
    start = time.perf_counter()
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(ready.SerializeToString(), str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT's ONNX parser rejected the model: {errors}", path=onnx_path,
                        fix="see the build log; deploykit doctor checks the TensorRT version")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if sparse["compliant"]:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    opt = builder.create_optimization_profile()
    for name, (lo, mid, hi) in profile.items():
        opt.set_shape(name, lo, mid, hi)
    config.add_optimization_profile(opt)
    cache_path = Path(timing_cache) if timing_cache else out_path.with_suffix(".timing.cache")
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError("TensorRT could not build the engine", path=onnx_path,
                        fix=f"see the build log {out_path.with_suffix('.build.log')}")
    seconds = time.perf_counter() - start
    info = {"tensorrt": trt.__version__, "gpu": env.gpu, "compute_capability": env.compute_capability,
            "flags": {"strongly_typed": bool(flags), "aot_plugins": aot, "sparse_weights": bool(sparse["compliant"])},
            "sparse_2_4_weights": sparse["compliant_names"],
            "profile": {k: [list(s) for s in v] for k, v in profile.items()},
            "plugins": plugin_ops, "decomposed_ops": decomposed, "onnx": str(onnx_path), "target": target,
            "onnx_sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
            "workspace_mib": workspace_mib, "timing_cache": str(cache_path), "build_seconds": round(seconds, 2),
            "host": platform.node(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    return _write_build(onnx_path, out_path, serialized, config, cache_path, lines, info)


def _plugin_path(model: onnx.ModelProto, ready: onnx.ModelProto, plugin_ops: list[str],
                 env: TrtEnvironment) -> tuple[onnx.ModelProto, list[str], list[str]]:
    """(model to parse, ops built from their decomposition, ops built as plugins) for this TensorRT."""
    from deploykit.probes import TENSORRT_MIN_FOR_PLUGINS, version_tuple

    if plugin_ops and version_tuple(env.version)[:2] < TENSORRT_MIN_FOR_PLUGINS:
        # Before 10.15 the ONNX parser has no plugin path for these nodes: it builds their
        # ONNX-function decomposition (JetPack 6's TensorRT 10.3), slower but the same function.
        print(f"note: TensorRT {env.version} predates deploykit's plugin path (10.15): {', '.join(plugin_ops)} "
              "build from their ONNX-function decomposition", flush=True)
        return model, plugin_ops, []
    return ready, [], plugin_ops


def _write_build(onnx_path: Path, out_path: Path, serialized, config, cache_path: Path, lines: list[str],
                 info: dict[str, Any]) -> BuildResult:
    """The engine, the timing cache, the build log and the metadata, each written atomically."""
    with atomic_path(out_path, inputs=(onnx_path,)) as tmp:
        tmp.write_bytes(bytes(serialized))
    with atomic_path(cache_path, inputs=(onnx_path,)) as tmp:
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    log_path = out_path.with_suffix(".build.log")
    with atomic_path(log_path, inputs=(onnx_path,)) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    meta_path = out_path.with_suffix(".json")
    write_json(meta_path, info, inputs=(onnx_path,))
    return BuildResult(out_path, log_path, meta_path, info)


# ----------------------------------------------------------------------------- engines
def engine_info(path: str | Path) -> dict[str, Any]:
    """The build metadata next to an engine (``<name>.json``), if any."""
    meta = Path(path).with_suffix(".json")
    return json.loads(meta.read_text()) if meta.is_file() else {}


__all__ = ["ShapeRanges", "optimization_profile", "plugin_ready_copy", "require_tensorrt", "tensorrt_status",
           "build_engine",
           "BuildResult", "engine_info", "TrtEnvironment", "PLUGIN_MODULES"]
