"""deploykit.report: the report.json contract, merging stage results, report.md and plots."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from deploykit.errors import UserError
from deploykit.io import write_json
from deploykit.report import format_latency_table, merge_report, render_report, validate_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ("latency_by_batch.png", "throughput_by_batch.png", "cosine_distribution.png")


def make_report() -> dict:
    rng = np.random.default_rng(0)
    latency = {}
    for variant, scale in (("fp32", 2.0), ("int8", 1.0)):
        for backend, factor in (("ort-cpu", 1.0), ("torch", 1.5)):
            for batch in (1, 8, 32):
                p50 = scale * factor * (1.0 + 0.4 * batch)
                latency[f"{variant}@{backend}/b{batch}"] = {
                    "batch": batch, "p50_ms": p50, "p90_ms": p50 * 1.1, "p99_ms": p50 * 1.3,
                    "throughput_per_s": batch / p50 * 1e3, "iterations": 20, "threads": 4}
    fp32_cos = 1.0 - rng.lognormal(np.log(1e-7), 1.0, 1000)
    int8_cos = 1.0 - rng.lognormal(np.log(3e-3), 1.0, 1000)
    return {
        "model": "embedded:minilm", "recipe": "recipes/minilm-int8.yaml", "target": "cpu-ort",
        "created": "2025-01-02T03:04:05+00:00", "deploykit_version": "0.1.0", "run": "minilm-int8",
        "artifacts": {"fp32": "runs/x/model.onnx", "int8": "runs/x/model.int8.onnx"},
        "accuracy": {
            "fp32": {"cosine_mean": float(fp32_cos.mean()), "cosine_min": float(fp32_cos.min()),
                     "nn_agreement": 1.0, "max_abs_diff": 1.234e-7},
            "int8": {"cosine_mean": float(int8_cos.mean()), "cosine_min": float(int8_cos.min()),
                     "nn_agreement": 0.987, "max_abs_diff": 0.0421},
        },
        "distributions": {"fp32": {"cosine": [round(float(c), 9) for c in fp32_cos]},
                          "int8": {"cosine": [round(float(c), 9) for c in int8_cos]}},
        "latency": latency,
        "acceptance": [
            {"check": "int8.cosine_mean", "value": float(int8_cos.mean()), "threshold": ">= 0.99", "passed": True},
            {"check": "int8.nn_agreement", "value": 0.987, "threshold": ">= 0.995", "passed": False},
        ],
        "data": {"source": "docstrings", "seed": 0, "calibration": {"count": 256, "sha256": "ab" * 32},
                 "evaluation": {"count": 1000, "sha256": "cd" * 32}},
        "export": {"opset": 18, "parity_max_abs_diff": 1.5e-7, "nodes": 412},
        "calibration": {"method": "percentile", "percentile": 99.99, "float_nodes": [f"n{i}" for i in range(12)]},
        "bench": {"threads": 4, "seq_len": 128, "warmup": 3, "iterations": 20},
        "timings_s": {"export": 3.2, "calibrate": 10.5, "bench": 30.0},
        "environment": {"python": "3.11.2", "torch": "2.13.0", "onnxruntime": "1.22.0",
                        "cpu": "Test CPU (8 cores)", "gpu": None},
        "notes": ["synthetic report for tests", "second note"],
    }


def write_report(folder: Path, report: dict) -> Path:
    return write_json(folder / "report.json", report)


# ----------------------------------------------------------------------------- validate
def test_valid_report_passes():
    validate_report(make_report(), path="x/report.json")


def test_minimal_report_passes():
    report = make_report()
    for key in ("created", "deploykit_version", "distributions", "acceptance", "data", "export", "calibration",
                "bench", "timings_s", "notes", "run"):
        del report[key]
    report["recipe"] = None
    report["latency"] = {}
    validate_report(report)


def _break(mutate):
    report = make_report()
    mutate(report)
    return report


BROKEN = {
    "missing key": (lambda r: r.pop("target"), "'target' is missing"),
    "wrong model type": (lambda r: r.update(model=3), "'model' must be a string"),
    "accuracy not a dict": (lambda r: r.update(accuracy=[1, 2]), "'accuracy' must be an object"),
    "nan accuracy": (lambda r: r["accuracy"]["int8"].update(cosine_mean=float("nan")), "accuracy['int8']['cosine_mean']"),
    "string accuracy": (lambda r: r["accuracy"]["fp32"].update(top1="0.9"), "accuracy['fp32']['top1']"),
    "negative latency": (lambda r: r["latency"]["int8@ort-cpu/b8"].update(p90_ms=-1.0),
                         "latency['int8@ort-cpu/b8']['p90_ms']"),
    "latency key batch mismatch": (lambda r: r["latency"]["int8@ort-cpu/b8"].update(batch=1), "has batch 1 but"),
    "bad latency key": (lambda r: r["latency"].update({"int8-ort-cpu": r["latency"].pop("int8@ort-cpu/b8")}),
                        "bad key"),
    "latency field missing": (lambda r: r["latency"]["fp32@torch/b1"].pop("p99_ms"), "missing 'p99_ms'"),
    "float batch": (lambda r: r["latency"]["fp32@torch/b1"].update(batch=1.0), "positive integer"),
    "environment missing key": (lambda r: r["environment"].pop("cpu"), "environment['cpu'] is missing"),
    "acceptance passed not bool": (lambda r: r["acceptance"][0].update(passed="yes"), "acceptance[0]['passed']"),
    "nan distribution": (lambda r: r["distributions"]["int8"]["cosine"].append(float("nan")),
                         "distributions['int8']['cosine']"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_contract_violations_raise_user_error(case):
    mutate, expected = BROKEN[case]
    with pytest.raises(UserError) as info:
        validate_report(_break(mutate), path="runs/x/report.json")
    message = str(info.value)
    assert message.startswith("runs/x/report.json: ")
    assert expected in message
    assert "fix:" in message and "\n" not in message


def test_non_dict_report_raises():
    with pytest.raises(UserError, match="JSON object"):
        validate_report([1, 2], path="r.json")


def test_extra_fields_allowed():
    report = make_report()
    report["recipe_settings"] = {"anything": [1, 2]}
    report["latency"]["int8@ort-cpu/b8"]["custom"] = "x"
    validate_report(report)


# ----------------------------------------------------------------------------- merge
def test_merge_into_nothing_copies_update():
    update = {"model": "m", "accuracy": {"fp32": {"cosine_mean": 1.0}}}
    merged = merge_report(None, update)
    assert merged == update and merged is not update
    merged["accuracy"]["fp32"]["cosine_mean"] = 0.0
    assert update["accuracy"]["fp32"]["cosine_mean"] == 1.0


def test_merge_sections():
    existing = make_report()
    update = {
        "target": "gpu-trt",
        "accuracy": {"int8": {"cosine_mean": 0.5, "top1": 0.9}, "fp16": {"cosine_mean": 0.9999}},
        "latency": {"int8@ort-cpu/b8": {"batch": 8, "p50_ms": 1.0, "p90_ms": 1.0, "p99_ms": 1.0,
                                         "throughput_per_s": 8000.0},
                    "fp16@ort-trt/b1": {"batch": 1, "p50_ms": 0.1, "p90_ms": 0.1, "p99_ms": 0.2,
                                        "throughput_per_s": 10000.0}},
        "environment": {"gpu": "H100"},
        "timings_s": {"verify": 1.0},
        "acceptance": [{"check": "fp16.cosine_mean", "value": 0.9999, "threshold": ">= 0.999", "passed": True}],
        "notes": ["only this"],
    }
    before_existing, before_update = copy.deepcopy(existing), copy.deepcopy(update)
    merged = merge_report(existing, update)
    assert existing == before_existing and update == before_update  # inputs untouched

    assert merged["target"] == "gpu-trt"
    # accuracy merges per variant's metrics: update wins, other metrics kept, new variants added
    assert merged["accuracy"]["int8"]["cosine_mean"] == 0.5
    assert merged["accuracy"]["int8"]["top1"] == 0.9
    assert merged["accuracy"]["int8"]["nn_agreement"] == 0.987
    assert merged["accuracy"]["fp32"] == existing["accuracy"]["fp32"]
    assert merged["accuracy"]["fp16"] == {"cosine_mean": 0.9999}
    # latency / environment / timings merge key by key
    assert merged["latency"]["int8@ort-cpu/b8"]["p50_ms"] == 1.0
    assert "fp16@ort-trt/b1" in merged["latency"] and "fp32@torch/b32" in merged["latency"]
    assert len(merged["latency"]) == len(existing["latency"]) + 1
    assert merged["environment"]["gpu"] == "H100" and merged["environment"]["python"] == "3.11.2"
    assert merged["timings_s"] == {**existing["timings_s"], "verify": 1.0}
    # lists are replaced
    assert merged["acceptance"] == update["acceptance"]
    assert merged["notes"] == ["only this"]
    validate_report(merged)
    # the merged result does not share objects with the update
    merged["notes"].append("x")
    merged["accuracy"]["fp16"]["cosine_mean"] = 0.0
    assert update == before_update


def test_merge_replaces_section_of_other_type():
    merged = merge_report({"data": None, "export": {"opset": 17}}, {"data": {"seed": 1}, "export": {"nodes": 3}})
    assert merged == {"data": {"seed": 1}, "export": {"opset": 17, "nodes": 3}}


# ----------------------------------------------------------------------------- render
def _png_ok(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 5000, path


def test_render_full_report(tmp_path):
    report = make_report()
    src = write_report(tmp_path, report)
    before = src.read_bytes()

    md_path = render_report(src)
    assert md_path == tmp_path / "report.md"
    assert src.read_bytes() == before
    for name in PLOTS:
        _png_ok(tmp_path / name)
    assert not list(tmp_path.glob(".*.tmp"))

    md = md_path.read_text(encoding="utf-8")
    assert md.startswith("# deploykit report: embedded:minilm")
    for text in ("recipes/minilm-int8.yaml", "cpu-ort", "2025-01-02T03:04:05+00:00", "0.1.0"):
        assert text in md
    # accuracy table: all variants and metrics, cosines with 6 decimals, tiny diffs in scientific notation
    for text in ("## Accuracy", "cosine_mean", "nn_agreement", "max_abs_diff", "`int8`",
                 f"{report['accuracy']['int8']['cosine_mean']:.6f}", "1.234e-07", "0.9870"):
        assert text in md, text
    # acceptance with one pass and one fail
    assert "## Acceptance" in md and "✅ PASS" in md and "❌ FAIL" in md and "1 of 2 checks passed" in md
    # latency table: one row per variant@backend, columns per batch
    assert "## Latency" in md
    for series in ("fp32@ort-cpu", "fp32@torch", "int8@ort-cpu", "int8@torch"):
        assert f"| `{series}` |" in md
    for b in (1, 8, 32):
        assert f"b{b} p50 / p90 / p99 ms" in md
    e = report["latency"]["int8@ort-cpu/b8"]  # p50 4.2 ms, p90 4.62, p99 5.46, 1904.8/s
    assert "4.20 / 4.62 / 5.46" in md and "1,905" in md
    # image links are relative
    for name in PLOTS:
        assert f"]({name})" in md
    # settings tables and notes
    for text in ("## Data", "`calibration.count`", "## Export", "`opset`", "## Calibration", "12 items:",
                 "## Bench settings", "## Timings (s)", "| `total` | 43.70 |", "## Environment", "Test CPU",
                 "## Artifacts", "runs/x/model.int8.onnx", "## Notes", "- synthetic report for tests"):
        assert text in md, text
    assert e["batch"] == 8


def test_render_is_deterministic(tmp_path):
    src = write_report(tmp_path, make_report())
    render_report(src, tmp_path / "a")
    render_report(src, tmp_path / "b")
    for name in ("report.md", *PLOTS):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert not (tmp_path / "report.md").exists()  # out_dir honoured


def test_render_minimal_report_omits_sections(tmp_path):
    report = make_report()
    for key in ("distributions", "acceptance", "notes", "data", "export", "calibration", "bench", "timings_s"):
        del report[key]
    report["latency"] = {}
    src = write_report(tmp_path, report)
    md = render_report(src).read_text(encoding="utf-8")
    assert "## Accuracy" in md and "## Environment" in md
    for text in ("## Latency", "## Acceptance", "Cosine distribution", "## Notes", "## Data", ".png"):
        assert text not in md, text
    for name in PLOTS:
        assert not (tmp_path / name).exists()


def test_render_single_batch_and_exact_cosines(tmp_path):
    report = make_report()
    report["latency"] = {k: v for k, v in report["latency"].items() if k.endswith("/b8")}
    report["distributions"] = {"fp32": {"cosine": [1.0] * 50}, "int8": {"cosine": [1.0, 0.999, 1.0000001]}}
    src = write_report(tmp_path, report)
    render_report(src)
    for name in PLOTS:
        _png_ok(tmp_path / name)


def test_render_garbage_raises_user_error(tmp_path):
    bad = tmp_path / "report.json"
    bad.write_bytes(b"\x00not json{")
    with pytest.raises(UserError) as info:
        render_report(bad)
    assert str(bad) in str(info.value)
    assert not (tmp_path / "report.md").exists()


def test_render_invalid_report_raises_user_error(tmp_path):
    report = make_report()
    report["latency"]["int8@ort-cpu/b8"]["batch"] = 32
    src = write_report(tmp_path, report)
    with pytest.raises(UserError, match="has batch 32 but its key says b8"):
        render_report(src)


def test_render_missing_file_raises_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        render_report(tmp_path / "nope.json")


def test_format_latency_table_orders_series_and_batches():
    report = make_report()
    report["latency"] = dict(reversed(list(report["latency"].items())))
    rows = format_latency_table(report)
    assert len(rows) == 12
    assert [r["series"] for r in rows[:3]] == ["int8@torch"] * 3
    assert [r["batch"] for r in rows[:3]] == [1, 8, 32]
    assert rows[0]["variant"] == "int8" and rows[0]["backend"] == "torch"


def test_report_json_round_trips_through_json():
    # the synthetic report is plain JSON (no NaN), as write_json requires
    json.dumps(make_report(), allow_nan=False)


# ----------------------------------------------------------------------------- deployment sections
DEPLOY_PLOTS = ("parity_by_backend.png", "latency_by_target.png")


def add_deployment_sections(report: dict) -> dict:
    """parity + verification, targets and bundles, as the verify, bench-targets and bundle stages write them."""
    report["parity"] = {
        "fp32@torch": {"cosine_mean": 1.0, "cosine_min": 1.0, "snr_db": None, "max_abs_diff": 0.0,
                       "nn_agreement": 1.0, "samples": 64},
        "fp32@ort-cpu": {"cosine_mean": 0.99999999, "cosine_min": 0.9999998, "snr_db": 121.5,
                         "max_abs_diff": 2.4e-7, "nn_agreement": 1.0, "samples": 64},
        "int8@ort-cpu": {"cosine_mean": 0.9971, "cosine_min": 0.981, "snr_db": 22.7, "max_abs_diff": 0.0832,
                         "nn_agreement": 0.984, "samples": 64},
        "int8@ort-cuda": {"cosine_mean": None, "cosine_min": None, "snr_db": 23.1, "max_abs_diff": 0.0791,
                          "nn_agreement": None, "samples": 64},
    }
    report["verification"] = {
        "inputs": "runs/x/verify_inputs.npz", "inputs_sha256": "ef" * 32, "reference": "torch FP32",
        "backends_run": ["torch", "ort-cpu", "ort-cuda"],
        "backends_skipped": {"tensorrt": "tensorrt is not installed"},
        "exact_qdq": ["int8@ort-cpu"], "fused_qdq_saturating": ["int8-cpu@ort-cpu"],
        "checks": [
            {"check": "int8@ort-cpu.cosine_mean", "value": 0.9971, "threshold": ">= 0.99", "passed": True},
            {"check": "int8@ort-cuda.cosine_mean", "value": None, "threshold": ">= 0.99", "passed": False},
        ],
        "localization": {"int8@ort-cpu": {
            "nodes": [{"node": f"/encoder/layer.{i}/MatMul", "op_type": "MatMul",
                       "module": f"encoder.layer.{i}.output.dense", "added_snr_db": 30.0 + i,
                       "added_cosine": 0.999 + i * 1e-4, "accumulated_snr_db": 25.0 + i,
                       "accumulated_cosine": None if i == 1 else 0.998}
                      for i in range(12)],
            "exclude": ["/encoder/layer.0/MatMul", "/encoder/layer.1/MatMul"]}},
    }
    report["targets"] = {
        "x86-server": {"target": "x86-server", "runtime": "ort-cpu", "measurable": True, "reason": None,
                       "threads": 4, "machine_cores": 8, "memory_budget_mib": 2048.0,
                       "notes": ["threads capped at the target's 4 cores"],
                       "latency": {
                           "fp32": {"batch": 1, "p50_ms": 12.5, "p90_ms": 13.0, "p99_ms": 15.25, "mean_ms": 12.8,
                                    "throughput_per_s": 80.0, "iterations": 50, "threads": 4,
                                    "peak_rss_mib": 412.3, "model_rss_mib": 90.1, "within_memory_budget": True},
                           "int8": {"batch": 1, "p50_ms": 5.5, "p90_ms": 6.0, "p99_ms": 7.75, "mean_ms": 5.7,
                                    "throughput_per_s": 181.8, "iterations": 50, "threads": 4,
                                    "peak_rss_mib": 2300.0, "model_rss_mib": 25.4, "within_memory_budget": False,
                                    "rounds": 5, "ratio_to_fp32": 0.44, "ratio_spread": [0.41, 0.47],
                                    "conclusive": True}}},
        "rpi5": {"target": "rpi5", "runtime": "ort-cpu-arm64", "measurable": False,
                 "reason": "needs an aarch64 CPU, this machine is x86_64", "threads": None, "machine_cores": 8,
                 "memory_budget_mib": 512.0, "notes": [], "latency": {}},
    }
    report["bundles"] = {"x86-server": {"path": "runs/x/bundles/x86-server.tar.gz", "sha256": "0a" * 32,
                                        "size_bytes": 3 * 1024 * 1024 + 1024, "files": 7}}
    return report


def test_deployment_sections_validate():
    validate_report(add_deployment_sections(make_report()), path="x/report.json")


DEPLOY_BROKEN = {
    "parity not a dict": (lambda r: r.update(parity=[1]), "'parity' must be an object"),
    "parity entry not a dict": (lambda r: r["parity"].update({"int8@ort-cpu": 0.99}),
                                "parity['int8@ort-cpu'] must be an object"),
    "parity bad key": (lambda r: r["parity"].update({"int8-ort-cpu": {"cosine_mean": 0.9}}), "bad key"),
    "parity string metric": (lambda r: r["parity"]["int8@ort-cpu"].update(snr_db="22"),
                             "parity['int8@ort-cpu']['snr_db']"),
    "parity float samples": (lambda r: r["parity"]["int8@ort-cpu"].update(samples=6.5),
                             "parity['int8@ort-cpu']['samples']"),
    "verification not a dict": (lambda r: r.update(verification="ok"), "'verification' must be an object"),
    "check passed not bool": (lambda r: r["verification"]["checks"][0].update(passed=1),
                              "verification['checks'][0]['passed']"),
    "checks not a list": (lambda r: r["verification"].update(checks={}), "verification['checks'] must be a list"),
    "skipped reason not str": (lambda r: r["verification"]["backends_skipped"].update(tensorrt=None),
                               "verification['backends_skipped']['tensorrt']"),
    "exact_qdq not a list": (lambda r: r["verification"].update(exact_qdq="int8@ort-cpu"),
                             "verification['exact_qdq']"),
    "saturating not strings": (lambda r: r["verification"].update(fused_qdq_saturating=[1]),
                               "verification['fused_qdq_saturating']"),
    "exclude not a list": (lambda r: r["verification"]["localization"]["int8@ort-cpu"].update(exclude="n1"),
                           "verification['localization']['int8@ort-cpu']['exclude']"),
    "localization node without name": (
        lambda r: r["verification"]["localization"]["int8@ort-cpu"]["nodes"][0].pop("node"), "['nodes'][0]['node']"),
    "targets not a dict": (lambda r: r.update(targets=["x86-server"]), "'targets' must be an object"),
    "measurable not bool": (lambda r: r["targets"]["rpi5"].update(measurable="no"),
                            "targets['rpi5']['measurable']"),
    "target runtime missing": (lambda r: r["targets"]["rpi5"].pop("runtime"), "targets['rpi5'] is missing 'runtime'"),
    "target latency negative": (lambda r: r["targets"]["x86-server"]["latency"]["int8"].update(p99_ms=-1.0),
                                "targets['x86-server']['latency']['int8']['p99_ms']"),
    "target within budget not bool": (
        lambda r: r["targets"]["x86-server"]["latency"]["int8"].update(within_memory_budget="yes"),
        "['within_memory_budget']"),
    "target notes not strings": (lambda r: r["targets"]["rpi5"].update(notes=[1]), "targets['rpi5']['notes']"),
    "bundle size negative": (lambda r: r["bundles"]["x86-server"].update(size_bytes=-3),
                             "bundles['x86-server']['size_bytes']"),
    "bundle path missing": (lambda r: r["bundles"]["x86-server"].pop("path"), "bundles['x86-server'] is missing"),
}


@pytest.mark.parametrize("case", sorted(DEPLOY_BROKEN))
def test_deployment_contract_violations_raise_user_error(case):
    mutate, expected = DEPLOY_BROKEN[case]
    report = add_deployment_sections(make_report())
    mutate(report)
    with pytest.raises(UserError) as info:
        validate_report(report, path="runs/x/report.json")
    message = str(info.value)
    assert message.startswith("runs/x/report.json: ")
    assert expected in message
    assert "fix:" in message and "\n" not in message


def test_merge_deployment_sections_keeps_old_and_new_entries():
    existing = add_deployment_sections(make_report())
    update = {"parity": {"int8@tensorrt": {"cosine_mean": 0.996, "snr_db": 21.0, "samples": 64},
                         "int8@ort-cpu": {"cosine_mean": 0.998, "samples": 64}},
              "targets": {"jetson-orin": {"runtime": "tensorrt", "measurable": False, "reason": "no Jetson"}},
              "bundles": {"rpi5": {"path": "b/rpi5.tar.gz", "sha256": "1b" * 32, "size_bytes": 10, "files": 2}}}
    before = copy.deepcopy(existing)
    merged = merge_report(existing, update)
    assert existing == before
    assert set(merged["parity"]) == {*existing["parity"], "int8@tensorrt"}
    assert merged["parity"]["fp32@ort-cpu"] == existing["parity"]["fp32@ort-cpu"]
    assert merged["parity"]["int8@ort-cpu"] == {"cosine_mean": 0.998, "samples": 64}  # a later stage's entry wins
    assert set(merged["targets"]) == {"x86-server", "rpi5", "jetson-orin"}
    assert set(merged["bundles"]) == {"x86-server", "rpi5"}
    validate_report(merged)


def test_render_deployment_sections(tmp_path):
    report = add_deployment_sections(make_report())
    src = write_report(tmp_path, report)
    md = render_report(src).read_text(encoding="utf-8")
    for name in (*PLOTS, *DEPLOY_PLOTS):
        _png_ok(tmp_path / name)
        assert f"]({name})" in md
    assert not list(tmp_path.glob(".*.tmp"))

    # order: after Accuracy / Acceptance and Latency
    positions = [md.index(h) for h in ("## Accuracy\n", "## Acceptance", "## Latency", "## Accuracy per backend",
                                       "## Targets", "## Edge bundles")]
    assert positions == sorted(positions)
    parity = md[md.index("## Accuracy per backend"):md.index("## Targets")]
    assert "Scored with Q/DQ unfused" in parity and "`int8@ort-cpu`." in parity
    assert "saturating 16-bit pairs" in parity and "`int8-cpu@ort-cpu`." in parity
    # one row per variant@backend, metrics as columns, samples last, nulls as —
    assert "| variant@backend | cosine_mean | cosine_min | snr_db | max_abs_diff | nn_agreement | samples |" in parity
    for key in report["parity"]:
        assert f"| `{key}` |" in parity
    assert "| `int8@ort-cpu` | 0.997100 | 0.981000 | 22.7 | 8.320e-02 | 0.9840 | 64 |" in parity
    assert "| `int8@ort-cuda` | — | — | 23.1 | 7.910e-02 | — | 64 |" in parity
    assert "| `fp32@torch` | 1.000000 | 1.000000 | — | 0 | 1.0000 | 64 |" in parity
    assert "`runs/x/verify_inputs.npz`" in parity and "efefefefefefefef…" in parity
    assert "Backends skipped: `tensorrt` (tensorrt is not installed)." in parity
    # checks, pass and fail, a null value
    assert "1 of 2 checks passed; failed: int8@ort-cuda.cosine_mean." in parity
    assert "| `int8@ort-cpu.cosine_mean` | 0.997100 | >= 0.99 | ✅ PASS |" in parity
    assert "| `int8@ort-cuda.cosine_mean` | — | >= 0.99 | ❌ FAIL |" in parity
    # localization: the worst nodes (capped) and the exclude command
    assert "### Error localization: `int8@ort-cpu`" in parity and "Worst 10 of 12 nodes" in parity
    assert "| `/encoder/layer.0/MatMul` | MatMul | `encoder.layer.0.output.dense` | 30.0 |" in parity
    assert "`/encoder/layer.11/MatMul`" not in parity
    assert "| 26.0 | — |" in parity  # node 1's null accumulated cosine
    assert ("deploykit calibrate runs/x/model.onnx --recipe recipes/minilm-int8.yaml "
            "--exclude /encoder/layer.0/MatMul --exclude /encoder/layer.1/MatMul") in parity

    targets = md[md.index("## Targets"):md.index("## Edge bundles")]
    assert "| `x86-server` | `ort-cpu` | `fp32` | 4 | 12.50 | 15.25 | — | 412.3 / 2048 | ✅ |" in targets
    assert "| `x86-server` | `ort-cpu` | `int8` | 4 | 5.50 | 7.75 | 0.44× (0.41–0.47) | 2300.0 / 2048 | ❌ |" in targets
    # the reason is a line under the table, not a value of the variant column
    assert "| `rpi5` | `ort-cpu-arm64` | — | — | — | — | — | — | not measurable here |" in targets
    assert "- `rpi5`: not measurable here: needs an aarch64 CPU, this machine is x86_64" in targets
    assert "- `x86-server`: threads capped at the target's 4 cores" in targets
    # accuracy on each target's runtime: its backend's entries and checks, or why there are none
    assert "| `x86-server` | `ort-cpu` | `int8` | 0.997100 | nn_agreement 0.9840 | ✅ 1/1 |" in targets
    assert "| `x86-server` | `ort-cpu` | `fp32` | 1.000000 | nn_agreement 1.0000 | — |" in targets
    assert ("| `rpi5` | `ort-cpu` (this machine's CPU, not the target's) | `int8` | 0.997100 | nn_agreement 0.9840 "
            "| ✅ 1/1 |") in targets

    bundles = md[md.index("## Edge bundles"):]
    assert f"| `x86-server` | `runs/x/bundles/x86-server.tar.gz` | `{'0a' * 32}` | 3.0 MiB | 7 |" in bundles


def test_render_deployment_sections_is_deterministic(tmp_path):
    src = write_report(tmp_path, add_deployment_sections(make_report()))
    render_report(src, tmp_path / "a")
    render_report(src, tmp_path / "b")
    for name in ("report.md", *DEPLOY_PLOTS):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_render_deployment_sections_partial(tmp_path):
    # nothing measurable, no plottable parity value, verification without checks: sections render, no parity plot
    report = add_deployment_sections(make_report())
    report["parity"] = {"int8@tensorrt": {"cosine_mean": None, "snr_db": None, "samples": None}}
    report["verification"] = {"backends_skipped": {}}
    report["targets"] = {"rpi5": report["targets"]["rpi5"]}
    del report["bundles"]
    src = write_report(tmp_path, report)
    md = render_report(src).read_text(encoding="utf-8")
    assert "## Accuracy per backend" in md and "Backends skipped: none." in md
    assert "| `int8@tensorrt` | — | — | — |" in md
    assert "parity_by_backend.png" not in md and not (tmp_path / "parity_by_backend.png").exists()
    assert "not measurable here: needs an aarch64 CPU" in md
    _png_ok(tmp_path / "latency_by_target.png")
    assert "## Edge bundles" not in md and "### Parity checks" not in md


def test_render_parity_checks_equal_to_acceptance_are_not_repeated(tmp_path):
    report = add_deployment_sections(make_report())
    report["acceptance"] = copy.deepcopy(report["verification"]["checks"])  # as deploykit verify writes them
    md = render_report(write_report(tmp_path, report)).read_text(encoding="utf-8")
    assert md.count("| `int8@ort-cpu.cosine_mean` | 0.997100 | >= 0.99 | ✅ PASS |") == 1
    assert "### Parity checks" in md and "1 of 2 checks passed; failed: int8@ort-cuda.cosine_mean." in md
    assert "They are the checks of the Acceptance table above." in md
