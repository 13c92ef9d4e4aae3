"""A run folder is either the previous run or the new one, never a mix of both.

``deploykit run`` writes many files into ``runs/<name>`` over minutes; readers (``package``,
``verify`` on a run, a person) must never see a folder that holds the report and INT8 model of
one run and the data and FP32 model of another. :func:`run_folder` gives the run its folder:

1. a lock beside it (``.<name>.staging-lock``, created exclusively, holding the pid) keeps a
   second run out while one is writing;
2. the previous run, if any, is moved aside to ``.<name>.staging-previous-<pid>``;
3. the new run is written in place (so every path it records is the final one), with the
   marker ``.staging-incomplete`` inside until it is done;
4. success removes the marker, the previous run and the lock (signals wait for that); an error
   or an interruption (SIGINT/SIGTERM/SIGHUP, see ``deploykit.io``) removes the partial folder
   and moves the previous run back.

A run killed outright (SIGKILL, power loss) leaves the lock with a dead pid: the next run of the
same folder, or :func:`recover`, finishes the rollback first. Readers call
:func:`check_complete`, which refuses a folder that still carries the marker.

This module imports only ``deploykit.errors`` and ``deploykit.io``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

from deploykit.errors import UserError
from deploykit.io import critical_section

MARKER = ".staging-incomplete"
_ASIDE = re.compile(r"^\.(?P<name>.+)\.staging-previous-(?P<pid>\d+)$")


def _lock_path(run_dir: Path) -> Path:
    return run_dir.parent / f".{run_dir.name}.staging-lock"


def _aside_path(run_dir: Path, pid: int) -> Path:
    return run_dir.parent / f".{run_dir.name}.staging-previous-{pid}"


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:        # someone else's live process
        return True
    return True


def _read_pid(path: Path) -> int:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def check_name(name: str, where: str | Path | None = None) -> str:
    """A run name is one folder name: no separators, not '.' or '..', not hidden."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
        raise UserError(f"run name {name!r} is not a plain folder name", path=where,
                        fix="use letters, digits, '-' and '_' (set name: in the recipe or --name)")
    return name


def check_complete(run_dir: str | Path) -> Path:
    """``run_dir`` as a finished run; refuses one a run is writing or was killed while writing
    (the run writing it may read it: ``run`` packages its own folder)."""
    run_dir = Path(run_dir)
    marker = run_dir / MARKER
    if marker.exists() and (pid := _read_pid(marker)) != os.getpid():
        state = "is being written by a running deploykit run" if _alive(pid) else \
            "was left half-written by a deploykit run that was killed"
        raise UserError(f"the run folder {state} (pid {pid})", path=run_dir,
                        fix="wait for that run to finish, or run the recipe again (its previous run is restored)")
    return run_dir


def recover(run_dir: str | Path) -> bool:
    """Finish what a killed run left beside ``run_dir``: restore the previous run (or keep the
    finished new one) and remove the lock. Refuses while the writing process is alive.
    Returns whether anything was recovered."""
    run_dir = Path(run_dir)
    lock = _lock_path(run_dir)
    recovered = False
    if lock.exists():
        pid = _read_pid(lock)
        if _alive(pid) and pid != os.getpid():
            raise UserError(f"another deploykit run (pid {pid}) is writing this run folder", path=run_dir,
                            fix="wait for it to finish, or give this run another --name")
    parent = run_dir.parent
    asides = sorted(p for p in parent.iterdir() if (m := _ASIDE.match(p.name)) and m["name"] == run_dir.name) \
        if parent.is_dir() else []
    for aside in asides:
        pid = int(_ASIDE.match(aside.name)["pid"])
        if _alive(pid) and pid != os.getpid():
            continue
        with critical_section():
            if run_dir.is_dir() and not (run_dir / MARKER).exists() and not run_dir.is_symlink():
                _remove(aside)                       # the new run had finished: keep it
            else:
                if run_dir.exists() or run_dir.is_symlink():
                    _remove(run_dir)                 # partial new run
                os.replace(aside, run_dir)           # the previous run, back in place
        recovered = True
    if (run_dir / MARKER).exists() and not _alive(_read_pid(run_dir / MARKER)):
        _remove(run_dir)                             # a first run killed: nothing to restore
        recovered = True
    if lock.exists():
        lock.unlink()
        recovered = True
    return recovered


def _take_lock(run_dir: Path) -> Path:
    lock = _lock_path(run_dir)
    recover(run_dir)                                 # a killed run's leftovers; refuses a live writer
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            recover(run_dir)                         # refuses a live writer; clears a dead one's lock
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{os.getpid()}\n")
        return lock
    raise UserError("could not lock the run folder (another run keeps taking it)", path=run_dir,
                    fix="run one deploykit run per run folder at a time")


@contextlib.contextmanager
def run_folder(run_dir: str | Path) -> Iterator[Path]:
    """The folder a run writes into: the previous run comes back unless the block succeeds."""
    run_dir = Path(run_dir)
    parent = run_dir.parent
    check_name(run_dir.name)
    for p in (parent, *parent.parents):
        if p.exists():
            if not p.is_dir():
                raise UserError(f"the runs folder cannot be created: {p} is a file", path=parent,
                                fix="give --out a folder (or a path that does not exist yet)")
            break
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError("the run folder path is a file", path=run_dir, fix="remove it or choose another --name")
    if run_dir.is_symlink():
        raise UserError("the run folder is a symbolic link", path=run_dir,
                        fix="give a real folder (deploykit replaces a run folder as a whole)")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the runs folder ({os.strerror(exc.errno) if exc.errno else exc})",
                        path=parent, fix="choose a writable --out") from None
    lock = _take_lock(run_dir)
    aside = _aside_path(run_dir, os.getpid())
    moved = False
    try:
        with critical_section():
            if run_dir.exists():
                os.replace(run_dir, aside)
                moved = True
            run_dir.mkdir()
            (run_dir / MARKER).write_text(f"{os.getpid()}\n")
        yield run_dir
    except BaseException:
        with critical_section():
            if run_dir.exists():
                _remove(run_dir)
            if moved:
                os.replace(aside, run_dir)
            lock.unlink(missing_ok=True)
        raise
    with critical_section():
        (run_dir / MARKER).unlink(missing_ok=True)
        if moved:
            _remove(aside)
        lock.unlink(missing_ok=True)
