"""Facts about this machine: CPU, GPUs (torch, nvidia-smi), installed package versions and
what ``import tensorrt`` gives, gathered without hurting the machine or the caller.

``deploykit doctor`` renders them as its check table; the TensorRT builder checks them before
touching TensorRT. Every probe is safe to run anywhere: nothing is downloaded, every external
command has a short timeout, and a missing optional package is a fact, not an error.

* transformers, timm (and so torchvision) are never imported: their versions come from
  package metadata only.
* No TensorRT object (Builder, Logger, Runtime) is ever created: TensorRT can segfault
  instead of raising when there is no device. ``import tensorrt`` itself runs in a child
  process with a timeout, so a crashing, hanging or downloading stub cannot take the
  caller down with it.
"""

from __future__ import annotations

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
from typing import Any

# deploykit's TensorRT plugin path needs the ONNX parser's plugin_namespace support.
TENSORRT_MIN_FOR_PLUGINS = (10, 15)
NVIDIA_SMI_TIMEOUT_S = 5.0
TENSORRT_IMPORT_TIMEOUT_S = 60.0

# x86 flags that decide INT8 speed (VNNI dot products, AMX tiles); ARM equivalents.
_X86_INT8_FLAGS = ("avx2", "avx512_vnni", "avx_vnni", "amx_int8")
_ARM_INT8_FLAGS = ("asimddp", "i8mm", "sve")

# --------------------------------------------------------------------------- helpers


def one_line(text: object, limit: int = 300) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def exc_line(exc: BaseException) -> str:
    msg = one_line(exc)
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def dist_version(*dists: str) -> str | None:
    """Version of the first installed distribution among ``dists`` (metadata only)."""
    for d in dists:
        try:
            return importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            continue
        except Exception:  # broken metadata
            continue
    return None


def module_installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


_PKG_DISTS: dict[str, list[str]] | None = None


def module_version(module: str, *known_dists: str) -> str | None:
    """Version of the distribution that provides ``module``, without importing it."""
    v = dist_version(*(known_dists or (module,)))
    if v is not None:
        return v
    global _PKG_DISTS
    if _PKG_DISTS is None:
        try:
            _PKG_DISTS = dict(importlib.metadata.packages_distributions())
        except Exception:
            _PKG_DISTS = {}
    return dist_version(*_PKG_DISTS.get(module, []))


def version_tuple(v: str | None) -> tuple[int, ...]:
    if not v:
        return ()
    out = []
    for part in v.split("+")[0].split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        out.append(int(m.group()))
    return tuple(out)


def run_command(cmd: list[str], timeout: float | None = None,
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
        return 127, "", exc_line(e)
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


def sm_name(cc: tuple[int, int] | None) -> str | None:
    return f"sm_{cc[0]}{cc[1]}" if cc else None


# --------------------------------------------------------------------------- context


@dataclass
class Gpu:
    name: str
    cc: tuple[int, int] | None = None


@dataclass
class GpuInfo:
    devices: list[Gpu] = field(default_factory=list)  # visible CUDA devices
    source: str = ""  # "torch" or "nvidia-smi"
    driver: str | None = None
    cuda: str | None = None  # CUDA version: torch's runtime, else the driver's
    torch_cuda: bool = False  # torch.cuda.is_available()
    reason: str = ""  # why no device is visible
    notes: list[str] = field(default_factory=list)


class Context:
    """Shared, lazily computed facts (torch module, GPU info) for one run of the checks."""

    def __init__(self) -> None:
        self._torch: Any = None
        self._torch_error: str | None = None
        self._torch_done = False
        self._gpu: GpuInfo | None = None
        self.gpu_error: str | None = None

    def torch(self) -> Any:
        """The torch module, or None (see ``torch_error``)."""
        if not self._torch_done:
            self._torch_done = True
            if not module_installed("torch"):
                self._torch_error = "not installed"
            else:
                try:
                    import torch

                    self._torch = torch
                except Exception as e:
                    self._torch_error = f"import failed: {exc_line(e)}"
        return self._torch

    @property
    def torch_error(self) -> str | None:
        self.torch()
        return self._torch_error

    def gpu(self) -> GpuInfo:
        """GPU facts; a failing probe counts as 'no GPU' (never as a GPU)."""
        if self._gpu is None:
            try:
                self._gpu = gpu_info(self)
            except Exception as e:
                self.gpu_error = exc_line(e)
                self._gpu = GpuInfo(reason=f"GPU detection failed: {self.gpu_error}")
        return self._gpu

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpu().devices)


def nvidia_smi() -> tuple[list[Gpu], str | None, str | None, str]:
    """(devices, driver version, driver's CUDA version, error) from nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return [], None, None, "no NVIDIA driver (nvidia-smi not found)"
    devices: list[Gpu] = []
    driver = cuda = None
    rc, out, err = run_command([exe, "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"])
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
            devices.append(Gpu(parts[0], cc))
    else:  # old driver without compute_cap: fall back to the plain list
        rc, out, err = run_command([exe, "-L"])
        if rc is None:
            return [], None, None, f"nvidia-smi -L {err}"
        if rc != 0:
            msg = one_line(err or out) or f"exit code {rc}"
            return [], None, None, f"nvidia-smi failed: {msg}"
        for line in out.strip().splitlines():
            m = re.match(r"GPU \d+:\s*(.+?)\s*(\(UUID.*)?$", line.strip())
            if m:
                devices.append(Gpu(m.group(1)))
    if devices:
        rc, out, _ = run_command([exe])
        if rc == 0:
            m = re.search(r"CUDA Version:\s*([\d.]+)", out)
            cuda = m.group(1) if m else None
            if driver is None:
                m = re.search(r"Driver Version:\s*([\d.]+)", out)
                driver = m.group(1) if m else None
    return devices, driver, cuda, "" if devices else "nvidia-smi lists no GPU"


def gpu_info(ctx: Context) -> GpuInfo:
    info = GpuInfo()
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
                info.devices.append(Gpu(name, cc))  # type: ignore[arg-type]
            info.source = "torch"
            info.cuda = torch.version.cuda or (f"HIP {torch.version.hip}" if torch_hip_build else None)

    smi_devices, driver, smi_cuda, smi_error = nvidia_smi()
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


def gpu_text(g: Gpu, info: GpuInfo) -> str:
    bits = [b for b in (sm_name(g.cc), f"driver {info.driver}" if info.driver else None,
                        f"CUDA {info.cuda}" if info.cuda else None) if b]
    return f"{g.name} ({', '.join(bits)})" if bits else g.name


def gpu_summary(info: GpuInfo) -> str:
    texts: list[str] = []
    for g in info.devices:
        t = gpu_text(g, info)
        if t not in texts:
            texts.append(t)
    n = len(info.devices)
    s = "; ".join(texts)
    return f"{n}x {s}" if n > 1 and len(texts) == 1 else s


# --------------------------------------------------------------------------- CPU


def cpu_facts() -> dict[str, Any]:
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


def int8_pairs_saturate(facts: dict[str, Any] | None = None) -> bool:
    """Whether ONNX Runtime's x86 u8s8 kernels add products in saturating 16-bit pairs here
    (AVX2 ``vpmaddubsw``): an x86 CPU whose flags are known and show no VNNI or AMX."""
    facts = facts or cpu_facts()
    x86 = str(facts.get("machine", "")).lower() in ("x86_64", "amd64", "i686", "i386")
    return x86 and bool(facts.get("flags_known")) and \
        not set(facts.get("flags") or ()) & {"avx512_vnni", "avx_vnni", "amx_int8"}


def cpu_text(facts: dict[str, Any]) -> str:
    cores = f"{facts['cores']} logical cores"
    if facts["total"] and facts["total"] != facts["cores"]:
        cores += f" of {facts['total']}"
    flags = "/".join(facts["flags"]) if facts["flags"] else "no avx2/vnni/amx"
    return f"{facts['model']} ({cores}, {flags})"


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


def import_tensorrt_isolated(timeout: float | None = None) -> dict[str, Any]:
    """``import tensorrt`` in a child process: attributes only, no TensorRT object is made."""
    timeout = TENSORRT_IMPORT_TIMEOUT_S if timeout is None else timeout
    env = dict(os.environ)
    env.update({"PIP_NO_INDEX": "1", "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
                "PYTHONNOUSERSITE": env.get("PYTHONNOUSERSITE", "")})
    if not env["PYTHONNOUSERSITE"]:
        env.pop("PYTHONNOUSERSITE")
    rc, out, err = run_command([sys.executable, "-c", _TRT_PROBE], timeout=timeout, env=env)
    if rc is None:
        return {"ok": False, "error": f"import tensorrt did not finish in {timeout:g} s (stub trying to download?)"}
    for line in reversed(out.splitlines()):
        if line.startswith("@@TRT@@"):
            return json.loads(line[len("@@TRT@@"):])
    if rc < 0:
        return {"ok": False, "error": f"import tensorrt crashed the process (signal {-rc})"}
    text = (err or out).strip()
    tail = one_line(text.splitlines()[-1]) if text else ""
    return {"ok": False, "error": f"import tensorrt exited with code {rc}: {tail}"}


def tensorrt_facts() -> dict[str, Any]:
    """What ``import tensorrt`` gives, without creating any TensorRT object.

    Keys: installed, dist_version, version, real (a real TensorRT, not a stub), error.
    """
    dist_version = module_version("tensorrt", "tensorrt", "tensorrt-cu12", "tensorrt-cu13",
                                   "tensorrt-cu11", "tensorrt-cu12-bindings", "tensorrt-cu13-bindings")
    facts: dict[str, Any] = {"installed": False, "dist_version": dist_version, "version": None,
                             "real": False, "error": None}
    if not module_installed("tensorrt"):
        facts["error"] = "not installed (no 'tensorrt' module)"
        if dist_version:
            facts["error"] = (f"'tensorrt' {dist_version} distribution is installed but has no "
                              "importable module (stub)")
        return facts
    facts["installed"] = True
    r = import_tensorrt_isolated()
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
