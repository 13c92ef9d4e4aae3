"""deploykit.doctor: every row present and honest, nothing crashes, nothing heavy imported."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from rich.console import Console

import deploykit.doctor as doctor
import deploykit.probes as probes

EXPECTED = [
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
]
ENV_KEYS = {"python", "torch", "onnxruntime", "onnx", "transformers", "cpu", "gpu", "tensorrt", "platform"}

NO_GPU = not torch.cuda.is_available() and shutil.which("nvidia-smi") is None
needs_no_gpu = pytest.mark.skipif(not NO_GPU, reason="this machine has a CUDA GPU / NVIDIA driver")


@pytest.fixture(scope="module")
def checks():
    return doctor.run_checks()


def by_name(rows):
    return {r.name: r for r in rows}


def test_components_in_order_with_one_line_details(checks):
    assert [c.name for c in checks] == EXPECTED
    assert list(doctor.COMPONENTS) == EXPECTED
    for c in checks:
        assert isinstance(c, doctor.Check)
        assert isinstance(c.usable, bool)
        assert c.version is None or isinstance(c.version, str)
        assert c.detail.strip(), c
        assert "\n" not in c.detail, c


def test_torch_row_reports_version_and_build(checks):
    row = by_name(checks)["torch"]
    assert row.usable
    assert row.version == torch.__version__
    if torch.version.cuda is None:
        assert "CPU build" in row.detail
    else:
        assert f"CUDA {torch.version.cuda}" in row.detail


def test_onnxruntime_cpu_usable(checks):
    import onnxruntime as ort

    row = by_name(checks)["onnxruntime CPU"]
    assert row.usable, row.detail
    assert row.version == ort.__version__
    assert "CPUExecutionProvider" in row.detail


def test_cpu_row_names_cores_and_int8_flags(checks):
    row = by_name(checks)["CPU"]
    assert row.usable
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert f"{n} logical cores" in row.detail
    try:
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        flags = set()
    for f in ("avx2", "avx512_vnni", "avx_vnni", "amx_int8"):
        assert (f in row.detail.split("(", 1)[1]) == (f in flags), (f, row.detail)


@needs_no_gpu
def test_gpu_rows_not_usable_without_gpu_and_say_why(checks):
    rows = by_name(checks)
    assert not rows["GPU"].usable
    assert "nvidia-smi not found" in rows["GPU"].detail
    if torch.version.cuda is None:
        assert "CPU build" in rows["GPU"].detail
    for name in ("onnxruntime CUDA", "onnxruntime TensorRT", "Triton (GPU)"):
        assert not rows[name].usable, name
        assert "no CUDA GPU" in rows[name].detail, rows[name]
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "CUDAExecutionProvider not available" in rows["onnxruntime CUDA"].detail
    trt = rows["TensorRT"]
    assert not trt.usable
    assert any(w in trt.detail for w in ("not installed", "no CUDA GPU", "stub", "import tensorrt")), trt
    assert not rows["CuPy"].usable


def test_triton_interpreter_row(checks):
    row = by_name(checks)["Triton (interpreter)"]
    try:
        import importlib.metadata as md

        version = md.version("triton")
    except Exception:
        pytest.skip("triton not installed")
    assert row.usable and row.version == version
    assert "TRITON_INTERPRET=1" in row.detail


def test_model_library_versions_from_metadata(checks):
    import importlib.metadata as md

    rows = by_name(checks)
    for name in ("onnx", "transformers", "timm"):
        try:
            v = md.version(name)
        except md.PackageNotFoundError:
            assert not rows[name].usable and "not installed" in rows[name].detail
        else:
            assert rows[name].usable and rows[name].version == v


def test_environment_keys_and_types():
    env = doctor.environment()
    assert set(env) == ENV_KEYS
    for key in ENV_KEYS - {"gpu", "tensorrt"}:
        assert isinstance(env[key], str) and env[key], key
    assert env["torch"] == torch.__version__
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
    assert "logical cores" in env["cpu"]
    for key in ("gpu", "tensorrt"):
        assert env[key] is None or isinstance(env[key], str)
    if NO_GPU:
        assert env["gpu"] is None
    json.dumps(env)


def test_render_and_json(checks):
    console = Console(record=True, width=200)
    doctor.render_checks(checks, console=console)
    text = console.export_text()
    for name in EXPECTED:
        assert name in text, name
    assert "✓" in text and "✗" in text
    data = doctor.checks_to_json(checks)
    assert json.loads(json.dumps(data)) == data
    assert [d["name"] for d in data] == EXPECTED
    assert set(data[0]) == {"name", "usable", "version", "detail"}


def test_render_does_not_interpret_markup():
    console = Console(record=True, width=200)
    doctor.render_checks([doctor.Check("x", False, None, "failed: [bold]bad[/] [red")], console=console)
    assert "[bold]bad[/] [red" in console.export_text()


def test_failing_probe_becomes_not_usable_row(monkeypatch):
    def boom(ctx):
        raise RuntimeError("simulated\nprobe failure")

    monkeypatch.setattr(doctor, "_probe_onnxruntime", boom)
    monkeypatch.setattr(doctor, "_probe_timm", boom)
    rows = doctor.run_checks()
    assert [r.name for r in rows] == EXPECTED
    named = by_name(rows)
    for name in ("onnxruntime CPU", "onnxruntime CUDA", "onnxruntime TensorRT", "timm"):
        assert not named[name].usable
        assert "RuntimeError: simulated probe failure" in named[name].detail
    assert named["torch"].usable  # the other rows are unaffected


def test_failing_gpu_detection_counts_as_no_gpu(monkeypatch):
    def boom(ctx):
        raise OSError("driver exploded")

    monkeypatch.setattr(probes, "gpu_info", boom)
    rows = by_name(doctor.run_checks())
    assert not rows["GPU"].usable and "driver exploded" in rows["GPU"].detail
    for name in ("onnxruntime CUDA", "Triton (GPU)", "TensorRT"):
        assert not rows[name].usable
    assert doctor.environment()["gpu"] is None


def test_no_heavy_model_libraries_imported():
    code = ("import deploykit.doctor as d; d.run_checks(); d.environment(); import sys; "
            "print(any(m in sys.modules for m in ('transformers','timm','torchvision')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


# ---------------------------------------------------------------- fake GPU / TensorRT


def _fake_gpu(ctx):
    return probes.GpuInfo(devices=[probes.Gpu("NVIDIA H100 80GB HBM3", (9, 0))], source="torch",
                          driver="570.86", cuda="12.8", torch_cuda=True)


def _fake_tensorrt(tmp_path, monkeypatch, body: str) -> Path:
    pkg = tmp_path / "fake_site" / "tensorrt"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(body))
    site = str(pkg.parent)
    monkeypatch.syspath_prepend(site)
    monkeypatch.setenv("PYTHONPATH", site + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return pkg


def test_tensorrt_stub_is_not_usable(tmp_path, monkeypatch):
    _fake_tensorrt(tmp_path, monkeypatch, "# placeholder package\n")
    monkeypatch.setattr(probes, "gpu_info", _fake_gpu)  # even with a GPU
    row = by_name(doctor.run_checks())["TensorRT"]
    assert not row.usable
    assert "stub" in row.detail and "Builder" in row.detail
    assert doctor.environment()["tensorrt"] is None


def test_tensorrt_import_error_is_not_usable(tmp_path, monkeypatch):
    _fake_tensorrt(tmp_path, monkeypatch, "raise ImportError('libnvinfer.so.10: cannot open shared object file')\n")
    row = doctor._probe_tensorrt(probes.Context())[0]
    assert not row.usable and "libnvinfer.so.10" in row.detail


def test_tensorrt_crashing_or_hanging_import_is_contained(tmp_path, monkeypatch):
    _fake_tensorrt(tmp_path, monkeypatch, "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    row = doctor._probe_tensorrt(probes.Context())[0]
    assert not row.usable and "crashed" in row.detail

    (tmp_path / "fake_site" / "tensorrt" / "__init__.py").write_text("import time\ntime.sleep(60)\n")
    monkeypatch.setattr(probes, "TENSORRT_IMPORT_TIMEOUT_S", 1.5)
    row = doctor._probe_tensorrt(probes.Context())[0]
    assert not row.usable and "did not finish" in row.detail


REAL_LOOKING_TRT = """
from pathlib import Path
__version__ = "{version}"
_MARK = Path({mark!r})
class _Made:
    def __init__(self, *a, **k):
        _MARK.write_text(type(self).__name__)
class Builder(_Made): pass
class Logger(_Made): pass
class Runtime(_Made): pass
class OnnxParser(_Made): pass
"""


@pytest.mark.parametrize("gpu", [False, True])
def test_real_tensorrt_never_instantiated(tmp_path, monkeypatch, gpu):
    mark = tmp_path / "created"
    _fake_tensorrt(tmp_path, monkeypatch, REAL_LOOKING_TRT.format(version="10.16.0.1", mark=str(mark)))
    if gpu:
        monkeypatch.setattr(probes, "gpu_info", _fake_gpu)
    else:
        monkeypatch.setattr(probes, "gpu_info", lambda ctx: probes.GpuInfo(reason="no GPU (test)"))
    row = by_name(doctor.run_checks())["TensorRT"]
    assert row.version == "10.16.0.1"
    assert row.usable is gpu
    assert ("no CUDA GPU" in row.detail) is (not gpu)
    assert "plugin path OK" in row.detail
    assert not mark.exists(), "doctor created a TensorRT object"
    assert doctor.environment()["tensorrt"] == "10.16.0.1"


def test_old_tensorrt_flags_plugin_path(tmp_path, monkeypatch):
    _fake_tensorrt(tmp_path, monkeypatch, REAL_LOOKING_TRT.format(version="10.8.0.43", mark=str(tmp_path / "m")))
    monkeypatch.setattr(probes, "gpu_info", _fake_gpu)
    row = doctor._probe_tensorrt(probes.Context())[0]
    assert row.usable and "older than 10.15" in row.detail


def test_fake_gpu_makes_gpu_rows_depend_on_providers(monkeypatch):
    monkeypatch.setattr(probes, "gpu_info", _fake_gpu)
    rows = by_name(doctor.run_checks())
    assert rows["GPU"].usable and "sm_90" in rows["GPU"].detail
    assert rows["Triton (GPU)"].usable == (rows["Triton (interpreter)"].usable)
    import onnxruntime as ort

    has_cuda_ep = "CUDAExecutionProvider" in ort.get_available_providers()
    assert rows["onnxruntime CUDA"].usable is has_cuda_ep
    if not has_cuda_ep:
        assert "no CUDA GPU" not in rows["onnxruntime CUDA"].detail
        assert "CUDAExecutionProvider not available" in rows["onnxruntime CUDA"].detail
    assert doctor.environment()["gpu"] == "NVIDIA H100 80GB HBM3 (sm_90, driver 570.86, CUDA 12.8)"


FAKE_SMI = """#!/bin/sh
case "$1" in
  --query-gpu=*) echo "NVIDIA H100 80GB HBM3, 9.0, 550.54.15"; echo "NVIDIA H100 80GB HBM3, 9.0, 550.54.15";;
  -L) echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)";;
  "") echo "| NVIDIA-SMI 550.54.15   Driver Version: 550.54.15   CUDA Version: 12.4 |";;
  *) exit 9;;
esac
"""


def _fake_nvidia_smi(tmp_path, monkeypatch, script: str) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "nvidia-smi"
    exe.write_text(script)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(bindir) + os.pathsep + os.environ.get("PATH", ""))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a GPU; nvidia-smi path not used")
def test_nvidia_smi_gpu_with_cpu_torch(tmp_path, monkeypatch):
    _fake_nvidia_smi(tmp_path, monkeypatch, FAKE_SMI)
    rows = by_name(doctor.run_checks())
    gpu = rows["GPU"]
    assert gpu.usable and "2x NVIDIA H100 80GB HBM3 (sm_90, driver 550.54.15, CUDA 12.4)" in gpu.detail
    assert "via nvidia-smi" in gpu.detail
    if torch.version.cuda is None:
        assert "CPU build and cannot use it" in gpu.detail
        assert not rows["Triton (GPU)"].usable and "torch cannot use it" in rows["Triton (GPU)"].detail
    assert doctor.environment()["gpu"] == "2x NVIDIA H100 80GB HBM3 (sm_90, driver 550.54.15, CUDA 12.4)"

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    gpu = by_name(doctor.run_checks())["GPU"]
    assert not gpu.usable and "CUDA_VISIBLE_DEVICES" in gpu.detail


def test_hanging_or_failing_nvidia_smi(tmp_path, monkeypatch):
    _fake_nvidia_smi(tmp_path, monkeypatch, "#!/bin/sh\nsleep 30\n")
    monkeypatch.setattr(probes, "NVIDIA_SMI_TIMEOUT_S", 0.5)
    info = probes.nvidia_smi()
    assert info[0] == [] and "timed out" in info[3]

    (tmp_path / "bin" / "nvidia-smi").write_text(
        "#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.' >&2\nexit 9\n")
    info = probes.nvidia_smi()
    assert info[0] == [] and "could not communicate" in info[3]


def test_triton_missing_says_so_and_still_says_why_no_gpu(monkeypatch):
    real = doctor.module_installed
    monkeypatch.setattr(doctor, "module_installed", lambda name: False if name == "triton" else real(name))
    rows = by_name(doctor.run_checks())
    for name in ("Triton (GPU)", "Triton (interpreter)"):
        assert not rows[name].usable and "triton not installed" in rows[name].detail
    if not rows["GPU"].usable:
        assert "no CUDA GPU" in rows["Triton (GPU)"].detail
