"""Rendered report files follow the report they belong to: ``report.json`` renders ``report.md``
and unprefixed plots, ``X.json`` renders ``X.md`` and ``X-*.png``; two reports in one folder
never write over each other's files, and each markdown links its own plots."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from contract import assert_no_temp_files, deploykit, tree_hashes  # noqa: E402

SPLIT = ["--calibration", "8", "--evaluation", "16"]
BENCH = ["--batch", "1", "--seq", "16", "--warmup", "0", "--iterations", "2", "--no-torch"]


@pytest.fixture()
def work(tiny_onnx, tmp_path) -> Path:
    shutil.copy(tiny_onnx, tmp_path / "m.onnx")
    return tmp_path


def _links(md: Path) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md.read_text(encoding="utf-8"))


def _own_files(folder: Path, stem: str) -> dict[str, str]:
    """Hashes of one report's files: its JSON, markdown and the plots its markdown links."""
    md = folder / f"{stem}.md"
    names = [f"{stem}.json", md.name, *_links(md)]
    hashes = tree_hashes(folder)
    return {name: hashes[name] for name in names}


def _check_links(folder: Path, stem: str) -> list[str]:
    links = _links(folder / f"{stem}.md")
    assert links, f"{stem}.md links no plot"
    for link in links:
        assert (folder / link).is_file(), link
        assert (folder / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", link
        if stem == "report":
            assert "-" not in link.split("_")[0], link       # default names stay unprefixed
        else:
            assert link.startswith(f"{stem}-"), link
    return links


def test_verify_named_report_keeps_the_default_reports_files(work, tmp_path):
    deploykit("-q", "verify", "m.onnx", *SPLIT, "--backend", "ort-cpu", cwd=work)
    default = _check_links(work, "report")
    assert "parity_by_backend.png" in default
    before = _own_files(work, "report")

    deploykit("-q", "verify", "m.onnx", *SPLIT, "--backend", "ort-cpu", "-r", "gate.json", cwd=work,
              tmpdir=tmp_path / "tmp")
    assert _own_files(work, "report") == before                # the first report is untouched
    named = _check_links(work, "gate")
    assert "gate-parity_by_backend.png" in named
    assert (work / "gate.json").is_file()
    assert_no_temp_files(work, tmp_path / "tmp")   # (importing onnxruntime leaves a .ses file in TMPDIR)


def test_bench_default_report_keeps_the_named_reports_files(work, tmp_path):
    deploykit("-q", "bench", "m.onnx", *SPLIT, *BENCH, "-r", "b2.json", cwd=work)
    named = _check_links(work, "b2")
    assert {"b2-latency_by_batch.png", "b2-throughput_by_batch.png"} <= set(named)
    assert not (work / "report.md").exists() and not (work / "latency_by_batch.png").exists()
    before = _own_files(work, "b2")

    deploykit("-q", "bench", "m.onnx", *SPLIT, *BENCH, cwd=work, tmpdir=tmp_path / "tmp")
    assert _own_files(work, "b2") == before
    assert {"latency_by_batch.png", "throughput_by_batch.png"} <= set(_check_links(work, "report"))
    assert_no_temp_files(work, tmp_path / "tmp")


def test_render_names_follow_the_report_and_out_dir(tmp_path):
    """`deploykit report X.json` renders X.md and X-*.png; a report named .md is refused, not overwritten."""
    from test_report import PLOTS, make_report

    from deploykit.io import write_json
    from deploykit.report import render_report
    from deploykit.errors import UserError

    write_json(tmp_path / "report.json", make_report())
    shutil.copy(tmp_path / "report.json", tmp_path / "night.json")
    render_report(tmp_path / "report.json")
    before = tree_hashes(tmp_path)
    md = render_report(tmp_path / "night.json")
    assert md == tmp_path / "night.md"
    after = tree_hashes(tmp_path)
    assert {k: after[k] for k in before} == before
    assert set(after) - set(before) == {"night.md", *(f"night-{p}" for p in PLOTS)}
    assert set(_check_links(tmp_path, "night")) == {f"night-{p}" for p in PLOTS}

    proc = deploykit("report", "night.json", "-o", "out", cwd=tmp_path)
    assert proc.stdout.strip().endswith("night.md")
    assert set(_check_links(tmp_path / "out", "night")) == {f"night-{p}" for p in PLOTS}

    (tmp_path / "notes.md").write_bytes((tmp_path / "night.json").read_bytes())
    with pytest.raises(UserError, match="collide"):
        render_report(tmp_path / "notes.md")
    assert (tmp_path / "notes.md").read_bytes() == (tmp_path / "night.json").read_bytes()
    assert_no_temp_files(tmp_path)
