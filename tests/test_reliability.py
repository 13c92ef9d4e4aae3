"""Bad inputs a deployment engineer will feed deploykit sooner or later: each ends in one
line naming the file and the fix, exit code 2, nothing written, nothing executed."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from test_cli import assert_user_error, deploykit  # noqa: E402

VIT = ["--option", "img_size=16", "--option", "patch_size=4", "--option", "in_chans=1", "--option", "num_classes=10",
       "--option", "kwargs={embed_dim: 32, depth: 1, num_heads: 2}"]


@pytest.fixture(scope="module")
def vit_onnx(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vit")
    deploykit("-q", "export", "timm:vit_tiny_patch16_224", "-o", "vit.onnx", *VIT, cwd=folder)
    return folder / "vit.onnx"


def test_a_stage_rebuilds_the_exported_model_from_the_file_alone(vit_onnx, tmp_path):
    """The export records its options (img_size 16, ...): verify needs no --option again."""
    np.savez(tmp_path / "good.npz", pixel_values=np.random.default_rng(0).standard_normal((8, 1, 16, 16),
                                                                                         dtype=np.float32))
    proc = deploykit("-q", "verify", str(vit_onnx), "--data", "good.npz", "--report", "r.json", cwd=tmp_path)
    assert proc.returncode == 0 and (tmp_path / "r.json").is_file()


@pytest.mark.parametrize("name,array,fragment", [
    ("shape", np.zeros((4, 1, 12, 12), np.float32), "the model takes (N, 1, 16, 16)"),
    ("dtype", np.zeros((4, 1, 16, 16), np.int64), "is int64, the model takes float32"),
    ("nan", np.full((4, 1, 16, 16), np.nan, np.float32), "NaN or inf"),
    ("empty", np.zeros((0, 1, 16, 16), np.float32), "non-zero number of samples"),
])
def test_wrong_feeds_are_refused_before_any_work(vit_onnx, tmp_path, name, array, fragment):
    np.savez(tmp_path / f"{name}.npz", pixel_values=array)
    for command in (["verify", str(vit_onnx)], ["calibrate", str(vit_onnx), "-o", "x.onnx"]):
        proc = deploykit(*command, "--data", f"{name}.npz", cwd=tmp_path, check_rc=None)
        assert_user_error(proc, f"{name}.npz", fragment)
    assert not (tmp_path / "x.onnx").exists()


def test_truncated_onnx_is_refused(vit_onnx, tmp_path):
    data = vit_onnx.read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    assert_user_error(deploykit("calibrate", "cut.onnx", "-o", "x.onnx", "--data", "digits", cwd=tmp_path,
                                check_rc=None), "cut.onnx", "not a readable ONNX model")
    assert not (tmp_path / "x.onnx").exists()


def test_a_pickle_with_a_payload_is_never_executed(tmp_path):
    import torch

    marker = tmp_path / "PAYLOAD_RAN"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"weight": Payload()}, tmp_path / "evil.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    for name in ("evil.pt", "bad.safetensors"):
        proc = deploykit("export", "timm:vit_tiny_patch16_224", "-o", "m.onnx", *VIT, "--option",
                         f"checkpoint={name}", cwd=tmp_path, check_rc=None)
        assert_user_error(proc, name, "cannot read checkpoint")
    assert not marker.exists() and not (tmp_path / "m.onnx").exists()
