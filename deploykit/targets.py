"""Deployment targets: what a GPU or edge device runs, and whether a model fits it.

Built-in profiles live in ``deploykit/targets.yaml`` (h100, a100, l4, jetson-orin,
jetson-thor, edge-cpu-x86, edge-cpu-arm). A user file of the same shape extends or overrides
them: ``DEPLOYKIT_TARGETS=/path/targets.yaml`` or ``--targets-file``.

:func:`check_model` reads what a model needs from its graph (precisions of its Q/DQ,
symmetric or asymmetric activations, deploykit custom ops, 2:4 weights) and refuses what
the target cannot run, e.g. an FP8 model for sm_87 (Jetson Orin), or ONNX Runtime's uint8
asymmetric activations for TensorRT, which takes only symmetric int8 (zero point 0).
:func:`check_engine` refuses an engine built for another GPU or TensorRT version: engines
do not move between either.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import yaml

from deploykit.errors import UserError

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8", "fp4")
RUNTIMES = ("tensorrt", "onnxruntime")
TENSORRT_PLUGIN_MIN = (10, 15)      # deploykit's plugin path (ONNX parser plugin_namespace)
# ONNX Runtime's contrib ops: ONNX Runtime runs them, TensorRT's ONNX parser does not.
VENDOR_DOMAINS = ("com.microsoft",)


@dataclass
class Runtime:
    name: str
    min_version: str
    max_version: str | None = None   # exclusive

    def accepts(self, version: str) -> bool:
        v = _version(version)
        return v >= _version(self.min_version) and (self.max_version is None or v < _version(self.max_version))

    def describe(self) -> str:
        return f"{self.name} >= {self.min_version}" + (f", < {self.max_version}" if self.max_version else "")


@dataclass
class Target:
    name: str
    description: str
    arch: str
    runtime: Runtime
    compute_capability: str | None
    precisions: list[str]
    sparse_2_4: bool
    int8_calibrator: bool
    memory_gib: float
    preset: str
    threads: int | None = None
    notes: str = ""
    source: str = "built-in"

    @property
    def is_gpu(self) -> bool:
        return self.compute_capability is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8": "aarch64"}


def normalize_arch(name: str) -> str:
    """``AMD64`` -> ``x86_64``, ``arm64`` -> ``aarch64`` (targets.yaml's names)."""
    name = name.strip().lower()
    return _ARCH_ALIASES.get(name, name)


def machine_arch() -> str:
    """This machine's CPU architecture in targets.yaml's names."""
    import platform

    return normalize_arch(platform.machine())


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in str(text).split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts) or (0,)


_FIELDS = {"description", "arch", "runtime", "compute_capability", "precisions", "sparse_2_4", "int8_calibrator",
           "memory_gib", "preset", "threads", "notes"}


def parse_target(name: str, raw: Any, source: str) -> Target:
    from deploykit.presets import PRESETS

    where = f"target '{name}'"
    if not isinstance(raw, dict):
        raise UserError(f"{where} is not a mapping", path=source, fix="give each target its fields (see targets.yaml)")
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise UserError(f"{where} has unknown fields {unknown}", path=source, fix=f"use {sorted(_FIELDS)}")
    missing = sorted({"runtime", "precisions", "preset", "arch"} - set(raw))
    if missing:
        raise UserError(f"{where} lacks {missing}", path=source, fix="copy a built-in target and edit it")
    runtime = raw["runtime"]
    if not isinstance(runtime, dict) or runtime.get("name") not in RUNTIMES or "min_version" not in runtime:
        raise UserError(f"{where}: runtime must be {{name: tensorrt|onnxruntime, min_version, max_version}}",
                        path=source, fix="e.g. runtime: {name: tensorrt, min_version: '10.15', max_version: null}")
    bad = [p for p in raw["precisions"] if p not in PRECISIONS]
    if bad:
        raise UserError(f"{where}: unknown precisions {bad}", path=source, fix=f"use {', '.join(PRECISIONS)}")
    if raw["preset"] not in PRESETS:
        raise UserError(f"{where}: unknown preset '{raw['preset']}'", path=source, fix=f"use {', '.join(PRESETS)}")
    cc = raw.get("compute_capability")
    if runtime["name"] == "tensorrt" and cc is None:
        raise UserError(f"{where}: a TensorRT target needs its compute_capability", path=source,
                        fix="e.g. compute_capability: '8.7'")
    return Target(name=name, description=str(raw.get("description", "")), arch=str(raw["arch"]),
                  runtime=Runtime(str(runtime["name"]), str(runtime["min_version"]),
                                  None if runtime.get("max_version") is None else str(runtime["max_version"])),
                  compute_capability=None if cc is None else str(cc), precisions=list(raw["precisions"]),
                  sparse_2_4=bool(raw.get("sparse_2_4", False)), int8_calibrator=bool(raw.get("int8_calibrator", False)),
                  memory_gib=float(raw.get("memory_gib", 0)), preset=str(raw["preset"]),
                  threads=None if raw.get("threads") is None else int(raw["threads"]),
                  notes=" ".join(str(raw.get("notes", "")).split()), source=source)


def _read(path: str | Path, text: str | None = None) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text if text is not None else Path(path).read_text())
    except FileNotFoundError:
        raise UserError("targets file not found", path=path, fix="check DEPLOYKIT_TARGETS / --targets-file") from None
    except yaml.YAMLError as exc:
        raise UserError(f"targets file is not valid YAML ({str(exc).splitlines()[0]})", path=path,
                        fix="fix the YAML (a mapping of target name -> fields)") from None
    if not isinstance(data, dict):
        raise UserError("targets file must map target names to their fields", path=path,
                        fix="see deploykit/targets.yaml for the shape")
    return data



def _runtime_short(runtime: Runtime) -> str:
    name = {"tensorrt": "TRT", "onnxruntime": "ORT"}.get(runtime.name, runtime.name)
    if runtime.max_version:
        return f"{name} {runtime.min_version}-<{runtime.max_version}"
    return f"{name} >={runtime.min_version}"


def render_targets(table: dict[str, Target], *, wide: bool = False, console: Any = None) -> None:
    """The targets as a table on stdout. The default columns read at 80 columns (names never
    cut); ``wide`` adds precisions, 2:4 sparsity, description and source."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    out = Table(title="deploykit targets", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                show_edge=False, padding=(0, 1), collapse_padding=True)
    out.add_column("target", no_wrap=True)
    out.add_column("runtime", no_wrap=True)
    out.add_column("sm", no_wrap=True)
    out.add_column("arch", no_wrap=True)
    out.add_column("GiB", no_wrap=True, justify="right")
    out.add_column("threads", no_wrap=True, justify="right")
    out.add_column("int8", no_wrap=True)
    out.add_column("preset", no_wrap=True)
    if wide:
        out.add_column("precisions", no_wrap=True)
        out.add_column("2:4", no_wrap=True)
        out.add_column("source", no_wrap=True)
        out.add_column("description")
    for t in table.values():
        int8 = ("Q/DQ+cache" if t.int8_calibrator else "Q/DQ") if "int8" in t.precisions else "no"
        row = [t.name, _runtime_short(t.runtime), t.compute_capability or "-", t.arch,
               f"{t.memory_gib:g}", str(t.threads) if t.threads else "-", int8, t.preset]
        if wide:
            row += [" ".join(t.precisions), "yes" if t.sparse_2_4 else "no", t.source, t.description]
        out.add_row(*row)
    console.print(out)
    if not wide:
        console.print("GiB: device memory. runtime: TRT = TensorRT, ORT = ONNX Runtime.\n"
                      "int8: Q/DQ = explicit Q/DQ ONNX; +cache = a calibration cache works too.\n"
                      "--wide adds precisions, 2:4 sparsity, source and description.")

def load_targets(extra: str | Path | None = None) -> dict[str, Target]:
    """Built-in targets, then ``DEPLOYKIT_TARGETS``, then ``extra`` (later files override)."""
    builtin = resources.files("deploykit").joinpath("targets.yaml")
    targets = {name: parse_target(name, raw, "built-in")
               for name, raw in _read(str(builtin), builtin.read_text()).items()}
    for path in [os.environ.get("DEPLOYKIT_TARGETS"), extra]:
        if path:
            for name, raw in _read(path).items():
                targets[str(name)] = parse_target(str(name), raw, str(path))
    return targets


def get_target(name: str, extra: str | Path | None = None) -> Target:
    targets = load_targets(extra)
    if name not in targets:
        close = difflib.get_close_matches(name, list(targets), n=3, cutoff=0.4)
        raise UserError(f"unknown target '{name}'",
                        fix=(f"did you mean {', '.join(close)}? " if close else "") +
                        "deploykit targets lists them; add your own with --targets-file")
    return targets[name]


# ----------------------------------------------------------------------------- what a model needs
_FP8 = {onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E4M3FNUZ, onnx.TensorProto.FLOAT8E5M2,
        onnx.TensorProto.FLOAT8E5M2FNUZ}
_FP4 = {getattr(onnx.TensorProto, "FLOAT4E2M1", -1)}


@dataclass
class ModelNeeds:
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    asymmetric_activations: list[str] = field(default_factory=list)   # Q nodes with uint8 / nonzero zero point
    custom_ops: list[str] = field(default_factory=list)
    vendor_ops: list[str] = field(default_factory=list)   # "domain.op" of ONNX Runtime's own ops (com.microsoft)
    sparse_2_4_weights: int = 0


def model_needs(model: onnx.ModelProto) -> ModelNeeds:
    """Precisions and features a model's graph uses (read from its Q/DQ, initializers, nodes)."""
    from deploykit.plugins import DOMAIN
    from deploykit.sparsity import check_2_4

    inits = {i.name: i for i in model.graph.initializer}
    needs = ModelNeeds()
    used = {"fp32"}
    for node in model.graph.node:
        if node.domain == DOMAIN:
            needs.custom_ops.append(node.op_type)
        elif node.domain in VENDOR_DOMAINS:
            needs.vendor_ops.append(f"{node.domain}.{node.op_type}")
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zero = inits.get(node.input[2]) if len(node.input) > 2 else None
        data = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        types = {t.data_type for t in (zero, data) if t is not None}
        if types & _FP8:
            used.add("fp8")
        elif types & _FP4:
            used.add("fp4")
        else:
            used.add("int8")
        if node.op_type == "QuantizeLinear" and node.input[0] not in inits:
            if zero is None:
                needs.asymmetric_activations.append(node.name)          # default zero point: uint8
            elif zero.data_type == onnx.TensorProto.UINT8 or np.any(onnx.numpy_helper.to_array(zero)):
                needs.asymmetric_activations.append(node.name)
    if any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer):
        used.add("fp16")
    if any(i.data_type == onnx.TensorProto.BFLOAT16 for i in model.graph.initializer):
        used.add("bf16")
    needs.precisions = [p for p in PRECISIONS if p in used]
    needs.custom_ops = sorted(set(needs.custom_ops))
    needs.vendor_ops = sorted(set(needs.vendor_ops))
    needs.sparse_2_4_weights = check_2_4(model)["compliant"]
    return needs


def check_model(model: onnx.ModelProto | str | Path, target: Target) -> list[str]:
    """Notes for ``model`` on ``target``; raises a UserError for what the target cannot run."""
    path = None
    if not isinstance(model, onnx.ModelProto):
        from deploykit.onnx_utils import load_onnx

        path, model = Path(model), load_onnx(Path(model))
    needs = model_needs(model)
    missing = [p for p in needs.precisions if p not in target.precisions]
    if missing:
        hint = {"fp8": "FP8 needs sm_89 or later", "fp4": "FP4 needs Blackwell",
                "bf16": "this hardware has no bf16"}.get(missing[0], "")
        raise UserError(f"the model uses {', '.join(missing)}, which target '{target.name}' "
                        f"(sm_{(target.compute_capability or '').replace('.', '')} {target.runtime.name}) does not run"
                        + (f": {hint}" if hint else ""), path=path,
                        fix=f"quantize for it: deploykit calibrate --preset {target.preset}")
    notes = []
    if target.runtime.name == "tensorrt" and needs.vendor_ops:
        raise UserError(f"the model has ONNX Runtime ops {', '.join(needs.vendor_ops)}, which TensorRT (target "
                        f"'{target.name}') does not run", path=path,
                        fix="calibrate with --preset gpu-trt (standard ONNX only: int8 embeddings as "
                            "DequantizeLinear -> Gather)")
    if target.runtime.name == "tensorrt" and needs.asymmetric_activations:
        raise UserError(f"the model has {len(needs.asymmetric_activations)} activation quantizers with uint8 / "
                        f"nonzero zero points; TensorRT (target '{target.name}') takes only symmetric int8",
                        path=path, fix="calibrate the FP32 model with --preset gpu-trt")
    if target.runtime.name == "onnxruntime" and "int8" in needs.precisions and not needs.asymmetric_activations:
        notes.append("symmetric int8 activations (gpu-trt) run on ONNX Runtime, but the cpu-ort preset (uint8 x "
                     "int8) is what its x86 kernels run fastest")
    if needs.custom_ops and target.runtime.name == "tensorrt" and \
            _version(target.runtime.max_version or "999") <= TENSORRT_PLUGIN_MIN:
        notes.append(f"{', '.join(needs.custom_ops)} run as their ONNX-function decomposition on "
                     f"{target.runtime.describe()}: deploykit's plugins need TensorRT >= 10.15")
    if needs.sparse_2_4_weights and not target.sparse_2_4:
        notes.append(f"{needs.sparse_2_4_weights} weights are 2:4 sparse, but '{target.name}' runs them dense")
    return notes


def check_quant_config(config, preset: str, target: Target, where: str | Path | None = None) -> None:
    """Refuse, before any work, a quantization setup whose model the target could not run
    (the same rules as :func:`check_model`, read from the settings instead of a graph)."""
    resolved = config.resolved(preset)
    if target.runtime.name == "tensorrt" and (resolved.activation_type != "int8" or not resolved.activation_symmetric):
        raise UserError(f"quantize preset '{preset}' makes {resolved.activation_type} "
                        f"{'symmetric' if resolved.activation_symmetric else 'asymmetric'} activations; target "
                        f"'{target.name}' runs TensorRT, which takes only symmetric int8", path=where,
                        fix=f"use quantize.preset: {target.preset} (one Q/DQ model runs on both TensorRT and ONNX "
                            "Runtime), or drop the target")
    if target.runtime.name == "tensorrt" and resolved.embeddings == "gather-block":
        raise UserError(f"quantize.embeddings gather-block is ONNX Runtime's com.microsoft.GatherBlockQuantized; "
                        f"target '{target.name}' runs TensorRT, which does not run it", path=where,
                        fix="use quantize.embeddings: dq-gather (or true with the gpu-trt preset)")


def check_engine(info: dict[str, Any], target: Target, where: str | Path | None = None) -> None:
    """Refuse an engine (``deploykit build`` metadata) that was built for another GPU or TensorRT."""
    cc = str(info.get("compute_capability", ""))
    if target.compute_capability is None:
        raise UserError(f"target '{target.name}' runs {target.runtime.name}, not TensorRT engines", path=where,
                        fix="ship the ONNX model for it (deploykit package)")
    if cc != target.compute_capability:
        raise UserError(f"the engine was built for sm_{cc.replace('.', '')} ({info.get('gpu', '?')}), target "
                        f"'{target.name}' is sm_{target.compute_capability.replace('.', '')}; engines do not move "
                        "between GPU architectures", path=where, fix="build the engine on the target (deploykit build)")
    version = str(info.get("tensorrt", ""))
    if not target.runtime.accepts(version):
        raise UserError(f"the engine was built with TensorRT {version}; target '{target.name}' runs "
                        f"{target.runtime.describe()}", path=where, fix="build the engine with the target's TensorRT")
