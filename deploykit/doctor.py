"""``deploykit doctor``: which backends, devices and versions are usable here, and why not.

Every probe is safe to run anywhere: nothing is downloaded, every external command has a
short timeout, a missing optional package is a "not usable" row, and an unexpected
exception inside a probe becomes a "not usable" row carrying the exception's message.

Two rules keep it from hurting the machine or the caller:

* transformers, timm (and so torchvision) are never imported: on CPU-only machines a CUDA
  torchvision wheel next to a CPU torch fails to import. Their versions come from package
  metadata only.
* No TensorRT object (Builder, Logger, Runtime) is ever created: TensorRT can segfault
  instead of raising when there is no device. ``import tensorrt`` itself runs in a child
  process with a timeout, so a crashing, hanging or downloading stub cannot take the
  caller down with it.

The facts come from :mod:`deploykit.probes`; this module turns them into the check table.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from dataclasses import dataclass
from typing import Any, Callable

from deploykit.probes import (TENSORRT_MIN_FOR_PLUGINS, Context, cpu_facts, cpu_text, dist_version, exc_line,
                              gpu_summary, int8_pairs_saturate, module_installed, module_version, one_line, sm_name,
                              tensorrt_facts, version_tuple)

COMPONENTS = (
    "CPU",
    "GPU",
    "torch",
    "onnxruntime CPU",
    "onnxruntime CUDA",
    "onnxruntime TensorRT",
    "TensorRT",
    "Triton (GPU)",
    "Triton (interpreter)",
    "CuPy",
    "onnx",
    "transformers",
    "timm",
)


@dataclass
class Check:
    name: str
    usable: bool
    version: str | None
    detail: str


# --------------------------------------------------------------------------- CPU


def _probe_cpu(ctx: Context) -> list[Check]:
    facts = cpu_facts()
    detail = f"{cpu_text(facts)}, {facts['machine']}"
    fl = set(facts["flags"])
    if fl & {"amx_int8"}:
        detail += "; INT8: AMX + VNNI"
    elif fl & {"avx512_vnni", "avx_vnni"}:
        detail += "; INT8: VNNI dot products"
    elif fl & {"asimddp", "i8mm"}:
        detail += "; INT8: ARM dot product"
    elif facts["flags_known"]:
        detail += "; no VNNI/AMX: INT8 is unlikely to beat FP32 here"
        if int8_pairs_saturate(facts):
            detail += ("; ONNX Runtime's u8s8 kernels add in saturating 16-bit pairs (gpu-trt models are "
                       "scored with Q/DQ unfused, cpu-ort ones may lose accuracy here)")
    return [Check("CPU", True, None, detail)]


# --------------------------------------------------------------------------- GPU / torch


def _probe_gpu(ctx: Context) -> list[Check]:
    info = ctx.gpu()
    if ctx.gpu_error:
        raise RuntimeError(ctx.gpu_error)
    if not info.devices:
        return [Check("GPU", False, None, info.reason or "no CUDA GPU visible")]
    detail = f"{gpu_summary(info)} via {info.source}"
    if info.notes:
        detail += "; " + "; ".join(info.notes)
    return [Check("GPU", True, info.driver, detail)]


def _probe_torch(ctx: Context) -> list[Check]:
    torch = ctx.torch()
    if torch is None:
        return [Check("torch", False, module_version("torch"), f"torch {ctx.torch_error}")]
    version = str(torch.__version__)
    parts: list[str] = []
    cuda = getattr(torch.version, "cuda", None)
    hip = getattr(torch.version, "hip", None)
    if cuda:
        parts.append(f"CUDA {cuda} build")
    elif hip:
        parts.append(f"ROCm (HIP {hip}) build")
    else:
        parts.append("CPU build (torch.version.cuda is None)")
    info = ctx.gpu()
    if cuda or hip:
        if info.torch_cuda:
            devs = ", ".join(f"{g.name} ({sm_name(g.cc)})" if g.cc else g.name for g in info.devices)
            parts.append(f"torch.cuda.is_available() True: {devs}")
        else:
            parts.append("torch.cuda.is_available() False")
    else:
        parts.append("torch.cuda.is_available() False")
    try:
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            parts.append("Apple MPS available")
    except Exception:
        pass
    try:
        parts.append(f"{torch.get_num_threads()} intra-op threads")
    except Exception:
        pass
    return [Check("torch", True, version, "; ".join(parts))]


# --------------------------------------------------------------------------- onnxruntime


def _probe_onnxruntime(ctx: Context) -> list[Check]:
    names = ("onnxruntime CPU", "onnxruntime CUDA", "onnxruntime TensorRT")
    if not module_installed("onnxruntime"):
        return [Check(n, False, None, "onnxruntime not installed") for n in names]
    try:
        import onnxruntime as ort
    except Exception as e:
        msg = f"import onnxruntime failed: {exc_line(e)}"
        return [Check(n, False, module_version("onnxruntime"), msg) for n in names]
    version = str(getattr(ort, "__version__", None) or module_version("onnxruntime") or "") or None
    providers = list(ort.get_available_providers())
    dists = [d for d in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml",
                         "onnxruntime-openvino") if dist_version(d)]
    conflict = ""
    if len(dists) > 1:
        conflict = f"; several onnxruntime packages installed ({', '.join(dists)}): they overwrite each other"
    gpu = ctx.gpu()
    gpu_reason = "no CUDA GPU" if not gpu.devices else ""

    cpu_ok = "CPUExecutionProvider" in providers
    rows = [Check(
        names[0], cpu_ok, version,
        f"providers: {', '.join(providers) or 'none'}" + conflict
        if cpu_ok else f"CPUExecutionProvider missing; providers: {', '.join(providers) or 'none'}",
    )]

    def ep_row(name: str, provider: str, hint: str) -> Check:
        missing = []
        if provider not in providers:
            missing.append(f"{provider} not available ({hint})")
        if gpu_reason:
            missing.append(gpu_reason)
        if missing:
            return Check(name, False, version, "; ".join(missing))
        return Check(name, True, version,
                     f"{provider} available, GPU: {gpu_summary(gpu)} "
                     "(its CUDA/cuDNN/TensorRT libraries load when a session is created)")

    pkg = "onnxruntime-gpu" if "onnxruntime-gpu" in dists else (dists[0] if dists else "onnxruntime")
    rows.append(ep_row(names[1], "CUDAExecutionProvider",
                       f"{pkg} {version} has no CUDA EP; install onnxruntime-gpu"
                       if pkg != "onnxruntime-gpu" else f"{pkg} {version} lists no CUDA EP"))
    rows.append(ep_row(names[2], "TensorrtExecutionProvider",
                       f"{pkg} {version} has no TensorRT EP; needs onnxruntime-gpu"
                       if pkg != "onnxruntime-gpu" else f"{pkg} {version} lists no TensorRT EP"))
    return rows


def _probe_tensorrt(ctx: Context) -> list[Check]:
    facts = tensorrt_facts()
    if not facts["installed"]:
        return [Check("TensorRT", False, facts["dist_version"],
                      f"{facts['error']}; TensorRT engines cannot be built here")]
    if not facts["real"]:
        return [Check("TensorRT", False, facts["version"] or facts["dist_version"], facts["error"])]
    version = facts["version"]
    plugins_ok = version_tuple(version)[:2] >= TENSORRT_MIN_FOR_PLUGINS
    need = ".".join(map(str, TENSORRT_MIN_FOR_PLUGINS))
    plugin_note = (f"plugin path OK (>= {need})" if plugins_ok
                   else f"older than {need}: deploykit's plugin path (ONNX parser plugin_namespace) is unavailable")
    if not ctx.has_gpu:
        return [Check("TensorRT", False, version,
                      f"TensorRT {version} installed but no CUDA GPU; "
                      f"{plugin_note}; no TensorRT object was created")]
    return [Check("TensorRT", True, version, f"TensorRT {version}; {plugin_note}; GPU: {gpu_summary(ctx.gpu())}")]


# --------------------------------------------------------------------------- Triton / CuPy


def _probe_triton(ctx: Context) -> list[Check]:
    names = ("Triton (GPU)", "Triton (interpreter)")
    gpu = ctx.gpu()
    if not gpu.devices:
        no_gpu = "no CUDA GPU: Triton compiles GPU kernels only for a device"
    elif not gpu.torch_cuda:
        no_gpu = (f"GPU present ({gpu_summary(gpu)}) but torch cannot use it, "
                  "and deploykit's Triton kernels run on torch CUDA tensors")
    else:
        no_gpu = ""
    if not module_installed("triton"):
        missing = "triton not installed (pip install triton)"
        return [Check(names[0], False, None, f"{missing}; {no_gpu}" if no_gpu else missing),
                Check(names[1], False, None, f"{missing}; with it, kernels run on CPU with TRITON_INTERPRET=1")]
    version = module_version("triton", "triton", "pytorch-triton", "pytorch-triton-rocm", "triton-nightly")
    if no_gpu:
        gpu_row = Check(names[0], False, version, no_gpu)
    else:
        gpu_row = Check(names[0], True, version, f"kernels compile for {gpu_summary(gpu)}")
    interp = "kernels run on CPU with TRITON_INTERPRET=1 set before triton is imported (slow; correctness only)"
    if os.environ.get("TRITON_INTERPRET") == "1":
        interp += "; TRITON_INTERPRET=1 is set now"
    return [gpu_row, Check(names[1], True, version, interp)]


def _probe_cupy(ctx: Context) -> list[Check]:
    if not module_installed("cupy"):
        return [Check("CuPy", False, None, "not installed (optional)")]
    version = module_version("cupy", "cupy", "cupy-cuda12x", "cupy-cuda13x", "cupy-cuda11x")
    gpu = ctx.gpu()
    if not gpu.devices:
        return [Check("CuPy", False, version, "installed but no CUDA GPU")]
    return [Check("CuPy", True, version, f"installed; GPU: {gpu_summary(gpu)}")]


# --------------------------------------------------------------------------- model libraries


def _metadata_row(name: str, module: str, note: str) -> list[Check]:
    version = module_version(module)
    if version is None and not module_installed(module):
        return [Check(name, False, None, f"not installed ({note})")]
    return [Check(name, True, version, f"found (version from package metadata; {note})")]


def _probe_onnx(ctx: Context) -> list[Check]:
    return _metadata_row("onnx", "onnx", "needed to export and quantize")


def _probe_transformers(ctx: Context) -> list[Check]:
    return _metadata_row("transformers", "transformers", "not imported by doctor: it may import torchvision")


def _probe_timm(ctx: Context) -> list[Check]:
    return _metadata_row("timm", "timm", "not imported by doctor: it may import torchvision")


# --------------------------------------------------------------------------- public API


def _guarded(names: tuple[str, ...], probe: Callable[[Context], list[Check]], ctx: Context) -> list[Check]:
    try:
        rows = list(probe(ctx))
    except (Exception, SystemExit) as e:
        return [Check(n, False, None, f"check failed: {exc_line(e)}") for n in names]
    got = {r.name for r in rows}
    rows += [Check(n, False, None, "check returned no row") for n in names if n not in got]
    for r in rows:
        r.detail = one_line(r.detail, 400) or ("usable" if r.usable else "not usable")
    return rows


def run_checks() -> list[Check]:
    """Probe this machine; one :class:`Check` per component in :data:`COMPONENTS` order."""
    ctx = Context()
    # Looked up at call time, so tests can monkeypatch a probe.
    plan: list[tuple[tuple[str, ...], Callable[[Context], list[Check]]]] = [
        (("CPU",), _probe_cpu),
        (("GPU",), _probe_gpu),
        (("torch",), _probe_torch),
        (("onnxruntime CPU", "onnxruntime CUDA", "onnxruntime TensorRT"), _probe_onnxruntime),
        (("TensorRT",), _probe_tensorrt),
        (("Triton (GPU)", "Triton (interpreter)"), _probe_triton),
        (("CuPy",), _probe_cupy),
        (("onnx",), _probe_onnx),
        (("transformers",), _probe_transformers),
        (("timm",), _probe_timm),
    ]
    rows: list[Check] = []
    for names, probe in plan:
        rows.extend(_guarded(names, probe, ctx))
    return rows


def environment() -> dict:
    """Versions and hardware for reports. Missing things are None; never raises."""
    ctx = Context()

    def safe(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (Exception, SystemExit):
            return None

    def torch_version() -> str | None:
        t = ctx.torch()
        return str(t.__version__) if t is not None else module_version("torch")

    def ort_version() -> str | None:
        return module_version("onnxruntime", "onnxruntime", "onnxruntime-gpu",
                               "onnxruntime-directml", "onnxruntime-openvino")

    def gpu() -> str | None:
        info = ctx.gpu()
        return gpu_summary(info) if info.devices else None

    def tensorrt() -> str | None:
        facts = tensorrt_facts()
        return facts["version"] if facts["real"] else None

    return {
        "python": platform.python_version(),
        "torch": safe(torch_version),
        "onnxruntime": safe(ort_version),
        "onnx": safe(lambda: module_version("onnx")),
        "transformers": safe(lambda: module_version("transformers")),
        "cpu": safe(lambda: cpu_text(cpu_facts())),
        "gpu": safe(gpu),
        "tensorrt": safe(tensorrt),
        "platform": safe(platform.platform),
    }


def checks_to_json(checks: list[Check]) -> list[dict]:
    return [dataclasses.asdict(c) for c in checks]


def render_checks(checks: list[Check], console: Any = None) -> None:
    """Print the checks as a rich table (component, usable, version, detail)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    table = Table(title="deploykit doctor", show_lines=False)
    table.add_column("component", no_wrap=True)
    table.add_column("usable", justify="center", no_wrap=True)
    table.add_column("version", no_wrap=True)
    table.add_column("detail", overflow="fold")
    for c in checks:
        table.add_row(
            Text(c.name),
            Text("✓", style="bold green") if c.usable else Text("✗", style="bold red"),
            Text(c.version or "-"),
            Text(c.detail),  # Text, not markup: details may contain '[' from messages
        )
    console.print(table)


__all__ = ["Check", "COMPONENTS", "run_checks", "environment", "render_checks", "checks_to_json"]
