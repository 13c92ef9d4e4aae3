"""Faults: interruption (SIGINT, SIGTERM) at chosen points, SIGKILL, and concurrent calibrations.

A fault is injected from outside deploykit: the subprocess gets a ``sitecustomize`` (on
PYTHONPATH) that wraps one function and sends the process a signal on its n-th call, so the
signal lands exactly at a known point (during shape inference, between calibration batches,
after the Q/DQ model was written but before it was renamed, between the renames of the model
and its ranges, during export, while the report is written). After each fault the previous
outputs must be byte-identical, no temporary file may remain, and the exit code says which
signal it was (128 + signal number).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import onnx
import pytest

from contract import assert_no_temp_files, assert_user_error, deploykit, tree_hashes

_SITECUSTOMIZE = textwrap.dedent('''
    import functools, importlib, json, os, signal

    _spec = json.loads(os.environ["DEPLOYKIT_TEST_FAULT"])
    _module, _, _attr = _spec["target"].partition(":")
    _owner = importlib.import_module(_module)
    *_path, _name = _attr.split(".")
    for _part in _path:
        _owner = getattr(_owner, _part)
    _original = getattr(_owner, _name)
    _calls = [0]

    @functools.wraps(_original)
    def _faulty(*args, **kwargs):
        if _spec.get("match") and not any(_spec["match"] in str(a) for a in args):
            return _original(*args, **kwargs)
        _calls[0] += 1
        hit = _calls[0] == _spec.get("nth", 1)
        if hit and _spec.get("when", "before") == "before":
            os.kill(os.getpid(), _spec["signal"])
        result = _original(*args, **kwargs)
        if hit and _spec.get("when") == "after":
            os.kill(os.getpid(), _spec["signal"])
        return result

    setattr(_owner, _name, _faulty)
''')


def _faulty_env(tmp_path: Path, **spec) -> dict[str, str]:
    hook = tmp_path / "fault-hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    return {"PYTHONPATH": str(hook), "DEPLOYKIT_TEST_FAULT": json.dumps(spec)}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _interrupted(proc: subprocess.CompletedProcess, signum: int) -> None:
    assert proc.returncode == 128 + signum, f"rc {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "interrupted" in proc.stderr.lower(), proc.stderr[-2000:]


def _consistent_pair(model: Path) -> dict:
    """The Q/DQ model is valid ONNX and its ranges record names exactly this file."""
    onnx.checker.check_model(onnx.load(str(model)))
    record = json.loads(model.with_name(model.stem + ".ranges.json").read_text())
    assert record["quantized_model_sha256"] == _sha(model)
    return record


# ----------------------------------------------------------------------------- calibrate
@pytest.fixture(scope="module")
def calibrated(tiny_export, tmp_path_factory):
    """A folder with the FP32 input and a finished calibration (the 'previous outputs')."""
    work = tmp_path_factory.mktemp("faults-calibrate")
    model = work / "tiny.onnx"
    model.write_bytes(tiny_export.read_bytes())
    deploykit("-q", "calibrate", "tiny.onnx", "-o", "out.int8.onnx", "--calibration", "16", "--method", "entropy",
              cwd=work)
    return work


@pytest.fixture(scope="module")
def tiny_export(tiny_bert_dir, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("faults-export")
    deploykit("-q", "export", str(tiny_bert_dir), "-o", "tiny.onnx", "--option", "max_length=64", cwd=work)
    return work / "tiny.onnx"


_CALIBRATE_POINTS = [
    # (what to wrap, call number, before/after the call, signal)
    ("onnx.shape_inference:infer_shapes", 1, "before", signal.SIGINT),          # loading the model
    ("onnxruntime:InferenceSession.run", 2, "before", signal.SIGTERM),        # between calibration batches
    ("onnx:save_model", 1, "after", signal.SIGTERM),                           # model written, not renamed
    ("onnx:save_model", 1, "after", signal.SIGINT),
]


@pytest.mark.parametrize("target,nth,when,signum", _CALIBRATE_POINTS,
                         ids=[f"{t.split(':')[1]}-{w}-{signal.Signals(s).name}" for t, _, w, s in _CALIBRATE_POINTS])
def test_interrupted_calibration_keeps_the_previous_outputs(calibrated, tmp_path, target, nth, when, signum):
    before = tree_hashes(calibrated)
    tmpdir = tmp_path / "tmp"
    proc = deploykit("calibrate", "tiny.onnx", "-o", "out.int8.onnx", "--calibration", "16", "--method", "minmax",
                     "--batch-size", "4", cwd=calibrated, check_rc=None, tmpdir=tmpdir,
                     env=_faulty_env(tmp_path, target=target, nth=nth, when=when, signal=int(signum)))
    _interrupted(proc, signum)
    assert tree_hashes(calibrated) == before, "the input or the previous model/ranges changed"
    assert_no_temp_files(calibrated, tmpdir=tmpdir)


def test_signal_between_the_two_renames_waits_for_both(calibrated, tmp_path):
    """SIGTERM when the model is being renamed into place: the ranges follow before it acts, so
    the pair on disk is the new one, whole, and the exit code still says it was terminated."""
    work = tmp_path / "w"
    work.mkdir()
    for name in ("tiny.onnx", "out.int8.onnx", "out.int8.ranges.json"):
        (work / name).write_bytes((calibrated / name).read_bytes())
    old_model = _sha(work / "out.int8.onnx")
    tmpdir = tmp_path / "tmp"
    proc = deploykit("calibrate", "tiny.onnx", "-o", "out.int8.onnx", "--calibration", "16", "--method", "minmax",
                     cwd=work, check_rc=None, tmpdir=tmpdir,
                     env=_faulty_env(tmp_path, target="os:replace", match="out.int8.onnx", nth=1,
                                     when="before", signal=int(signal.SIGTERM)))
    _interrupted(proc, signal.SIGTERM)
    assert _sha(work / "out.int8.onnx") != old_model
    record = _consistent_pair(work / "out.int8.onnx")
    assert record["config"]["method"] == "minmax"
    assert_no_temp_files(work, tmpdir=tmpdir)


def test_a_users_inferred_file_beside_the_input_is_left_alone(calibrated, tmp_path):
    """ORT's helper writes and deletes '<model>-inferred.onnx' beside its input; deploykit works
    in memory, so a file of that name (the user's) survives and two runs never collide on it."""
    work = tmp_path / "w"
    work.mkdir()
    (work / "tiny.onnx").write_bytes((calibrated / "tiny.onnx").read_bytes())
    mine = work / "tiny-inferred.onnx"
    mine.write_text("the user's own file")
    tmpdir = tmp_path / "tmp"
    deploykit("-q", "calibrate", "tiny.onnx", "--calibration", "8", "--method", "minmax",
              cwd=work, tmpdir=tmpdir)
    assert mine.read_text() == "the user's own file"
    _consistent_pair(work / "tiny.int8.onnx")
    assert sorted(p.name for p in work.iterdir()) == ["tiny-inferred.onnx", "tiny.int8.onnx",
                                                      "tiny.int8.ranges.json", "tiny.onnx"]
    assert_no_temp_files(tmpdir, tmpdir=tmpdir)


@pytest.mark.parametrize("same_output", [True, False], ids=["one-output", "two-outputs"])
def test_two_calibrations_of_one_input_at_once_both_succeed(calibrated, tmp_path, same_output):
    work = tmp_path / "w"
    work.mkdir()
    (work / "tiny.onnx").write_bytes((calibrated / "tiny.onnx").read_bytes())
    before = _sha(work / "tiny.onnx")
    exe = [sys.executable, "-m", "deploykit.cli"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    outs = ["a.int8.onnx", "a.int8.onnx" if same_output else "b.int8.onnx"]
    procs = [subprocess.Popen([*exe, "-q", "calibrate", "tiny.onnx", "-o", out, "--calibration", "16",
                               "--method", method], cwd=work, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for out, method in zip(outs, ("minmax", "entropy"))]
    results = [p.communicate(timeout=600) for p in procs]
    for proc, (_, err) in zip(procs, results):
        assert proc.returncode == 0, err
    for out in set(outs):
        _consistent_pair(work / out)            # one process's model with that process's ranges
    assert _sha(work / "tiny.onnx") == before
    assert_no_temp_files(work, tmpdir=tmp_path / "tmp")


def test_ranges_of_another_model_are_refused(calibrated, tmp_path):
    """A Q/DQ model replaced by hand next to old ranges: debug-quant (which re-applies the
    recorded smoothing) refuses the pair instead of mixing them."""
    work = tmp_path / "w"
    work.mkdir()
    for name in ("tiny.onnx", "out.int8.ranges.json"):
        (work / name).write_bytes((calibrated / name).read_bytes())
    deploykit("-q", "calibrate", "tiny.onnx", "-o", "other.int8.onnx", "--calibration", "8", "--method", "minmax",
              cwd=work)
    (work / "out.int8.onnx").write_bytes((work / "other.int8.onnx").read_bytes())
    proc = deploykit("debug-quant", "tiny.onnx", "out.int8.onnx", "-o", "dbg", cwd=work, check_rc=None)
    assert_user_error(proc, "out.int8.ranges.json", "another INT8 model")
    assert not (work / "dbg").exists()


# ----------------------------------------------------------------------------- run
def _recipe(folder: Path, tiny_bert_dir: Path, method: str) -> Path:
    path = folder / f"tiny-{method}.yaml"
    path.write_text(f"""
name: tiny
model: {{source: "{tiny_bert_dir}", options: {{max_length: 64}}}}
data: {{source: docstrings, calibration: 16, evaluation: 32, seed: 3}}
quantize: {{method: {method}}}
bench: {{batches: [2], seq_len: 32, warmup: 0, iterations: 1, min_seconds: 0.0, torch_baseline: false}}
acceptance: {{fp32.cosine_min: '>= 0.999', int8.cosine_mean: '>= 0.5'}}
""")
    return path


@pytest.fixture(scope="module")
def previous_run(tiny_bert_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("faults-run")
    deploykit("-q", "run", str(_recipe(work, tiny_bert_dir, "entropy")), "--out", "runs", cwd=work)
    assert (work / "runs" / "tiny" / "report.json").is_file()
    return work


_RUN_POINTS = [
    ("deploykit.export:export_onnx", 1, "before", signal.SIGINT),              # export
    ("onnxruntime:InferenceSession.run", 2, "before", signal.SIGTERM),         # calibration / verification
    ("deploykit.pipeline:save_report", 1, "after", signal.SIGTERM),            # report written, run not done
]


@pytest.mark.parametrize("target,nth,when,signum", _RUN_POINTS,
                         ids=[f"{t.split(':')[1]}-{signal.Signals(s).name}" for t, _, _, s in _RUN_POINTS])
def test_interrupted_run_leaves_the_previous_run(previous_run, tiny_bert_dir, tmp_path, target, nth, when, signum):
    runs = previous_run / "runs"
    before = tree_hashes(runs)
    tmpdir = tmp_path / "tmp"
    proc = deploykit("run", str(_recipe(tmp_path, tiny_bert_dir, "minmax")), "--out", str(runs), cwd=tmp_path,
                     check_rc=None, tmpdir=tmpdir,
                     env=_faulty_env(tmp_path, target=target, nth=nth, when=when, signal=int(signum)))
    _interrupted(proc, signum)
    assert tree_hashes(runs) == before, "the previous run folder changed"
    assert sorted(p.name for p in runs.iterdir()) == ["tiny"]
    assert_no_temp_files(runs, tmpdir=tmpdir)


def test_killed_run_is_refused_then_rolled_back(previous_run, tiny_bert_dir, tmp_path):
    """SIGKILL cannot be cleaned up after: readers refuse the half-written folder with one line,
    and the next run of the recipe first puts the previous run back."""
    runs = tmp_path / "runs"
    runs.mkdir()
    import shutil

    shutil.copytree(previous_run / "runs" / "tiny", runs / "tiny")
    before = tree_hashes(runs)
    env = dict(os.environ, HF_HUB_OFFLINE="1",
               **_faulty_env(tmp_path, target="deploykit.export:export_onnx", nth=1, when="before",
                             signal=int(signal.SIGKILL)))
    proc = subprocess.run([sys.executable, "-m", "deploykit.cli", "-q", "run",
                           str(_recipe(tmp_path, tiny_bert_dir, "minmax")), "--out", str(runs)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL
    assert (runs / "tiny" / ".staging-incomplete").exists()
    refused = deploykit("verify", str(runs / "tiny"), cwd=tmp_path, check_rc=None)
    assert_user_error(refused, str(runs / "tiny"), "killed")
    from deploykit.runfolder import recover

    assert recover(runs / "tiny")
    assert tree_hashes(runs) == before
    assert_no_temp_files(runs)


def test_a_live_run_keeps_a_second_one_out(previous_run, tiny_bert_dir, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (runs / ".tiny.staging-lock").write_text(f"{sleeper.pid}\n")
        proc = deploykit("run", str(_recipe(tmp_path, tiny_bert_dir, "minmax")), "--out", str(runs),
                         cwd=tmp_path, check_rc=None)
        assert_user_error(proc, "tiny", f"pid {sleeper.pid}")
        assert sorted(p.name for p in runs.iterdir()) == [".tiny.staging-lock"]
    finally:
        sleeper.kill()
        sleeper.wait()


# ----------------------------------------------------------------------------- in process
def test_run_folder_restores_the_previous_run_on_any_error(tmp_path):
    from deploykit.runfolder import MARKER, run_folder

    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "report.json").write_text("old")
    with pytest.raises(RuntimeError):
        with run_folder(run_dir):
            assert not (run_dir / "report.json").exists() and (run_dir / MARKER).exists()
            (run_dir / "report.json").write_text("new, half")
            raise RuntimeError("a stage failed")
    assert (run_dir / "report.json").read_text() == "old"
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["r"]
    with run_folder(run_dir):
        (run_dir / "report.json").write_text("new")
    assert (run_dir / "report.json").read_text() == "new" and not (run_dir / MARKER).exists()
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["r"]


def test_atomic_group_defers_a_signal_until_every_rename_is_done(tmp_path, monkeypatch):
    from deploykit import io

    a, b = tmp_path / "m.onnx", tmp_path / "m.ranges.json"
    a.write_text("old a")
    b.write_text("old b")
    previous = signal.getsignal(signal.SIGTERM)
    io.install_signal_handlers()
    real_replace = os.replace
    fired = []

    def replace(src, dst):
        if not fired:
            fired.append(dst)
            os.kill(os.getpid(), signal.SIGTERM)   # arrives between the two renames
            time.sleep(0.05)
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", replace)
    try:
        with pytest.raises(io.Interrupted) as info:
            with io.atomic_paths(a, b) as (ta, tb):
                ta.write_text("new a")
                tb.write_text("new b")
        assert info.value.exit_code == 128 + signal.SIGTERM
        assert (a.read_text(), b.read_text()) == ("new a", "new b")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.ranges.json"]
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, previous if sig == signal.SIGTERM else signal.default_int_handler
                          if sig == signal.SIGINT else signal.SIG_DFL)
