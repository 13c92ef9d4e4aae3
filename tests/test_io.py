"""Atomic outputs and never-overwritten inputs."""

from __future__ import annotations

import json

import pytest

from deploykit.errors import UserError
from deploykit.io import atomic_path, write_json


def test_failed_write_keeps_the_previous_file_and_leaves_no_temp(tmp_path):
    dest = tmp_path / "report.json"
    write_json(dest, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_text('{"a": 2, "half')
            raise RuntimeError("crash mid-write")
    assert json.loads(dest.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_writing_onto_an_input_is_refused(tmp_path):
    src = tmp_path / "in.json"
    src.write_text("{}")
    with pytest.raises(UserError, match="overwrite an input"):
        write_json(tmp_path / "." / "in.json", {"x": 1}, inputs=(src,))
    assert src.read_text() == "{}"


def test_nan_is_never_written(tmp_path):
    with pytest.raises(ValueError):
        write_json(tmp_path / "x.json", {"v": float("nan")})
    assert not (tmp_path / "x.json").exists()


def test_outputs_get_the_usual_permissions(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        path = write_json(tmp_path / "r.json", {})
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644
