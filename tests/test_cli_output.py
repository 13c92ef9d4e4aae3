"""What a user reads: results on stdout (logs and progress on stderr), tables and help that read
at 80 columns, and thresholds that can address every variant name a report shows."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from contract import deploykit

NARROW = {"COLUMNS": "80"}


def test_targets_table_goes_to_stdout_and_reads_at_80_columns(tmp_path):
    from deploykit.targets import load_targets

    proc = deploykit("targets", cwd=tmp_path, env=NARROW)
    assert proc.stderr.strip() == ""                      # a table is a result: `targets > t.txt` holds it
    lines = proc.stdout.splitlines()
    assert lines and max(len(line) for line in lines) <= 80, proc.stdout
    assert "…" not in proc.stdout and "..." not in proc.stdout
    header = next(line for line in lines if line.startswith("target "))
    columns = header.split()
    assert columns == ["target", "runtime", "sm", "arch", "GiB", "threads", "int8", "preset"]
    # cells are at least two spaces apart (the runtime cell holds one: "TRT >=10.15")
    rows = {cells[0]: cells for cells in (re.split(r"\s{2,}", line.strip()) for line in lines[3:])
            if len(cells) == len(columns)}
    for name, target in load_targets().items():
        assert name in rows, f"{name} cut or missing:\n{proc.stdout}"   # jetson-orin vs jetson-thor: whole names
        row = rows[name]
        assert row[2] == (target.compute_capability or "-") and row[3] == target.arch, row
        assert row[5] == (str(target.threads) if target.threads else "-")   # the threads column the README names
        assert row[6].startswith("Q/DQ" if "int8" in target.precisions else "no") and row[7] == target.preset
    wide = deploykit("targets", "--wide", cwd=tmp_path, env={"COLUMNS": "250"})
    assert "precisions" in wide.stdout and "fp8" in wide.stdout


def test_doctor_table_goes_to_stdout(tmp_path):
    proc = deploykit("doctor", cwd=tmp_path, env=NARROW)
    assert "onnxruntime" in proc.stdout and "Traceback" not in proc.stderr


def test_top_level_help_cuts_no_description_at_80_columns(tmp_path):
    proc = deploykit("--help", cwd=tmp_path, env=NARROW)
    commands = proc.stdout.split("Commands:", 1)[1].splitlines()
    assert len([c for c in commands if c.strip()]) >= 15
    assert not any(line.rstrip().endswith("...") for line in commands), proc.stdout
    assert max(len(line) for line in proc.stdout.splitlines()) <= 80


def test_run_help_lists_the_builtin_recipes_and_calibrate_help_every_preset(tmp_path):
    # compared without whitespace: help wraps long names at their hyphens
    from deploykit.presets import PRESETS
    from deploykit.recipe import builtin_recipes

    run_help = "".join(deploykit("run", "--help", cwd=tmp_path, env={"COLUMNS": "300"}).stdout.split())
    for name in builtin_recipes():
        assert name in run_help
    calibrate_help = "".join(deploykit("calibrate", "--help", cwd=tmp_path, env={"COLUMNS": "300"}).stdout.split())
    for name in PRESETS:
        assert name in calibrate_help


@pytest.mark.parametrize("key", ["m.naive.int8.cosine_mean", "int8.cosine_mean", "m.int8@ort-cpu.snr_db",
                                 "fp32@torch.cosine_min"])
def test_a_threshold_addresses_any_variant_name(key):
    from deploykit.acceptance import evaluate_checks
    from deploykit.recipe import check_acceptance, evaluate_acceptance

    check_acceptance({key: ">= 0.5"}, "--threshold")
    variant, metric = key.rsplit(".", 1)
    parity = {variant if "@" in variant else f"{variant}@ort-cpu": {metric: 0.75}}
    [check] = evaluate_checks({key: ">= 0.5"}, parity)
    assert check["passed"] and check["value"] == 0.75
    if "@" not in variant:
        [rule] = evaluate_acceptance({key: ">= 0.9"}, {variant: {metric: 0.75}})
        assert not rule["passed"] and rule["value"] == 0.75


@pytest.mark.parametrize("key", ["cosine_mean", ".cosine_mean", "int8.", "int8.cos-ine", "a@b@c.x", "@cpu.x"])
def test_a_malformed_threshold_is_refused(key):
    from deploykit.errors import UserError
    from deploykit.recipe import check_acceptance

    with pytest.raises(UserError, match="variant"):
        check_acceptance({key: ">= 0.5"}, "--threshold")


def test_portable_paths_name_no_machine_path(tmp_path):
    from deploykit.io import portable_path
    from deploykit.recipe import builtin_recipes

    builtin = builtin_recipes()["minilm-int8"]
    assert portable_path(str(builtin.resolve())) == "minilm-int8"
    assert portable_path(str(tmp_path / "runs" / "a" / "model.onnx"), tmp_path / "runs") == "a/model.onnx"
    assert portable_path(str(tmp_path / "elsewhere" / "my.yaml"), tmp_path / "runs") == "my.yaml"
    assert portable_path(f"hf:{tmp_path / 'bert'}") == "hf:bert"
    assert portable_path("embedded:minilm") == "embedded:minilm" and portable_path(None) is None
    assert portable_path("relative/recipe.yaml") == "relative/recipe.yaml"


def test_report_header_and_artifacts_name_paths_relative_to_the_report(tmp_path):
    from deploykit.report import render_report

    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    report = {"model": f"hf:{tmp_path / 'my-bert'}", "recipe": str(tmp_path / "recipes" / "mine.yaml"),
              "target": "edge-cpu-x86", "artifacts": {"int8": str(run / "model.int8.onnx")},
              "accuracy": {}, "latency": {},
              "environment": {"python": "3.11", "torch": None, "onnxruntime": None, "cpu": None, "gpu": None}}
    (run / "report.json").write_text(json.dumps(report))
    md = Path(render_report(run / "report.json")).read_text()
    assert str(tmp_path) not in md
    assert "# deploykit report: hf:my-bert" in md and "**recipe** `mine.yaml`" in md
    assert "`model.int8.onnx`" in md


def test_calibrate_with_smoothquant_says_how_many_groups_it_smoothed(tiny_onnx, tiny_bert_dir, tmp_path):
    out = tmp_path / "m.int8.onnx"
    proc = deploykit("calibrate", str(tiny_onnx), "-o", str(out), "--model", f"hf:{tiny_bert_dir}",
                     "--calibration", "8", "--evaluation", "8", "--smoothquant", "0.5",
                     "--smoothquant-targets", "all", cwd=tmp_path)
    line = next(line for line in (proc.stdout + proc.stderr).splitlines() if "groups smoothed" in line)
    # the tiny BERT has 2 layers x (Q/K/V, attention out, FFN in, FFN out) = 8 smoothed groups at most
    count = int(line.split("groups smoothed")[0].split()[-1])
    assert 1 <= count <= 8 and "alpha 0.5 (all)" in line, line
