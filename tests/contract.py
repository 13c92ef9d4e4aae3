"""The user-error contract, shared by the tests that feed deploykit bad input.

``deploykit(...)`` runs the real entry point in a subprocess (with its own TMPDIR when asked,
so a test can see every temporary file it left); ``assert_user_error`` checks exit code 2, exactly
one ``deploykit: error:`` line naming the file and a fix, and no traceback; ``tree_hashes`` and
``assert_no_temp_files`` check that inputs are unchanged and nothing temporary is left behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path


def _interactive_signals() -> None:
    """In the child, before it starts: SIGINT as in a terminal. A shell starts background jobs
    with SIGINT ignored, and a process that starts with it ignored rightly keeps ignoring it
    (nohup semantics), so a suite run in the background would otherwise see no Ctrl-C at all."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def deploykit(*args, cwd: Path, check_rc: int | None = 0, tmpdir: Path | None = None,
              env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    exe = shutil.which("deploykit") or sys.executable
    cmd = [exe, *args] if exe.endswith("deploykit") else [exe, "-m", "deploykit.cli", *args]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})}
    if tmpdir is not None:
        Path(tmpdir).mkdir(parents=True, exist_ok=True)
        full_env["TMPDIR"] = str(tmpdir)
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=full_env, timeout=timeout,
                          preexec_fn=_interactive_signals if os.name == "posix" else None)
    if check_rc is not None:
        assert proc.returncode == check_rc, f"rc {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("deploykit: error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert "fix:" in errors[0]


def tree_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file below ``root`` (relative path -> digest): equal before and after
    means nothing there was changed, added or removed."""
    root = Path(root)
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


# Names deploykit gives its temporary files and folders (atomic writes, staging, ORT's helpers).
_TEMP_MARKS = (".tmp", "-inferred", ".staging", "ort.quant.", ".partial")


def temp_leftovers(*roots: Path) -> list[str]:
    found = []
    for root in roots:
        root = Path(root)
        if not root.exists():
            continue
        for path in root.rglob("*"):
            if any(mark in path.name for mark in _TEMP_MARKS):
                found.append(str(path))
    return sorted(found)


# Files other libraries keep in TMPDIR on purpose (not temporary, not deploykit's): importing
# onnxruntime writes a small session-id file ".ses" there and reuses it on the next start.
_NOT_OURS = {".ses"}


def assert_no_temp_files(*roots: Path, tmpdir: Path | None = None) -> None:
    """No temporary name below ``roots``, and (when the run had its own TMPDIR) nothing at all in it."""
    left = temp_leftovers(*roots)
    assert not left, f"temporary files left behind: {left}"
    if tmpdir is not None and Path(tmpdir).exists():
        extra = sorted(str(p) for p in Path(tmpdir).iterdir() if p.name not in _NOT_OURS)
        assert not extra, f"left in TMPDIR: {extra}"
