"""Edge bundles end to end: a run writes one, a fresh folder unpacks and device-verifies it, and
every way a bundle can be wrong (tampered file, rewritten archive, unsafe members, another
target or architecture, an engine for another GPU, a full disk) ends in one line, exit code 2,
nothing written outside the destination."""

from __future__ import annotations

import errno
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from test_cli import assert_user_error, deploykit  # noqa: E402
from trt_standin import stand_in_tensorrt  # noqa: E402

from deploykit.io import sha256_file  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tiny_bert_dir, tmp_path_factory) -> Path:
    """A tiny run for edge-cpu-x86 (and h100, jetson-orin as further targets) with its bundle."""
    from deploykit.pipeline import run_recipe

    work = tmp_path_factory.mktemp("bundle-run")
    recipe = work / "tiny.yaml"
    recipe.write_text(f"""
name: tiny
targets: [edge-cpu-x86, h100, jetson-orin, edge-cpu-arm]
model: {{source: "{tiny_bert_dir}", options: {{max_length: 64}}}}
data: {{source: docstrings, calibration: 24, evaluation: 48, seed: 3}}
quantize: {{preset: gpu-trt, method: minmax}}
bench: {{batches: [1], seq_len: 64, warmup: 0, iterations: 2, min_seconds: 0.0, torch_baseline: false}}
package: {{targets: [edge-cpu-x86]}}
acceptance: {{fp32.cosine_min: '>= 0.99999', int8.cosine_mean: '>= 0.9'}}
""")
    result = run_recipe(recipe, out_root=work / "runs")
    assert result.accepted
    return result.run_dir


@pytest.fixture(scope="module")
def bundle(run_dir) -> Path:
    return run_dir / "bundles" / "tiny-edge-cpu-x86.tar.gz"


def _fresh(tmp_path: Path, bundle: Path) -> Path:
    """The bundle and its .sha256 copied into an empty folder, as a device receives them."""
    shutil.copy(bundle, tmp_path / bundle.name)
    shutil.copy(bundle.with_name(bundle.name + ".sha256"), tmp_path)
    return tmp_path / bundle.name


def test_the_run_reports_backends_targets_and_its_bundle(run_dir, bundle):
    from deploykit.report import validate_report

    report = json.loads((run_dir / "report.json").read_text())
    validate_report(report)
    assert report["target"] == "edge-cpu-x86"
    assert {"fp32@torch", "fp32@ort-cpu", "int8@ort-cpu"} <= set(report["parity"])
    assert report["verification"]["backends_skipped"]["tensorrt"]           # not installed here: said, not faked
    edge = report["targets"]["edge-cpu-x86"]
    assert edge["measurable"] and edge["latency"]["int8"]["batch"] == 1 and edge["latency"]["int8"]["peak_rss_mib"] > 0
    assert not report["targets"]["h100"]["measurable"] and "not measurable here" in report["targets"]["h100"]["reason"]
    assert not report["targets"]["edge-cpu-arm"]["measurable"]
    assert report["bundles"]["edge-cpu-x86"]["sha256"] == sha256_file(bundle)
    md = (run_dir / "report.md").read_text()
    for heading in ("## Accuracy per backend", "## Targets", "## Edge bundles"):
        assert heading in md
    # report.md names the run's files relative to itself, the recipe by its file name
    assert str(run_dir) not in md and str(run_dir.parent.parent) not in md
    assert "**recipe** `tiny.yaml`" in md and "`model.int8.onnx`" in md
    # one accuracy table, no alias rows, no raw dicts, only settings that took effect
    assert md.count("| variant | cosine_mean") == 0 and md.count("| variant@backend | cosine_mean") == 1
    assert "parity_max_abs_diff" not in md and "shape=" not in md and "max_abs_diff=" not in md
    assert "smoothquant_targets" not in md and "`plugin_int8`" not in md     # no smoothing, no plugin nodes
    h100 = next(line for line in md.splitlines() if line.startswith("| `h100`") and "not measurable" in line)
    assert h100.split("|")[3].strip() == "—"                                 # not in the variant column
    assert "- `h100`: " in md and "not measurable here" in md
    assert (run_dir / "parity_by_backend.png").is_file() and (run_dir / "latency_by_target.png").is_file()


def test_bundle_layout_and_manifest(bundle):
    with tarfile.open(bundle) as tar:
        names = set(tar.getnames())
        manifest = json.load(tar.extractfile("tiny-edge-cpu-x86/manifest.json"))
    for rel in ("model/model.int8.onnx", "model/model.onnx", "model/model.int8.ranges.json", "verify/inputs.npz",
                "verify/expected.npz", "verify/thresholds.json", "README.md"):
        assert f"tiny-edge-cpu-x86/{rel}" in names and rel in manifest["files"]
    assert manifest["target"]["name"] == "edge-cpu-x86" and manifest["inputs"]["samples"] == 48
    assert manifest["versions"]["onnxruntime"] and manifest["versions"]["deploykit"]
    assert manifest["flags"]["calibration"]["activation_symmetric"] is True
    assert all(c["passed"] for c in manifest["verify"]["here"]["checks"])
    assert not any(n.startswith("tiny-edge-cpu-x86/plugins/") for n in names)   # no custom ops, CPU target
    # the bundle names no path of the packaging machine: models by their place in the run
    assert manifest["recipe"] == "tiny.yaml" and manifest["source_files"]["int8"] == "model.int8.onnx"
    assert not _absolute_strings(manifest), _absolute_strings(manifest)


def _absolute_strings(data) -> list[str]:
    """Every string in a JSON document that is (or holds) an absolute path."""
    if isinstance(data, dict):
        return [s for k, v in data.items() for s in _absolute_strings(k) + _absolute_strings(v)]
    if isinstance(data, list):
        return [s for v in data for s in _absolute_strings(v)]
    if isinstance(data, str):
        return [data] if any(part.startswith("/") and len(part) > 1 and "/" in part[1:]
                             for part in data.replace(":", " ").replace("'", " ").split()) else []
    return []


def test_fresh_folder_unpacks_and_device_verifies(bundle, tmp_path):
    archive = _fresh(tmp_path, bundle)
    deploykit("-q", "unpack", archive.name, "--target", "edge-cpu-x86", cwd=tmp_path)
    proc = deploykit("device-verify", "tiny-edge-cpu-x86", "--out", "dv.json", "--iterations", "3", cwd=tmp_path)
    assert "PASS" in proc.stdout
    result = json.loads((tmp_path / "dv.json").read_text())
    assert result["passed"] and result["backend"] == "ort-cpu" and result["samples"] == 48
    # Same machine, same runtime: the outputs where it was packaged come back; at most float
    # rounding (1e-5 on unit-norm embeddings) if the thread counts split a reduction differently.
    assert result["vs_packaging_machine"]["int8@ort-cpu"]["max_abs_diff"] <= 1e-5
    assert result["latency_b1"]["int8@ort-cpu"]["p50_ms"] > 0
    assert 0 < result["memory"]["peak_rss_mib"] and result["memory"]["budget_mib"] == 4096
    # the archive itself, unpacked to a temporary folder and removed
    assert "PASS" in deploykit("device-verify", archive.name, "--iterations", "2", cwd=tmp_path).stdout
    # an ONNX Runtime device needs no torch: device-verify does not load it
    code = ("import sys; from deploykit.cli import main; sys.argv = ['deploykit', '-q', 'device-verify', "
            "'tiny-edge-cpu-x86', '--iterations', '1']\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('torch loaded' if 'torch' in sys.modules else 'no torch')")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "no torch", out.stdout + out.stderr


def _rewrite(src: Path, dest: Path, change) -> None:
    """Copy a bundle member by member through ``change(info, data) -> [(info, data), ...]``."""
    with tarfile.open(src) as tar, tarfile.open(dest, "w:gz") as out:
        for info in tar.getmembers():
            data = tar.extractfile(info).read() if info.isfile() else None
            for new_info, new_data in change(info, data):
                if new_data is not None:
                    new_info.size = len(new_data)
                out.addfile(new_info, io.BytesIO(new_data) if new_data is not None else None)


def test_tampered_file_is_refused(bundle, tmp_path):
    def flip(info, data):
        if info.name.endswith("model/model.int8.onnx"):
            data = data[:-1] + bytes([data[-1] ^ 1])
        return [(info, data)]

    _rewrite(bundle, tmp_path / "b.tar.gz", flip)      # no .sha256 beside it: the manifest still catches it
    proc = deploykit("unpack", "b.tar.gz", "--out", "dest", cwd=tmp_path, check_rc=None)
    assert_user_error(proc, "model/model.int8.onnx", "does not match its manifest SHA-256")
    assert not (tmp_path / "dest").exists()


def test_rewritten_archive_is_refused_by_its_sha256(bundle, tmp_path):
    archive = _fresh(tmp_path, bundle)
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    for command in (["unpack", archive.name], ["device-verify", archive.name]):
        assert_user_error(deploykit(*command, cwd=tmp_path, check_rc=None), "does not match its SHA-256")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([archive.name, archive.name + ".sha256"])


def _member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes | None = b"x", link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info, (data if kind == tarfile.REGTYPE else None)


@pytest.mark.parametrize("extra,fragment", [
    (_member("tiny-edge-cpu-x86/../../evil.txt"), "climbs out of the bundle"),
    (_member("/tmp/evil.txt"), "absolute path"),
    (_member("tiny-edge-cpu-x86/link", tarfile.SYMTYPE, link="/etc/passwd"), "is a link"),
    (_member("tiny-edge-cpu-x86/hard", tarfile.LNKTYPE, link="tiny-edge-cpu-x86/README.md"), "is a link"),
    (_member("tiny-edge-cpu-x86/dev", tarfile.CHRTYPE), "device or FIFO"),
    (_member("tiny-edge-cpu-x86/fifo", tarfile.FIFOTYPE), "device or FIFO"),
])
def test_unsafe_members_are_refused_before_anything_is_written(bundle, tmp_path, extra, fragment):
    _rewrite(bundle, tmp_path / "b.tar.gz", lambda info, data: [(info, data)] + (
        [extra] if info.name.endswith("README.md") else []))
    proc = deploykit("unpack", "b.tar.gz", "--out", "sub/dest", cwd=tmp_path, check_rc=None)
    assert_user_error(proc, "b.tar.gz", fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.tar.gz"]
    assert not (tmp_path.parent / "evil.txt").exists()


def test_added_file_and_another_target_are_refused(bundle, tmp_path):
    _rewrite(bundle, tmp_path / "b.tar.gz", lambda info, data: [(info, data)] + (
        [_member("tiny-edge-cpu-x86/model/extra.onnx")] if info.name.endswith("README.md") else []))
    assert_user_error(deploykit("unpack", "b.tar.gz", cwd=tmp_path, check_rc=None), "extra.onnx",
                      "not in the manifest")
    archive = _fresh(tmp_path, bundle)
    assert_user_error(deploykit("unpack", archive.name, "--target", "jetson-orin", cwd=tmp_path, check_rc=None),
                      "for target 'edge-cpu-x86', not 'jetson-orin'")
    assert not (tmp_path / "tiny-edge-cpu-x86").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    assert_user_error(deploykit("unpack", archive.name, "--out", "busy", cwd=tmp_path, check_rc=None),
                      "not empty")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


def test_gpu_and_arm_bundles(run_dir, tmp_path):
    """A jetson-orin bundle carries a TensorRT calibration cache and the plugin sources; on this
    machine (no TensorRT) device-verify refuses in one line; an arm bundle refuses x86."""
    deploykit("-q", "package", str(run_dir), "--target", "jetson-orin", "-o", str(tmp_path / "orin.tar.gz"),
              "--samples", "8", cwd=tmp_path)
    with tarfile.open(tmp_path / "orin.tar.gz") as tar:
        names = set(tar.getnames())
        cache = tar.extractfile("tiny-jetson-orin/model/calibration.cache").read().decode()
    assert cache.startswith("TRT-") and "tiny-jetson-orin/plugins/trt_common.py" in names
    assert "tiny-jetson-orin/plugins/neighborhood_attention/trt_plugin.py" in names
    proc = deploykit("device-verify", "orin.tar.gz", "--allow-other-arch", cwd=tmp_path, check_rc=None)
    assert_user_error(proc, "TensorRT")
    proc = deploykit("device-verify", "orin.tar.gz", cwd=tmp_path, check_rc=None)
    assert_user_error(proc, "for aarch64", "this machine is x86_64")
    deploykit("-q", "package", str(run_dir), "--target", "edge-cpu-arm", "-o", str(tmp_path / "arm.tar.gz"),
              "--samples", "8", cwd=tmp_path)
    assert_user_error(deploykit("device-verify", "arm.tar.gz", cwd=tmp_path, check_rc=None), "this machine is x86_64")
    proc = deploykit("device-verify", "arm.tar.gz", "--allow-other-arch", "--iterations", "2", cwd=tmp_path)
    assert "PASS" in proc.stdout


def test_an_engine_built_for_another_gpu_is_refused(run_dir, tmp_path):
    """An h100 bundle whose engine metadata says sm_87 (e.g. copied from a Jetson): refused
    before TensorRT is needed, with the manifest re-hashed so only the metadata is wrong."""
    deploykit("-q", "package", str(run_dir), "--target", "h100", "-o", str(tmp_path / "h100.tar.gz"), "--samples", "8",
              cwd=tmp_path)
    deploykit("-q", "unpack", "h100.tar.gz", "--out", "h100", cwd=tmp_path)
    folder = tmp_path / "h100"
    (folder / "engines").mkdir()
    (folder / "engines" / "model.int8.engine").write_bytes(b"not an engine")
    (folder / "engines" / "model.int8.json").write_text(json.dumps(
        {"compute_capability": "8.7", "gpu": "Orin", "tensorrt": "10.3.0"}))
    manifest = json.loads((folder / "manifest.json").read_text())
    for rel in ("engines/model.int8.engine", "engines/model.int8.json"):
        manifest["files"][rel] = {"sha256": sha256_file(folder / rel), "bytes": (folder / rel).stat().st_size}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    proc = deploykit("device-verify", "h100", cwd=tmp_path, check_rc=None)
    assert_user_error(proc, "model.int8.json", "built for sm_87", "sm_90")


def test_a_missed_threshold_on_the_device_exits_1(run_dir, tmp_path):
    """A run whose models miss a threshold is not packaged (exit 1); packaged anyway
    (--allow-failing), the bundle carries the threshold and device-verify fails on it."""
    strict = tmp_path / "strict"
    shutil.copytree(run_dir, strict, ignore=shutil.ignore_patterns("bundles"))
    report = json.loads((strict / "report.json").read_text())
    report["recipe_settings"]["acceptance"]["int8.cosine_mean"] = ">= 1.1"
    (strict / "report.json").write_text(json.dumps(report))
    proc = deploykit("package", str(strict), "--target", "edge-cpu-x86", "-o", "s.tar.gz", cwd=tmp_path, check_rc=1)
    assert "int8@ort-cpu.cosine_mean >= 1.1" in proc.stderr and not (tmp_path / "s.tar.gz").exists()
    deploykit("-q", "package", str(strict), "--target", "edge-cpu-x86", "-o", "s.tar.gz", "--allow-failing",
              cwd=tmp_path)
    proc = deploykit("device-verify", "s.tar.gz", "--iterations", "2", cwd=tmp_path, check_rc=1)
    assert "FAIL" in proc.stdout


def test_disk_full_while_packaging_leaves_nothing(run_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from deploykit.cli import app

    real = tarfile.TarFile.addfile
    calls = {"n": 0}

    def full(self, info, fileobj=None, **kw):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, info, fileobj, **kw)

    monkeypatch.setattr(tarfile.TarFile, "addfile", full)
    out = tmp_path / "b.tar.gz"
    result = CliRunner().invoke(app, ["-q", "package", str(run_dir), "--target", "edge-cpu-x86", "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert "No space left on device" in result.output and "nothing was written" in result.output
    assert list(tmp_path.iterdir()) == []          # no bundle, no temporary file, no .sha256


def test_a_study_variant_with_deploykit_ops_ships_with_its_kernels(tmp_path):
    """One variant of an attention-swap study (a 2-D neighborhood-attention ViT): for h100 the
    bundle carries the op sources and PTX for sm_90 (float and INT8 forms); for edge-cpu-x86 it
    device-verifies under thresholds derived from the figures where it was packaged."""
    pytest.importorskip("triton")
    deploykit("-q", "run", "swap-attention-vit-digits", "--out", "out", "--name", "s", "--set", "train.epochs=1",
              "--set", "data.evaluation=32", "--set", "data.calibration=16", "--set",
              "model.options.kwargs={embed_dim: 64, depth: 1, num_heads: 2, mlp_ratio: 2.0}", "--set",
              "model.options.patch_size=4", "--set",
              "study.variants={na: [{name: neighborhood-attention, kernel_size: 3}]}", "--set", "acceptance={}",
              "--set", "study.layer_latency.enabled=false", cwd=tmp_path)
    assert_user_error(deploykit("package", "out/s", "--target", "h100", cwd=tmp_path, check_rc=None), "--variant")
    deploykit("-q", "package", "out/s", "--variant", "na", "--target", "h100", "-o", "h.tar.gz", cwd=tmp_path)
    with tarfile.open(tmp_path / "h.tar.gz") as tar:
        names = tar.getnames()
        manifest = json.load(tar.extractfile("swap-attention-vit-digits-na-h100/manifest.json"))
        ptx = {n: tar.extractfile(n).read().decode() for n in names if n.endswith(".ptx")}
    assert sorted(Path(n).name for n in ptx) == ["NeighborhoodAttention2DInt8_k3x3_d1x1_hd32_int8_sm90.ptx",
                                                "NeighborhoodAttention2D_k3x3_d1x1_hd32_fp32_sm90.ptx"]
    assert all(".target sm_90" in text and ".entry na2d_" in text for text in ptx.values())
    assert "swap-attention-vit-digits-na-h100/plugins/neighborhood_attention/reference.py" in names
    assert set(manifest["verify"]["rules"]) == {"fp32.cosine_min", "int8.cosine_mean"}
    deploykit("-q", "package", "out/s", "--variant", "na", "--target", "edge-cpu-x86", "-o", "e.tar.gz", cwd=tmp_path)
    assert "PASS" in deploykit("device-verify", "e.tar.gz", "--iterations", "2", cwd=tmp_path).stdout


def test_device_verify_on_tensorrt_uses_a_matching_engine_or_builds_one(run_dir, tmp_path, monkeypatch):
    """The TensorRT branch of device-verify with TensorRT stood in for (it is not installed
    here): an engine built for this GPU and TensorRT is used as bundled, a missing one is built
    on the device for the bundle's target, a TensorRT outside the target's range is refused.
    The stand-in runs the engine's ONNX model on ONNX Runtime."""
    import deploykit.package as package
    import deploykit.package.unpack as unpack
    from deploykit.errors import UserError

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("bundles"))
    (run / "model.int8.engine").write_bytes(b"engine for sm_90")
    (run / "model.int8.json").write_text(json.dumps({"compute_capability": "9.0", "tensorrt": "10.15.1",
                                                     "gpu": "NVIDIA H100", "plugins": []}))
    (run / "model.engine").write_bytes(b"engine from an older model.onnx")
    (run / "model.json").write_text(json.dumps({"compute_capability": "9.0", "tensorrt": "10.15.1",
                                                "gpu": "NVIDIA H100", "onnx_sha256": "00" * 32}))
    h100 = package.package_run(run, "h100", tmp_path / "h100.tar.gz", samples=8)
    assert "engines/model.int8.engine" in h100.manifest["files"]
    assert "engines/model.engine" not in h100.manifest["files"]
    assert any("built from another version of model.onnx" in n for n in h100.manifest["notes"])
    a100 = package.package_run(run, "a100", tmp_path / "a100.tar.gz", samples=8)
    assert not any(k.startswith("engines/") for k in a100.manifest["files"])
    assert any("not bundled" in n and "sm_90" in n for n in a100.manifest["notes"])

    calls = stand_in_tensorrt(monkeypatch, gpu="NVIDIA H100", compute_capability="9.0",
                              onnx_of=lambda engine: engine.parent.parent / "model" / f"{engine.stem}.onnx")
    monkeypatch.setattr(unpack, "_tensorrt_version", lambda: "10.15.1")
    result = package.device_verify(tmp_path / "h100.tar.gz", iterations=2)
    assert result["backend"] == "tensorrt" and result["passed"]
    # int8 ran its bundled engine; fp32 was built here, for the target, with the recipe's shapes
    # (bench batches [1] and max_length 64) widened to device-verify's batches of 32
    built = [(c["onnx"].name, c["target"], (c["ranges"].batch, c["ranges"].sequence)) for c in calls]
    assert built == [("model.onnx", "h100", ((1, 1, 32), (1, 64, 64)))]
    monkeypatch.setattr(unpack, "_tensorrt_version", lambda: "10.3.0")
    with pytest.raises(UserError, match="this machine has TensorRT 10.3.0"):
        package.device_verify(tmp_path / "h100.tar.gz", iterations=2)


def test_verify_a_run_folder_adds_to_its_report(run_dir, tmp_path):
    """`deploykit verify <run>`: the run's models, saved inputs, reference and thresholds; the
    parity lands in the run's own report, whose data record stays as the run wrote it."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("bundles"))
    before = json.loads((run / "report.json").read_text())
    deploykit("-q", "verify", "run", "--backend", "ort-cpu", cwd=tmp_path)
    after = json.loads((run / "report.json").read_text())
    assert after["data"] == before["data"] and after["run"] == "tiny"
    assert after["verification"]["inputs"].endswith("data/evaluation.npz")
    assert after["parity"]["int8@ort-cpu"] == before["parity"]["int8@ort-cpu"]    # same inputs, same figures
    assert [c["check"] for c in after["acceptance"]] == ["fp32@ort-cpu.cosine_min", "int8@ort-cpu.cosine_mean"]
    assert_user_error(deploykit("verify", str(tmp_path), cwd=tmp_path, check_rc=None), "not a run folder")
