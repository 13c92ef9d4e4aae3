"""Edge CPU targets: batch-1 latency and peak memory per model, each in a fresh child process at
the target's thread count; targets this machine cannot stand in for are "not measurable here"."""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from deploykit.bench import BenchConfig
from deploykit.bench.edge import bench_on_target, measurability

sys.path.insert(0, str(Path(__file__).parent))
from trt_standin import stand_in_tensorrt  # noqa: E402
from deploykit.data import Split
from deploykit.errors import UserError
from deploykit.targets import get_target

FAST = BenchConfig(batches=[1], warmup=1, iterations=3, min_seconds=0, max_seconds=5)
CORES = len(os.sched_getaffinity(0))


def tiny_model(path: Path) -> Path:
    """x [batch, 16] -> MatMul -> Relu."""
    w = onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("edge") / "tiny.onnx")


@pytest.fixture(scope="module")
def split() -> Split:
    return Split("evaluation", {"x": np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)}, "sha")


@pytest.fixture(scope="module")
def x86_entry(model, split):
    target = dataclasses.replace(get_target("edge-cpu-x86"), threads=CORES + 1)
    return bench_on_target({"fp32": model, "again": model}, split, target, FAST)


def test_edge_x86_times_each_model_at_batch_1_with_its_memory(x86_entry):
    entry = x86_entry
    assert entry["target"] == "edge-cpu-x86" and entry["measurable"] and entry["reason"] is None
    assert entry["runtime"].startswith("onnxruntime >= ") and entry["machine_cores"] == CORES
    assert entry["memory_budget_mib"] == 4 * 1024
    assert set(entry["latency"]) == {"fp32", "again"}
    for row in entry["latency"].values():
        assert row["batch"] == 1 and row["iterations"] >= 3 and row["threads"] == CORES
        assert 0 < row["p50_ms"] <= row["p99_ms"] and row["mean_ms"] > 0 and row["throughput_per_s"] > 0
        assert row["peak_rss_mib"] > row["model_rss_mib"] >= 0
        assert row["within_memory_budget"] is True
        assert row["rounds"] == FAST.rounds and len(row["round_p50_ms"]) == FAST.rounds


def test_edge_models_are_timed_interleaved_with_a_ratio_per_round(x86_entry):
    # the same file twice: its ratio to FP32 comes from the rounds both were timed in
    again = x86_entry["latency"]["again"]
    assert "ratio_to_fp32" not in x86_entry["latency"]["fp32"]
    lo, hi = again["ratio_spread"]
    assert lo <= again["ratio_to_fp32"] <= hi and isinstance(again["conclusive"], bool)
    assert any(f"timed interleaved in {FAST.rounds} rounds" in note for note in x86_entry["notes"])


def test_interleaved_rounds_alternate_between_the_children(model, split, monkeypatch):
    from deploykit.bench import edge

    order = []
    ask = edge._Child.ask

    def spy(self, command, want):
        if command == "round":
            order.append(self.model.name)
        return ask(self, command, want)

    monkeypatch.setattr(edge._Child, "ask", spy)
    other = tiny_model(model.with_name("other.onnx"))
    bench_on_target({"fp32": model, "int8": other}, split, get_target("edge-cpu-x86"),
                    dataclasses.replace(FAST, rounds=3))
    # rotating order: fp32 int8 | int8 fp32 | fp32 int8
    assert order == ["tiny.onnx", "other.onnx", "other.onnx", "tiny.onnx", "tiny.onnx", "other.onnx"]


def test_more_target_threads_than_cores_is_a_bound(x86_entry):
    assert x86_entry["threads"] == CORES
    assert any(f"this machine has {CORES} cores, target has {CORES + 1}: latency measured with {CORES} threads "
               "is a bound" in note for note in x86_entry["notes"])


def test_fewer_target_threads_pin_the_child(model, split):
    target = dataclasses.replace(get_target("edge-cpu-x86"), threads=1, memory_gib=1e-6)
    entry = bench_on_target({"fp32": model}, split, target, FAST)
    row = entry["latency"]["fp32"]
    assert entry["threads"] == 1 and row["threads"] == 1
    assert row["within_memory_budget"] is False                    # ~1 KiB budget
    assert not any("is a bound" in note for note in entry["notes"])
    if CORES > 1:
        assert any(note.startswith("pinned to CPUs ") for note in entry["notes"])


def test_arm_target_on_x86_is_not_measurable(model, split, monkeypatch):
    monkeypatch.setattr(platform, "machine", lambda: "AMD64")     # normalised to x86_64
    arm = get_target("edge-cpu-arm")
    assert measurability(get_target("edge-cpu-x86")) == (True, None)
    entry = bench_on_target({"fp32": model}, split, arm, FAST)
    assert entry["measurable"] is False and entry["latency"] == {} and entry["threads"] is None
    assert entry["reason"] == "aarch64 target; this machine is x86_64: not measurable here"
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    assert measurability(arm) == (True, None)
    assert not measurability(get_target("edge-cpu-x86"))[0]


def test_gpu_targets_need_tensorrt_cuda_and_the_same_compute_capability(model, split, monkeypatch):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        ok, reason = measurability(get_target("h100"))
        assert not ok and reason.endswith(": not measurable here")
        entry = bench_on_target({"fp32": model}, split, get_target("h100"), FAST)
        assert entry["measurable"] is False and entry["latency"] == {}
    calls = stand_in_tensorrt(monkeypatch, gpu="NVIDIA L4", compute_capability="8.9", onnx_of=lambda engine: model)
    ok, reason = measurability(get_target("h100"))
    assert not ok and reason == "sm_90 TensorRT target; this GPU (NVIDIA L4) is sm_89: not measurable here"
    # This machine is an L4 (stood in for): the l4 target is timed on TensorRT. An engine next to
    # the model built for another GPU is left alone and one is built for this target.
    model.with_suffix(".engine").write_bytes(b"an sm_90 engine")
    model.with_suffix(".json").write_text('{"compute_capability": "9.0", "tensorrt": "10.15.1", "gpu": "H100"}')
    entry = bench_on_target({"fp32": model}, split, get_target("l4"), FAST)
    built = [(c["engine"].name, c["target"], c["ranges"].batch) for c in calls]
    assert entry["measurable"] is True and built == [(f"{model.stem}.l4.engine", "l4", (1, 1, 1))]
    fig = entry["latency"]["fp32"]
    assert fig["batch"] == 1 and fig["p50_ms"] > 0 and fig["engine"].endswith(".l4.engine")
    assert fig["peak_rss_mib"] is None and any("GPU memory not measured" in n for n in entry["notes"])


def test_corrupt_model_is_a_user_error_naming_the_file(tmp_path, split):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"this is not an ONNX model")
    with pytest.raises(UserError) as info:
        bench_on_target({"fp32": bad}, split, get_target("edge-cpu-x86"), FAST)
    assert str(bad) in str(info.value) and "cannot load" in str(info.value)


def test_feeds_that_do_not_fit_the_model_fail_naming_it(model, split):
    wrong = Split("evaluation", {"z": np.ones((2, 16), np.float32)}, "sha")   # the model takes "x"
    with pytest.raises(UserError) as info:
        bench_on_target({"fp32": model}, wrong, get_target("edge-cpu-x86"), FAST)
    assert str(model) in str(info.value) and "'z'" in str(info.value)
    narrow = Split("evaluation", {"x": np.ones((2, 15), np.float32)}, "sha")  # ORT's own error: last stderr line
    with pytest.raises(UserError) as info:
        bench_on_target({"fp32": model}, narrow, get_target("edge-cpu-x86"), FAST)
    assert str(model) in str(info.value) and "child process failed" in str(info.value)
    assert "invalid dimensions" in str(info.value).lower()


def test_the_child_times_without_torch():
    """The child's peak memory is one ONNX Runtime session's: what it imports to load, run and
    time a model must not pull in torch (about 190 MiB more, against budgets of 2 GiB)."""
    import subprocess
    import sys

    code = ("import sys, deploykit.io, deploykit.runners, deploykit.timing; "
            "print(sorted(m for m in ('torch', 'transformers', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

