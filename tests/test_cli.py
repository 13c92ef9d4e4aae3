"""The command line through its real entry point: the error contract, standalone stages, run."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from deploykit.report import validate_report

sys.path.insert(0, str(Path(__file__).parent))

from contract import assert_user_error, deploykit  # noqa: E402,F401  (re-exported for the other test files)


@pytest.fixture(scope="module")
def tiny_export(tiny_bert_dir, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("cli")
    deploykit("-q", "export", str(tiny_bert_dir), "-o", "tiny.onnx", "--option", "max_length=64", cwd=work)
    return work / "tiny.onnx"


# ----------------------------------------------------------------------------- errors
def test_missing_onnx(tmp_path):
    assert_user_error(deploykit("calibrate", "nope.onnx", cwd=tmp_path, check_rc=None), "nope.onnx", "not found")


def test_garbage_onnx(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07 this is not protobuf \xff\xfe")
    assert_user_error(deploykit("verify", "bad.onnx", "-m", "embedded:minilm", cwd=tmp_path, check_rc=None),
                      "bad.onnx", "not a readable ONNX model")


def test_unknown_model_source(tmp_path):
    assert_user_error(deploykit("export", "foo:bar", cwd=tmp_path, check_rc=None), "unknown model source")
    assert_user_error(deploykit("export", "hf:/no/such/folder", cwd=tmp_path, check_rc=None), "/no/such/folder")


def test_empty_data_set(tiny_export, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    proc = deploykit("calibrate", str(tiny_export), "-o", "x.onnx", "--data", "empty.txt", cwd=tmp_path, check_rc=None)
    assert_user_error(proc, "empty.txt", "empty")
    assert not (tmp_path / "x.onnx").exists()


def test_wrong_input_names(tiny_export, tmp_path):
    np.savez(tmp_path / "feeds.npz", ids=np.zeros((4, 8), np.int64), mask=np.ones((4, 8), np.int64))
    proc = deploykit("verify", str(tiny_export), "--data", "feeds.npz", cwd=tmp_path, check_rc=None)
    assert_user_error(proc, "feeds.npz", "input_ids")


def test_output_onto_input_is_refused(tiny_export, tmp_path):
    before = tiny_export.read_bytes()
    assert_user_error(deploykit("calibrate", str(tiny_export), "-o", str(tiny_export), cwd=tmp_path, check_rc=None),
                      "overwrite an input")
    assert tiny_export.read_bytes() == before


def test_bad_recipe(tmp_path):
    (tmp_path / "r.yaml").write_text("name: x\nquantise: {}\n")
    assert_user_error(deploykit("run", "r.yaml", cwd=tmp_path, check_rc=None), "r.yaml", "quantise")


def test_recipe_inconsistency_fails_before_any_work(tiny_bert_dir, tmp_path):
    (tmp_path / "r.yaml").write_text(f'model: {{source: "{tiny_bert_dir}", options: {{max_length: 64}}}}\n')
    proc = deploykit("run", "r.yaml", "--out", "out", cwd=tmp_path, check_rc=None)
    assert_user_error(proc, "r.yaml", "bench.seq_len 128")
    assert not (tmp_path / "out" / "minilm-int8" / "model.onnx").exists()


# ----------------------------------------------------------------------------- standalone stages
def test_stages_standalone_build_one_report(tiny_export, tmp_path):
    onnx_in = tmp_path / "m.onnx"
    shutil.copy(tiny_export, onnx_in)
    split = ["--calibration", "16", "--evaluation", "48"]
    deploykit("-q", "calibrate", "m.onnx", "--method", "entropy", *split, cwd=tmp_path)
    assert (tmp_path / "m.int8.onnx").is_file() and (tmp_path / "m.int8.ranges.json").is_file()
    deploykit("-q", "verify", "m.onnx", "m.int8.onnx", *split, "-r", "out/report.json", cwd=tmp_path)
    # the export's own max_length (64, recorded in the file) bounds the bench sequence
    deploykit("-q", "bench", "m.onnx", "m.int8.onnx", *split, "--batch", "1", "--batch", "2", "--seq", "64",
              "--warmup", "0", "--iterations", "2", "-r", "out/report.json", cwd=tmp_path)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    validate_report(report)
    assert set(report["accuracy"]) == {"fp32", "int8"}
    assert report["accuracy"]["fp32"]["cosine_min"] > 0.99999
    assert set(report["latency"]) == {f"{v}@{b}/b{n}" for v, b in [("fp32", "ort-cpu"), ("int8", "ort-cpu"),
                                                                   ("fp32", "torch")] for n in (1, 2)}
    assert report["data"]["evaluation"]["count"] == 48
    (tmp_path / "out" / "report.md").unlink()
    proc = deploykit("report", "out/report.json", cwd=tmp_path)
    assert (tmp_path / "out" / "report.md").is_file() and proc.stdout.strip().endswith("report.md")


def test_verify_gates_on_saved_inputs_and_bench_emulates_a_target(tiny_export, tmp_path):
    """verify: saved inputs written once (hash recorded, checked on reuse), every backend usable
    here, thresholds -> exit 1 with the worst nodes and an --exclude list; bench --target."""
    shutil.copy(tiny_export, tmp_path / "m.onnx")
    split = ["--calibration", "16", "--evaluation", "32"]
    deploykit("-q", "calibrate", "m.onnx", "--method", "minmax", *split, "--target", "h100", cwd=tmp_path)
    deploykit("-q", "verify", "m.onnx", "m.int8.onnx", *split, "--inputs", "inputs.npz", "--threshold",
              "int8.cosine_mean>=0.9", "--target", "edge-cpu-x86", "-r", "ok.json", cwd=tmp_path)
    report = json.loads((tmp_path / "ok.json").read_text())
    assert {"fp32@torch", "fp32@ort-cpu", "int8@ort-cpu"} <= set(report["parity"])
    assert report["parity"]["int8@ort-cpu"]["snr_db"] > 10 and report["parity"]["int8@ort-cpu"]["samples"] == 32
    assert report["verification"]["backends_skipped"]["tensorrt"] == "TensorRT is not installed"
    assert [c["check"] for c in report["verification"]["checks"]] == ["int8@ort-cpu.cosine_mean"]
    assert (tmp_path / "inputs.npz").is_file() and json.loads((tmp_path / "inputs.json").read_text())["feeds_sha256"]
    proc = deploykit("verify", "m.onnx", "m.int8.onnx", "--inputs", "inputs.npz", "--threshold",
                     "int8.cosine_mean>=1.01", "--backend", "ort-cpu", "-r", "bad.json", cwd=tmp_path, check_rc=1)
    assert "int8@ort-cpu.cosine_mean" in proc.stderr
    found = json.loads((tmp_path / "bad.json").read_text())["verification"]["localization"]["int8@ort-cpu"]
    assert found["exclude"] and found["nodes"][0]["added_snr_db"] <= found["nodes"][-1]["added_snr_db"]
    # the saved inputs are checked against their recorded hash
    with np.load(tmp_path / "inputs.npz") as data:
        arrays = {k: data[k] for k in data.files}
    arrays["input_ids"][0, 1] += 1
    np.savez(tmp_path / "inputs.npz", **arrays)
    assert_user_error(deploykit("verify", "m.onnx", "--inputs", "inputs.npz", cwd=tmp_path, check_rc=None),
                      "inputs.npz", "do not match the SHA-256")
    # a target whose runtime cannot take the model is refused before any work
    deploykit("-q", "calibrate", "m.onnx", "-o", "cpu.onnx", "--preset", "cpu-ort", *split, cwd=tmp_path)
    assert_user_error(deploykit("verify", "cpu.onnx", "--target", "jetson-orin", cwd=tmp_path, check_rc=None),
                      "cpu.onnx", "TensorRT", "takes only symmetric int8")
    assert_user_error(deploykit("calibrate", "m.onnx", "-o", "x.onnx", "--preset", "cpu-ort", "--target", "h100",
                                cwd=tmp_path, check_rc=None), "target 'h100' runs TensorRT")
    deploykit("-q", "bench", "m.onnx", "m.int8.onnx", *split, "--seq", "64", "--iterations", "2", "--warmup", "0",
              "--target", "edge-cpu-x86", "--target", "jetson-orin", "-r", "ok.json", cwd=tmp_path)
    targets = json.loads((tmp_path / "ok.json").read_text())["targets"]
    assert targets["edge-cpu-x86"]["latency"]["int8"]["batch"] == 1
    assert targets["edge-cpu-x86"]["memory_budget_mib"] == 4096
    assert "not measurable here" in targets["jetson-orin"]["reason"]


def test_doctor_json(tmp_path):
    checks = json.loads(deploykit("doctor", "--json", cwd=tmp_path).stdout)
    names = {c["name"] for c in checks}
    assert {"torch", "onnxruntime CPU", "TensorRT", "GPU"} <= names


# ----------------------------------------------------------------------------- run
def _tiny_recipe(folder: Path, tiny_bert_dir: Path, acceptance: str) -> Path:
    path = folder / "tiny.yaml"
    path.write_text(f"""
name: tiny
model: {{source: "{tiny_bert_dir}", options: {{max_length: 64}}}}
data: {{source: docstrings, calibration: 24, evaluation: 64, seed: 3}}
quantize: {{method: entropy}}
bench: {{batches: [1, 4], seq_len: 64, warmup: 0, iterations: 2, min_seconds: 0.0}}
acceptance: {acceptance}
""")
    return path


def test_run_tiny_recipe_writes_the_contract(tiny_bert_dir, tmp_path):
    recipe = _tiny_recipe(tmp_path, tiny_bert_dir, "{fp32.cosine_min: '>= 0.99999', int8.cosine_mean: '>= 0.5'}")
    deploykit("run", str(recipe), "--out", "out", cwd=tmp_path)
    run_dir = tmp_path / "out" / "tiny"
    report = json.loads((run_dir / "report.json").read_text())
    validate_report(report)
    for name in ("model.onnx", "model.int8.onnx", "model.int8.ranges.json", "reference.npz", "report.md",
                 "latency_by_batch.png", "cosine_distribution.png", "data/calibration.npz", "data/evaluation.json"):
        assert (run_dir / name).is_file(), name
    assert {"fp32", "int8"} <= set(report["accuracy"])
    assert {"fp32@ort-cpu/b1", "int8@ort-cpu/b4", "fp32@torch/b4"} <= set(report["latency"])
    assert report["data"]["calibration"]["count"] == 24 and report["data"]["seed"] == 3
    assert report["export"]["parity_max_abs_diff"] < 1e-5
    assert all(a["passed"] for a in report["acceptance"])
    assert not list(run_dir.rglob("*.tmp")), "temporary files left behind"


def test_failed_acceptance_exits_1_and_localizes(tiny_bert_dir, tmp_path):
    recipe = _tiny_recipe(tmp_path, tiny_bert_dir, "{int8.cosine_mean: '>= 1.1'}")
    proc = deploykit("-q", "run", str(recipe), "--out", "out", cwd=tmp_path, check_rc=1)
    assert "acceptance" in proc.stderr
    report = json.loads((tmp_path / "out" / "tiny" / "report.json").read_text())
    assert report["acceptance"][0]["passed"] is False
    assert report["acceptance"][0]["check"] == "int8@ort-cpu.cosine_mean"
    found = report["verification"]["localization"]["int8@ort-cpu"]
    assert found["nodes"] and found["exclude"], "a missed threshold names the nodes to look at"
    quantized = {n["node"] for n in found["nodes"]}
    assert set(found["exclude"]) <= quantized | {found["nodes"][0]["node"]}


def test_run_with_tuning_and_a_baseline(tiny_bert_dir, tmp_path):
    recipe = tmp_path / "tuned.yaml"
    recipe.write_text(f"""
name: tuned
targets: [h100, edge-cpu-x86]
model: {{source: "{tiny_bert_dir}", options: {{max_length: 64}}}}
data: {{source: docstrings, calibration: 24, evaluation: 48, seed: 1}}
quantize:
  smoothquant: {{targets: all}}
  tune: {{enabled: true, criteria: {{cosine_mean: ">= 0.99999"}}, alphas: [null, 0.8], methods: [mse],
          budget: 6, samples: 32}}
baselines: [ort-dynamic]
bench: {{batches: [2], seq_len: 64, warmup: 0, iterations: 2, min_seconds: 0.0, torch_baseline: false}}
""")
    deploykit("-q", "run", str(recipe), "--out", "out", cwd=tmp_path)
    run_dir = tmp_path / "out" / "tuned"
    report = json.loads((run_dir / "report.json").read_text())
    validate_report(report)
    assert {"fp32", "int8", "int8-dynamic"} == set(report["accuracy"])
    assert {"fp32@ort-cpu/b2", "int8@ort-cpu/b2", "int8-dynamic@ort-cpu/b2"} == set(report["latency"])
    tuning = report["tuning"]
    assert 1 <= tuning["trials_run"] <= 6 and len(tuning["trials"]) == tuning["trials_run"]
    assert report["calibration"]["float_fallback_count"] == tuning["chosen"]["float_node_count"]
    assert report["data"]["tuning"]["count"] == 32
    assert (run_dir / "data" / "tuning.npz").is_file() and (run_dir / "tuning_trials.png").is_file()
    assert "## Tuning" in (run_dir / "report.md").read_text()


def test_calibrate_takes_a_recipe_and_options_override_it(tiny_export, tmp_path):
    recipe = tmp_path / "q.yaml"
    recipe.write_text("quantize: {preset: cpu-ort, method: minmax}\n")
    deploykit("-q", "calibrate", str(tiny_export), "-o", "q.onnx", "--recipe", str(recipe), "--method", "mse",
              "--calibration", "16", "--evaluation", "16", cwd=tmp_path)
    ranges = json.loads((tmp_path / "q.ranges.json").read_text())
    assert ranges["config"]["preset"] == "cpu-ort" and ranges["config"]["method"] == "mse"


@pytest.mark.slow
def test_default_run_from_any_directory(tmp_path):
    """`deploykit run` with no recipe finds the embedded default (shrunk here to stay fast)."""
    overrides = ["data.calibration=32", "data.evaluation=64", "bench.batches=[1]", "bench.iterations=2",
                 "bench.warmup=0", "bench.min_seconds=0"]
    args = [a for o in overrides for a in ("--set", o)]
    deploykit("-q", "run", *args, cwd=tmp_path)
    report = json.loads((tmp_path / "runs" / "minilm-int8" / "report.json").read_text())
    validate_report(report)
    assert report["model"] == "embedded:minilm" and report["recipe"].endswith("minilm-int8.yaml")
    assert report["accuracy"]["fp32"]["cosine_min"] > 0.99999
    assert 0.5 < report["accuracy"]["int8"]["cosine_mean"] < 1.0


def test_models_sharing_a_variant_are_named_by_file(tiny_export, tmp_path):
    from deploykit.pipeline import variant_names

    for method in ("minmax", "entropy"):
        deploykit("-q", "calibrate", str(tiny_export), "-o", f"{method}.onnx", "--method", method,
                  "--calibration", "8", "--evaluation", "8", cwd=tmp_path)
    assert variant_names([tiny_export, tmp_path / "minmax.onnx"]) == ["fp32", "int8"]
    assert variant_names([tiny_export, tmp_path / "minmax.onnx", tmp_path / "entropy.onnx"]) == \
        ["fp32", "minmax", "entropy"]
