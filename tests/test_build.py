"""deploykit build: what can be proven without TensorRT or a GPU.

The engine build itself needs TensorRT >= 10.15 and a CUDA device, which the machines these
tests run on do not have; ``test_engine_builds_and_matches_ort`` runs only where both exist
and is skipped here with that reason. Around it: the exact one-line refusal (exit 2) when
TensorRT or the GPU is missing, the optimization profile from the model's axes and the
recipe's shapes, and the parser-ready copy (``aot=1`` on deploykit nodes, input untouched).
"""

from __future__ import annotations

import sys
from pathlib import Path

import onnx
import pytest

sys.path.insert(0, str(Path(__file__).parent))


def trt_ready() -> str | None:
    """Why a real build cannot run here (None when it can)."""
    from deploykit.errors import UserError

    try:
        from deploykit.engine import require_tensorrt

        require_tensorrt()
    except UserError as exc:
        return exc.one_line()
    return None


def test_build_refuses_with_one_line_when_tensorrt_or_gpu_is_missing(tiny_onnx, tmp_path):
    from test_cli import assert_user_error, deploykit

    reason = trt_ready()
    if reason is None:
        pytest.skip("TensorRT and a GPU are present: the refusal path does not apply")
    result = deploykit("build", str(tiny_onnx), "--out", str(tmp_path / "m.engine"), cwd=tmp_path, check_rc=None)
    assert_user_error(result)
    line = result.stderr.strip()
    assert ("TensorRT is not usable here" in line or "no CUDA device" in line or "older than" in line), line
    assert not (tmp_path / "m.engine").exists() and not list(tmp_path.glob("*.tmp"))


def test_bad_range_and_missing_model_are_user_errors(tiny_onnx, tmp_path):
    from test_cli import assert_user_error, deploykit

    assert_user_error(deploykit("build", str(tiny_onnx), "--batch", "8,1,32", cwd=tmp_path, check_rc=None),
                      "bad batch range")
    assert_user_error(deploykit("build", str(tiny_onnx), "--seq", "1,x", cwd=tmp_path, check_rc=None),
                      "--seq must be MIN,OPT,MAX")
    assert_user_error(deploykit("build", str(tmp_path / "none.onnx"), cwd=tmp_path, check_rc=None),
                      "ONNX file not found")


def test_profile_from_model_axes_and_recipe(tiny_onnx):
    from deploykit.engine import ShapeRanges, optimization_profile
    from deploykit.recipe import load_recipe

    model = onnx.load(str(tiny_onnx))
    ranges = ShapeRanges.from_recipe(load_recipe(None))
    profile = optimization_profile(model, ranges)
    names = [i.name for i in model.graph.input]
    assert set(profile) == set(names)
    for name, (lo, opt, hi) in profile.items():
        assert lo == (1, 1) and hi == (ranges.batch[2], ranges.sequence[2]), (name, lo, hi)
        assert opt == (ranges.batch[1], ranges.sequence[1])


def test_fixed_axes_stay_fixed_and_plugin_nodes_ask_for_aot(tmp_path):
    from test_plugin_int8 import exported

    from deploykit.engine import ShapeRanges, optimization_profile, plugin_ready_copy

    path = exported("na2d", tmp_path)
    before = path.read_bytes()
    model = onnx.load(str(path))
    profile = optimization_profile(model, ShapeRanges(batch=(1, 4, 16)))
    assert profile == {"pixel_values": ((1, 1, 8, 8), (4, 1, 8, 8), (16, 1, 8, 8))}
    ready, ops = plugin_ready_copy(model)
    assert ops == ["NeighborhoodAttention2D"]
    node = next(n for n in ready.graph.node if n.domain == "deploykit")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["aot"] == 1 and attrs["plugin_namespace"] == b"deploykit"
    assert not any(a.name == "aot" for n in model.graph.node for a in n.attribute)   # the input is untouched
    assert path.read_bytes() == before
    _, ops = plugin_ready_copy(model, aot=False)
    assert ops == ["NeighborhoodAttention2D"]


def test_tensorrt_runner_needs_an_engine(tiny_onnx):
    from deploykit.errors import UserError
    from deploykit.runners import make_runner

    with pytest.raises(UserError, match="no TensorRT engine next to this model|build it first"):
        make_runner("tensorrt", model_path=tiny_onnx)


@pytest.mark.skipif(trt_ready() is not None, reason=f"needs TensorRT >= 10.15 and a CUDA device: {trt_ready()}")
def test_engine_builds_and_matches_ort(tiny_onnx, tiny_splits, tmp_path):
    import numpy as np

    from deploykit.engine import ShapeRanges, build_engine
    from deploykit.runners import OrtRunner
    from deploykit.runners.tensorrt import TrtRunner

    result = build_engine(tiny_onnx, tmp_path / "tiny.engine", ranges=ShapeRanges(batch=(1, 4, 8),
                                                                                   sequence=(1, 32, 64)))
    assert result.engine.stat().st_size > 0 and result.info["plugins"] == []
    feeds = {k: v[:4] for k, v in tiny_splits.evaluation.feeds.items()}
    got = TrtRunner(result.engine).infer(feeds)
    ref = OrtRunner(tiny_onnx).infer(feeds)
    assert np.allclose(got, ref, atol=1e-3)     # FP32 engine (TF32 allowed) vs ORT CPU
