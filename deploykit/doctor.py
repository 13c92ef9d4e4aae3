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
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

# deploykit's TensorRT plugin path needs the ONNX parser's plugin_namespace support.
TENSORRT_MIN_FOR_PLUGINS = (10, 15)
NVIDIA_SMI_TIMEOUT_S = 5.0
TENSORRT_IMPORT_TIMEOUT_S = 60.0

# x86 flags that decide INT8 speed (VNNI dot products, AMX tiles); ARM equivalents.
_X86_INT8_FLAGS = ("avx2", "avx512_vnni", "avx_vnni", "amx_int8")
_ARM_INT8_FLAGS = ("asimddp", "i8mm", "sve")

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


# --------------------------------------------------------------------------- helpers


def _one_line(text: object, limit: int = 300) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _exc_line(exc: BaseException) -> str:
    msg = _one_line(exc)
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _dist_version(*dists: str) -> str | None:
    """Version of the first installed distribution among ``dists`` (metadata only)."""
    for d in dists:
        try:
            return importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            continue
        except Exception:  # broken metadata
            continue
    return None


def _module_installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


_PKG_DISTS: dict[str, list[str]] | None = None


def _module_version(module: str, *known_dists: str) -> str | None:
    """Version of the distribution that provides ``module``, without importing it."""
    v = _dist_version(*(known_dists or (module,)))
    if v is not None:
        return v
    global _PKG_DISTS
    if _PKG_DISTS is None:
        try:
            _PKG_DISTS = dict(importlib.metadata.packages_distributions())
        except Exception:
            _PKG_DISTS = {}
    return _dist_version(*_PKG_DISTS.get(module, []))


def _version_tuple(v: str | None) -> tuple[int, ...]:
    if not v:
        return ()
    out = []
    for part in v.split("+")[0].split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        out.append(int(m.group()))
    return tuple(out)


def _run(cmd: list[str], timeout: float | None = None,
         env: dict[str, str] | None = None) -> tuple[int | None, str, str]:
    """Run a command; (returncode, or None on timeout, stdout, stderr). Never raises for a
    missing binary or a timeout. The command runs in its own process group, and the whole
    group is killed on timeout, so a grandchild holding the pipes cannot make this hang."""
    timeout = NVIDIA_SMI_TIMEOUT_S if timeout is None else timeout
    try:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             stdin=subprocess.DEVNULL, text=True, env=env,
                             start_new_session=(os.name == "posix"))
    except OSError as e:
        return 127, "", _exc_line(e)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(p)
        try:
            p.communicate(timeout=2)
        except (subprocess.TimeoutExpired, OSError, ValueError):
            pass
        return None, "", f"timed out after {timeout:g} s"
    return p.returncode, out, err


def _kill_group(p: subprocess.Popen) -> None:
    try:
        if os.name == "posix":
            os.killpg(p.pid, 9)
        else:
            p.kill()
    except OSError:
        try:
            p.kill()
        except OSError:
            pass


def _sm(cc: tuple[int, int] | None) -> str | None:
    return f"sm_{cc[0]}{cc[1]}" if cc else None


# --------------------------------------------------------------------------- context


@dataclass
class _Gpu:
    name: str
    cc: tuple[int, int] | None = None


@dataclass
class _GpuInfo:
    devices: list[_Gpu] = field(default_factory=list)  # visible CUDA devices
    source: str = ""  # "torch" or "nvidia-smi"
    driver: str | None = None
    cuda: str | None = None  # CUDA version: torch's runtime, else the driver's
    torch_cuda: bool = False  # torch.cuda.is_available()
    reason: str = ""  # why no device is visible
    notes: list[str] = field(default_factory=list)


class _Context:
    """Shared, lazily computed facts (torch module, GPU info) for one run of the checks."""

    def __init__(self) -> None:
        self._torch: Any = None
        self._torch_error: str | None = None
        self._torch_done = False
        self._gpu: _GpuInfo | None = None
        self.gpu_error: str | None = None

    def torch(self) -> Any:
        """The torch module, or None (see ``torch_error``)."""
        if not self._torch_done:
            self._torch_done = True
            if not _module_installed("torch"):
                self._torch_error = "not installed"
            else:
                try:
                    import torch

                    self._torch = torch
                except Exception as e:
                    self._torch_error = f"import failed: {_exc_line(e)}"
        return self._torch

    @property
    def torch_error(self) -> str | None:
        self.torch()
        return self._torch_error

    def gpu(self) -> _GpuInfo:
        """GPU facts; a failing probe counts as 'no GPU' (never as a GPU)."""
        if self._gpu is None:
            try:
                self._gpu = _gpu_info(self)
            except Exception as e:
                self.gpu_error = _exc_line(e)
                self._gpu = _GpuInfo(reason=f"GPU detection failed: {self.gpu_error}")
        return self._gpu

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpu().devices)


def _nvidia_smi() -> tuple[list[_Gpu], str | None, str | None, str]:
    """(devices, driver version, driver's CUDA version, error) from nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return [], None, None, "no NVIDIA driver (nvidia-smi not found)"
    devices: list[_Gpu] = []
    driver = cuda = None
    rc, out, err = _run([exe, "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"])
    if rc is None:
        return [], None, None, f"nvidia-smi {err} (driver hung?)"
    if rc == 0:
        for line in out.strip().splitlines():
            parts = [p.strip() for p in line.split(",")]
            if not parts or not parts[0]:
                continue
            cc = None
            if len(parts) > 1:
                m = re.match(r"(\d+)\.(\d+)", parts[1])
                if m:
                    cc = (int(m.group(1)), int(m.group(2)))
            if len(parts) > 2 and re.match(r"\d", parts[2]):
                driver = parts[2]
            devices.append(_Gpu(parts[0], cc))
    else:  # old driver without compute_cap: fall back to the plain list
        rc, out, err = _run([exe, "-L"])
        if rc is None:
            return [], None, None, f"nvidia-smi -L {err}"
        if rc != 0:
            msg = _one_line(err or out) or f"exit code {rc}"
            return [], None, None, f"nvidia-smi failed: {msg}"
        for line in out.strip().splitlines():
            m = re.match(r"GPU \d+:\s*(.+?)\s*(\(UUID.*)?$", line.strip())
            if m:
                devices.append(_Gpu(m.group(1)))
    if devices:
        rc, out, _ = _run([exe])
        if rc == 0:
            m = re.search(r"CUDA Version:\s*([\d.]+)", out)
            cuda = m.group(1) if m else None
            if driver is None:
                m = re.search(r"Driver Version:\s*([\d.]+)", out)
                driver = m.group(1) if m else None
    return devices, driver, cuda, "" if devices else "nvidia-smi lists no GPU"


def _gpu_info(ctx: _Context) -> _GpuInfo:
    info = _GpuInfo()
    torch = ctx.torch()
    torch_cuda_build = bool(torch is not None and getattr(torch.version, "cuda", None))
    torch_hip_build = bool(torch is not None and getattr(torch.version, "hip", None))
    if torch is not None and (torch_cuda_build or torch_hip_build):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            info.torch_cuda = bool(torch.cuda.is_available())
        if info.torch_cuda:
            for i in range(torch.cuda.device_count()):
                name = torch.cuda.get_device_name(i)
                try:
                    cc = tuple(torch.cuda.get_device_capability(i))
                except Exception:
                    cc = None
                info.devices.append(_Gpu(name, cc))  # type: ignore[arg-type]
            info.source = "torch"
            info.cuda = torch.version.cuda or (f"HIP {torch.version.hip}" if torch_hip_build else None)

    smi_devices, driver, smi_cuda, smi_error = _nvidia_smi()
    info.driver = driver
    if info.cuda is None:
        info.cuda = smi_cuda

    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    hidden = cvd is not None and cvd.strip() in ("", "-1", "none", "NoDevFiles")

    if not info.devices and smi_devices:
        if hidden:
            info.reason = (
                f"CUDA_VISIBLE_DEVICES={cvd!r} hides the {len(smi_devices)} GPU(s) nvidia-smi lists"
            )
        else:
            info.devices = smi_devices
            info.source = "nvidia-smi"
            if torch is None:
                info.notes.append("torch is not importable, so torch cannot use it")
            elif not torch_cuda_build:
                info.notes.append(f"torch {torch.__version__} is a CPU build and cannot use it")
            else:
                info.notes.append(
                    f"torch (CUDA {torch.version.cuda}) cannot use it: torch.cuda.is_available() "
                    f"is False (driver {driver or '?'} too old for this CUDA?)"
                )
    if not info.devices and not info.reason:
        reasons = [smi_error or "nvidia-smi lists no GPU"]
        if torch is None:
            reasons.append(f"torch {ctx.torch_error}")
        elif torch_hip_build:
            reasons.append(f"torch is a ROCm build (HIP {torch.version.hip}) and sees no device")
        elif not torch_cuda_build:
            reasons.append(f"torch is a CPU build ({torch.__version__})")
        else:
            reasons.append(f"torch is a CUDA {torch.version.cuda} build but torch.cuda.is_available() is False")
        if hidden:
            reasons.append(f"CUDA_VISIBLE_DEVICES={cvd!r}")
        info.reason = "; ".join(reasons)
    if info.devices and smi_devices and info.source == "torch" and hidden is False and cvd:
        info.notes.append(f"CUDA_VISIBLE_DEVICES={cvd}")
    return info


def _gpu_text(g: _Gpu, info: _GpuInfo) -> str:
    bits = [b for b in (_sm(g.cc), f"driver {info.driver}" if info.driver else None,
                        f"CUDA {info.cuda}" if info.cuda else None) if b]
    return f"{g.name} ({', '.join(bits)})" if bits else g.name


def _gpu_summary(info: _GpuInfo) -> str:
    texts: list[str] = []
    for g in info.devices:
        t = _gpu_text(g, info)
        if t not in texts:
            texts.append(t)
    n = len(info.devices)
    s = "; ".join(texts)
    return f"{n}x {s}" if n > 1 and len(texts) == 1 else s


# --------------------------------------------------------------------------- CPU


def _cpu_facts() -> dict[str, Any]:
    model = None
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        value = value.strip()
        if model is None and key in ("model name", "hardware", "cpu model", "processor") and value \
                and not value.isdigit():
            model = value
        elif not flags and key in ("flags", "features"):
            flags = set(value.split())
    if not model:
        model = platform.processor() or platform.machine() or "unknown CPU"
    try:
        available = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        available = os.cpu_count() or 0
    total = os.cpu_count() or available
    wanted = _X86_INT8_FLAGS if platform.machine().lower() in ("x86_64", "amd64", "i686", "i386") \
        else _X86_INT8_FLAGS + _ARM_INT8_FLAGS
    present = [f for f in wanted if f in flags]
    return {"model": model, "cores": available, "total": total, "flags": present,
            "flags_known": bool(flags), "machine": platform.machine()}


def _cpu_text(facts: dict[str, Any]) -> str:
    cores = f"{facts['cores']} logical cores"
    if facts["total"] and facts["total"] != facts["cores"]:
        cores += f" of {facts['total']}"
    flags = "/".join(facts["flags"]) if facts["flags"] else "no avx2/vnni/amx"
    return f"{facts['model']} ({cores}, {flags})"


def _probe_cpu(ctx: _Context) -> list[Check]:
    facts = _cpu_facts()
    detail = f"{_cpu_text(facts)}, {facts['machine']}"
    fl = set(facts["flags"])
    if fl & {"amx_int8"}:
        detail += "; INT8: AMX + VNNI"
    elif fl & {"avx512_vnni", "avx_vnni"}:
        detail += "; INT8: VNNI dot products"
    elif fl & {"asimddp", "i8mm"}:
        detail += "; INT8: ARM dot product"
    elif facts["flags_known"]:
        detail += "; no VNNI/AMX: INT8 is unlikely to beat FP32 here"
    return [Check("CPU", True, None, detail)]


# --------------------------------------------------------------------------- GPU / torch


def _probe_gpu(ctx: _Context) -> list[Check]:
    info = ctx.gpu()
    if ctx.gpu_error:
        raise RuntimeError(ctx.gpu_error)
    if not info.devices:
        return [Check("GPU", False, None, info.reason or "no CUDA GPU visible")]
    detail = f"{_gpu_summary(info)} via {info.source}"
    if info.notes:
        detail += "; " + "; ".join(info.notes)
    return [Check("GPU", True, info.driver, detail)]


def _probe_torch(ctx: _Context) -> list[Check]:
    torch = ctx.torch()
    if torch is None:
        return [Check("torch", False, _module_version("torch"), f"torch {ctx.torch_error}")]
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
            devs = ", ".join(f"{g.name} ({_sm(g.cc)})" if g.cc else g.name for g in info.devices)
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


def _probe_onnxruntime(ctx: _Context) -> list[Check]:
    names = ("onnxruntime CPU", "onnxruntime CUDA", "onnxruntime TensorRT")
    if not _module_installed("onnxruntime"):
        return [Check(n, False, None, "onnxruntime not installed") for n in names]
    try:
        import onnxruntime as ort
    except Exception as e:
        msg = f"import onnxruntime failed: {_exc_line(e)}"
        return [Check(n, False, _module_version("onnxruntime"), msg) for n in names]
    version = str(getattr(ort, "__version__", None) or _module_version("onnxruntime") or "") or None
    providers = list(ort.get_available_providers())
    dists = [d for d in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml",
                         "onnxruntime-openvino") if _dist_version(d)]
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
                     f"{provider} available, GPU: {_gpu_summary(gpu)} "
                     "(its CUDA/cuDNN/TensorRT libraries load when a session is created)")

    pkg = "onnxruntime-gpu" if "onnxruntime-gpu" in dists else (dists[0] if dists else "onnxruntime")
    rows.append(ep_row(names[1], "CUDAExecutionProvider",
                       f"{pkg} {version} has no CUDA EP; install onnxruntime-gpu"
                       if pkg != "onnxruntime-gpu" else f"{pkg} {version} lists no CUDA EP"))
    rows.append(ep_row(names[2], "TensorrtExecutionProvider",
                       f"{pkg} {version} has no TensorRT EP; needs onnxruntime-gpu"
                       if pkg != "onnxruntime-gpu" else f"{pkg} {version} lists no TensorRT EP"))
    return rows


# --------------------------------------------------------------------------- TensorRT

_TRT_PROBE = r"""
import json, sys
out = {"ok": False}
try:
    import tensorrt as trt
    out["ok"] = True
    out["version"] = getattr(trt, "__version__", None)
    out["builder"] = hasattr(trt, "Builder")
    out["onnx_parser"] = hasattr(trt, "OnnxParser")
    out["file"] = getattr(trt, "__file__", None)
except BaseException as e:
    out["error"] = type(e).__name__ + ": " + " ".join(str(e).split())[:300]
sys.stdout.write("\n@@TRT@@" + json.dumps(out) + "\n")
"""


def _import_tensorrt_isolated(timeout: float | None = None) -> dict[str, Any]:
    """``import tensorrt`` in a child process: attributes only, no TensorRT object is made."""
    timeout = TENSORRT_IMPORT_TIMEOUT_S if timeout is None else timeout
    env = dict(os.environ)
    env.update({"PIP_NO_INDEX": "1", "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
                "PYTHONNOUSERSITE": env.get("PYTHONNOUSERSITE", "")})
    if not env["PYTHONNOUSERSITE"]:
        env.pop("PYTHONNOUSERSITE")
    rc, out, err = _run([sys.executable, "-c", _TRT_PROBE], timeout=timeout, env=env)
    if rc is None:
        return {"ok": False, "error": f"import tensorrt did not finish in {timeout:g} s (stub trying to download?)"}
    for line in reversed(out.splitlines()):
        if line.startswith("@@TRT@@"):
            return json.loads(line[len("@@TRT@@"):])
    if rc < 0:
        return {"ok": False, "error": f"import tensorrt crashed the process (signal {-rc})"}
    text = (err or out).strip()
    tail = _one_line(text.splitlines()[-1]) if text else ""
    return {"ok": False, "error": f"import tensorrt exited with code {rc}: {tail}"}


def _tensorrt_facts() -> dict[str, Any]:
    """What ``import tensorrt`` gives, without creating any TensorRT object.

    Keys: installed, dist_version, version, real (a real TensorRT, not a stub), error.
    """
    dist_version = _module_version("tensorrt", "tensorrt", "tensorrt-cu12", "tensorrt-cu13",
                                   "tensorrt-cu11", "tensorrt-cu12-bindings", "tensorrt-cu13-bindings")
    facts: dict[str, Any] = {"installed": False, "dist_version": dist_version, "version": None,
                             "real": False, "error": None}
    if not _module_installed("tensorrt"):
        facts["error"] = "not installed (no 'tensorrt' module)"
        if dist_version:
            facts["error"] = (f"'tensorrt' {dist_version} distribution is installed but has no "
                              "importable module (stub)")
        return facts
    facts["installed"] = True
    r = _import_tensorrt_isolated()
    if not r.get("ok"):
        facts["error"] = r.get("error") or "import tensorrt failed"
        return facts
    facts["version"] = r.get("version")
    if not r.get("version") or not r.get("builder"):
        missing = [m for m, ok in (("__version__", r.get("version")), ("tensorrt.Builder", r.get("builder")))
                   if not ok]
        facts["error"] = (f"'tensorrt' is a placeholder stub, not TensorRT (no {' / no '.join(missing)}); "
                          "install the real wheels (tensorrt-cu12 / tensorrt-cu13)")
        return facts
    facts["real"] = True
    return facts


def _probe_tensorrt(ctx: _Context) -> list[Check]:
    facts = _tensorrt_facts()
    if not facts["installed"]:
        return [Check("TensorRT", False, facts["dist_version"],
                      f"{facts['error']}; TensorRT engines cannot be built here")]
    if not facts["real"]:
        return [Check("TensorRT", False, facts["version"] or facts["dist_version"], facts["error"])]
    version = facts["version"]
    plugins_ok = _version_tuple(version)[:2] >= TENSORRT_MIN_FOR_PLUGINS
    need = ".".join(map(str, TENSORRT_MIN_FOR_PLUGINS))
    plugin_note = (f"plugin path OK (>= {need})" if plugins_ok
                   else f"older than {need}: deploykit's plugin path (ONNX parser plugin_namespace) is unavailable")
    if not ctx.has_gpu:
        return [Check("TensorRT", False, version,
                      f"TensorRT {version} installed but no CUDA GPU; "
                      f"{plugin_note}; no TensorRT object was created")]
    return [Check("TensorRT", True, version, f"TensorRT {version}; {plugin_note}; GPU: {_gpu_summary(ctx.gpu())}")]


# --------------------------------------------------------------------------- Triton / CuPy


def _probe_triton(ctx: _Context) -> list[Check]:
    names = ("Triton (GPU)", "Triton (interpreter)")
    gpu = ctx.gpu()
    if not gpu.devices:
        no_gpu = "no CUDA GPU: Triton compiles GPU kernels only for a device"
    elif not gpu.torch_cuda:
        no_gpu = (f"GPU present ({_gpu_summary(gpu)}) but torch cannot use it, "
                  "and deploykit's Triton kernels run on torch CUDA tensors")
    else:
        no_gpu = ""
    if not _module_installed("triton"):
        missing = "triton not installed (pip install triton)"
        return [Check(names[0], False, None, f"{missing}; {no_gpu}" if no_gpu else missing),
                Check(names[1], False, None, f"{missing}; with it, kernels run on CPU with TRITON_INTERPRET=1")]
    version = _module_version("triton", "triton", "pytorch-triton", "pytorch-triton-rocm", "triton-nightly")
    if no_gpu:
        gpu_row = Check(names[0], False, version, no_gpu)
    else:
        gpu_row = Check(names[0], True, version, f"kernels compile for {_gpu_summary(gpu)}")
    interp = "kernels run on CPU with TRITON_INTERPRET=1 set before triton is imported (slow; correctness only)"
    if os.environ.get("TRITON_INTERPRET") == "1":
        interp += "; TRITON_INTERPRET=1 is set now"
    return [gpu_row, Check(names[1], True, version, interp)]


def _probe_cupy(ctx: _Context) -> list[Check]:
    if not _module_installed("cupy"):
        return [Check("CuPy", False, None, "not installed (optional)")]
    version = _module_version("cupy", "cupy", "cupy-cuda12x", "cupy-cuda13x", "cupy-cuda11x")
    gpu = ctx.gpu()
    if not gpu.devices:
        return [Check("CuPy", False, version, "installed but no CUDA GPU")]
    return [Check("CuPy", True, version, f"installed; GPU: {_gpu_summary(gpu)}")]


# --------------------------------------------------------------------------- model libraries


def _metadata_row(name: str, module: str, note: str) -> list[Check]:
    version = _module_version(module)
    if version is None and not _module_installed(module):
        return [Check(name, False, None, f"not installed ({note})")]
    return [Check(name, True, version, f"found (version from package metadata; {note})")]


def _probe_onnx(ctx: _Context) -> list[Check]:
    return _metadata_row("onnx", "onnx", "needed to export and quantize")


def _probe_transformers(ctx: _Context) -> list[Check]:
    return _metadata_row("transformers", "transformers", "not imported by doctor: it may import torchvision")


def _probe_timm(ctx: _Context) -> list[Check]:
    return _metadata_row("timm", "timm", "not imported by doctor: it may import torchvision")


# --------------------------------------------------------------------------- public API


def _guarded(names: tuple[str, ...], probe: Callable[[_Context], list[Check]], ctx: _Context) -> list[Check]:
    try:
        rows = list(probe(ctx))
    except (Exception, SystemExit) as e:
        return [Check(n, False, None, f"check failed: {_exc_line(e)}") for n in names]
    got = {r.name for r in rows}
    rows += [Check(n, False, None, "check returned no row") for n in names if n not in got]
    for r in rows:
        r.detail = _one_line(r.detail, 400) or ("usable" if r.usable else "not usable")
    return rows


def run_checks() -> list[Check]:
    """Probe this machine; one :class:`Check` per component in :data:`COMPONENTS` order."""
    ctx = _Context()
    # Looked up at call time, so tests can monkeypatch a probe.
    plan: list[tuple[tuple[str, ...], Callable[[_Context], list[Check]]]] = [
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
    ctx = _Context()

    def safe(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (Exception, SystemExit):
            return None

    def torch_version() -> str | None:
        t = ctx.torch()
        return str(t.__version__) if t is not None else _module_version("torch")

    def ort_version() -> str | None:
        return _module_version("onnxruntime", "onnxruntime", "onnxruntime-gpu",
                               "onnxruntime-directml", "onnxruntime-openvino")

    def gpu() -> str | None:
        info = ctx.gpu()
        return _gpu_summary(info) if info.devices else None

    def tensorrt() -> str | None:
        facts = _tensorrt_facts()
        return facts["version"] if facts["real"] else None

    return {
        "python": platform.python_version(),
        "torch": safe(torch_version),
        "onnxruntime": safe(ort_version),
        "onnx": safe(lambda: _module_version("onnx")),
        "transformers": safe(lambda: _module_version("transformers")),
        "cpu": safe(lambda: _cpu_text(_cpu_facts())),
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
