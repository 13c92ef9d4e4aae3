"""Atomic outputs, never-overwritten inputs, hashing, and interruption that cleans up.

Every artifact is written to a temporary file in the destination folder and renamed into
place, so a reader never sees a half-written file and a crash leaves the previous version.
Files that belong together (a Q/DQ model and its ranges) are renamed in one critical
section: SIGINT/SIGTERM/SIGHUP arriving there wait until every rename is done.

``install_signal_handlers`` (called by the CLI) turns SIGTERM and SIGHUP into
:class:`Interrupted`, a ``KeyboardInterrupt``, so every ``finally`` and ``with`` block (temporary
files, staging folders) runs on those signals exactly as on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from deploykit.errors import UserError


class Interrupted(KeyboardInterrupt):
    """A termination signal (SIGINT, SIGTERM, SIGHUP) raised where the program was."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_deferring = 0
_pending: list[int] = []
_HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _on_signal(signum: int, frame: Any) -> None:
    if _deferring:
        _pending.append(signum)
        return
    # Further signals would break into the cleanup this one starts: they are ignored from
    # now on (SIGKILL still ends a cleanup that hangs).
    for sig in _HANDLED:
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signum)


def install_signal_handlers() -> None:
    """SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` in the main thread."""
    for sig in _HANDLED:
        if signal.getsignal(sig) is not signal.SIG_IGN:    # nohup'd: stay ignored
            signal.signal(sig, _on_signal)


@contextlib.contextmanager
def critical_section() -> Iterator[None]:
    """Signals arriving inside wait until the block is done (then they raise as usual)."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _pending:
            signum = _pending[0]
            _pending.clear()
            _on_signal(signum, None)


def _check_destination(dest: Path) -> None:
    if dest.is_dir():
        raise UserError("the output path is an existing folder", path=dest,
                        fix="give a file path (e.g. add a file name to -o)")
    for parent in dest.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"cannot create the output: {parent} is a file, not a folder", path=dest,
                                fix="choose an output path whose folders are folders")
            break


def _temp_beside(dest: Path) -> Path:
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    except OSError as exc:
        raise _write_error(exc, dest) from None
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def _folders_locked(paths: list[Path]) -> Iterator[None]:
    """An exclusive ``flock`` on each destination folder: two processes committing groups into
    one folder (two calibrations of one model onto one output) cannot interleave their renames,
    so the files of a group always come from the same process. No lock file is left behind."""
    import fcntl

    fds = []
    try:
        for folder in sorted({str(p.parent.resolve()) for p in paths}):
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            fds.append(fd)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        for fd in fds:
            os.close(fd)                 # closing releases the lock


@contextlib.contextmanager
def atomic_paths(*dests: str | Path, inputs: tuple[str | Path, ...] = ()) -> Iterator[tuple[Path, ...]]:
    """Temporary paths next to each of ``dests``; when the block succeeds, all are renamed
    onto their destinations in one critical section (a signal cannot land between two
    renames). On any error or interruption every temporary file is removed and no
    destination changes. ``inputs`` are the files the caller read: writing onto one is refused."""
    paths = [Path(d) for d in dests]
    for dest in paths:
        refuse_overwriting_inputs(dest, inputs)
        _check_destination(dest)
    temps: list[Path] = []
    try:
        for dest in paths:
            temps.append(_temp_beside(dest))
        yield tuple(temps)
        with critical_section(), _folders_locked(paths if len(paths) > 1 else []):
            for tmp, dest in zip(temps, paths):
                os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; outputs get the usual mode
                os.replace(tmp, dest)
    except OSError as exc:
        if exc.errno in _WRITE_ERRNOS:
            raise _write_error(exc, paths[len(temps) - 1] if temps else paths[0]) from None
        raise
    finally:
        for tmp in temps:
            if tmp.exists():
                tmp.unlink()


@contextlib.contextmanager
def atomic_path(dest: str | Path, *, inputs: tuple[str | Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success rename it onto ``dest``.

    ``inputs`` are the files the caller read: writing onto one of them is refused.
    """
    with atomic_paths(dest, inputs=inputs) as (tmp,):
        yield tmp


# A full disk, a quota, a read-only or forbidden folder, a too-large file: the user's to fix.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def _write_error(exc: OSError, dest: Path) -> UserError:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return UserError(f"cannot write the output ({reason}); nothing was written", path=dest,
                     fix="free disk space or write somewhere else (--out)")


def current_umask() -> int:
    """The process's file-mode creation mask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def refuse_overwriting_inputs(dest: str | Path, inputs: tuple[str | Path, ...]) -> None:
    dest = Path(dest).resolve()
    for src in inputs:
        if src is not None and Path(src).resolve() == dest:
            raise UserError(
                "the output would overwrite an input",
                path=src,
                fix="choose a different output path (-o/--out)",
            )


def write_text(dest: str | Path, text: str, *, inputs: tuple[str | Path, ...] = ()) -> Path:
    with atomic_path(dest, inputs=inputs) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(dest)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def json_text(data: Any) -> str:
    """The JSON text deploykit writes (indented, numpy values as numbers, NaN refused)."""
    return json.dumps(data, indent=2, default=_json_default, allow_nan=False) + "\n"


def write_json(dest: str | Path, data: Any, *, inputs: tuple[str | Path, ...] = ()) -> Path:
    return write_text(dest, json_text(data), inputs=inputs)


def read_json(path: str | Path, *, what: str = "JSON file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found", path=path, fix="check the path")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})", path=path,
                        fix="regenerate it with deploykit or repair the file") from None


def write_npz(dest: str | Path, arrays: dict[str, np.ndarray], *, inputs: tuple[str | Path, ...] = ()) -> Path:
    with atomic_path(dest, inputs=inputs) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    return Path(dest)


def read_npz(path: str | Path, *, what: str = "array file") -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found", path=path, fix="check the path")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise UserError(f"{what} is not a readable .npz ({reason})", path=path,
                        fix="regenerate it with deploykit") from None



def _builtin_recipe_dir() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("deploykit.recipes")
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]).resolve() if locations else None


def portable_path(value: Any, base: str | Path | None = None) -> Any:
    """``value`` as files that travel (report headers, bundle manifests) name it, without the
    paths of the machine that wrote them: a built-in recipe by its name, a path under ``base``
    relative to it, any other absolute path by its file name. Source strings keep their prefix
    (``hf:/abs/folder`` -> ``hf:folder``); other values pass through unchanged."""
    if not isinstance(value, str) or not value:
        return value
    prefix, _, rest = value.partition(":")
    if rest and prefix in ("hf", "onnx", "torch", "file") and rest.startswith(("/", "~")):
        return f"{prefix}:{portable_path(rest, base)}"
    path = Path(value)
    if not path.is_absolute():
        return value
    resolved = path.resolve()
    builtin = _builtin_recipe_dir()
    if builtin is not None and resolved.parent == builtin and resolved.suffix == ".yaml":
        return resolved.stem
    if base is not None:
        try:
            return resolved.relative_to(Path(base).resolve()).as_posix()
        except ValueError:
            pass
    return path.name

def sha256_text(items: list[str]) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(item.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def sha256_arrays(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        arr = np.ascontiguousarray(arrays[key])
        h.update(key.encode())
        h.update(str(arr.dtype).encode())
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
