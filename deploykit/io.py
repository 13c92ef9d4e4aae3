"""Atomic outputs, never-overwritten inputs, hashing.

Every artifact is written to a temporary file in the destination folder and renamed into
place, so a reader never sees a half-written file and a crash leaves the previous version.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from deploykit.errors import UserError


@contextlib.contextmanager
def atomic_path(dest: str | Path, *, inputs: tuple[str | Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success rename it onto ``dest``.

    ``inputs`` are the files the caller read: writing onto one of them is refused.
    """
    dest = Path(dest)
    refuse_overwriting_inputs(dest, inputs)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    except OSError as exc:
        raise _write_error(exc, dest) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
        os.replace(tmp_path, dest)
    except OSError as exc:
        if exc.errno in _WRITE_ERRNOS:
            raise _write_error(exc, dest) from None
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


# A full disk, a quota, a read-only or forbidden folder, a too-large file: the user's to fix.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def _write_error(exc: OSError, dest: Path) -> UserError:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return UserError(f"cannot write the output ({reason}); nothing was written", path=dest,
                     fix="free disk space or write somewhere else (--out)")


def _umask() -> int:
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


def write_json(dest: str | Path, data: Any, *, inputs: tuple[str | Path, ...] = ()) -> Path:
    return write_text(dest, json.dumps(data, indent=2, default=_json_default, allow_nan=False) + "\n", inputs=inputs)


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
    except (ValueError, OSError, EOFError) as exc:
        raise UserError(f"{what} is not a readable .npz ({exc})", path=path,
                        fix="regenerate it with deploykit") from None


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
