"""``deploykit unpack``: check a bundle archive from its headers and manifest, then stream it into place."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Any

import deploykit.package.limits as limits
from deploykit.errors import UserError
from deploykit.io import critical_section, current_umask, sha256_file
from deploykit.package.manifest import FIX_BAD, bad_bundle, parse_manifest, unsafe_rel
from deploykit.progress import say

_CHUNK = 1 << 20                    # extraction writes (and checks its bounds) this much at a time
_DAMAGED = (tarfile.TarError, OSError, EOFError, zlib.error)     # what reading a cut or corrupted archive raises


def _member_error(name: str, why: str, archive: Path) -> UserError:
    fix = ("do not use this bundle; deploykit bundles hold only files and folders" if "link" in why or "device" in why
           else FIX_BAD)
    return UserError(f"archive member '{name}' {why}", path=archive, fix=fix)


def _scan_members(tar: tarfile.TarFile, archive: Path) -> tuple[str, dict[str, tarfile.TarInfo], set[str]]:
    """(top folder, ``{relative path: member}`` of the files, relative folders), reading headers one
    at a time: names, types, duplicates and the size ceilings are checked before the next header
    is read, so a bomb is refused after reading at most the ceilings' worth of the archive."""
    tops: set[str] = set()
    files: dict[str, tarfile.TarInfo] = {}
    dirs: set[str] = set()
    seen: dict[str, str] = {}
    total = count = 0
    while True:
        member = tar.next()
        if member is None:
            break
        count += 1
        if count > limits.MAX_MEMBERS:
            raise UserError(f"the archive holds more than {limits.MAX_MEMBERS} entries", path=archive,
                            fix=FIX_BAD)
        name = member.name
        if member.issym() or member.islnk():
            raise _member_error(name, "is a link", archive)
        if member.isdev() or member.ischr() or member.isblk() or member.isfifo():
            raise _member_error(name, "is a device or FIFO", archive)
        if member.type == tarfile.GNUTYPE_SPARSE or member.issparse() or not (member.isfile() or member.isdir()):
            raise _member_error(name, "is not a regular file or folder", archive)
        rel = name.rstrip("/") if member.isdir() else name
        why = unsafe_rel(rel)
        if why:
            raise _member_error(name, why, archive)
        key = rel.casefold()
        if key in seen:
            raise _member_error(name, f"appears twice in the archive (as '{seen[key]}' too)", archive)
        seen[key] = name
        if member.size > limits.MAX_MEMBER_BYTES:
            raise _member_error(name, f"holds {member.size} bytes, over the {limits.MAX_MEMBER_BYTES} a bundle file "
                                "may hold", archive)
        total += member.size
        if total > limits.MAX_TOTAL_BYTES:
            raise UserError(f"the archive holds more than {limits.MAX_TOTAL_BYTES} bytes", path=archive,
                            fix=FIX_BAD)
        parts = rel.split("/")
        tops.add(parts[0])
        inner = "/".join(parts[1:])
        if member.isdir():
            if inner:
                dirs.add(inner)
        elif not inner:
            tops.add("")              # a file at the top: not a bundle folder
        else:
            files[inner] = member
    if len(tops) != 1 or "" in tops:
        raise UserError("the archive does not hold exactly one bundle folder", path=archive,
                        fix="use an archive written by deploykit package")
    for rel in files:                 # a file where a folder is needed ('model' and 'model/x.onnx')
        parents = ["/".join(rel.split("/")[:i]) for i in range(1, rel.count("/") + 1)]
        clash = next((p for p in parents if p in files), None) or (rel if rel in dirs else None)
        if clash:
            raise _member_error(clash, "is both a file and a folder in the archive", archive)
    return tops.pop(), files, dirs


def _copy_bounded(src, fd: int, limit: int, rel: str, where: Path | str) -> tuple[int, str]:
    """Copy ``src`` into the open file ``fd`` in chunks; (bytes, SHA-256). Refuses as soon as more
    than ``limit`` bytes arrive: at most one chunk past the limit is read, none of it written."""
    h = hashlib.sha256()
    written = 0
    while True:
        chunk = src.read(_CHUNK)
        if not chunk:
            return written, h.hexdigest()
        if written + len(chunk) > limit:
            raise bad_bundle(f"bundle file {rel} holds more than the {limit} bytes its manifest declares "
                             "(or the ceiling allows)", where)
        h.update(chunk)
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view):]
        written += len(chunk)


def _write_member(src, path: Path, limit: int, rel: str, where: Path | str) -> tuple[int, str]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        return _copy_bounded(src, fd, limit, rel, where)
    except BaseException:
        os.close(fd)
        fd = -1
        path.unlink(missing_ok=True)          # the partial file goes at once, not with the staging folder
        raise
    finally:
        if fd >= 0:
            os.close(fd)


def _hash_file(folder: Path, rel: str, entry: dict[str, Any], where: Path | str) -> None:
    """The file ``rel`` of an unpacked bundle: a regular file (no link on the way), of the
    declared size and SHA-256."""
    path = folder
    for part in rel.split("/"):
        path = path / part
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise UserError(f"bundle file {rel} is missing", path=where, fix="fetch the bundle again") from None
        if stat.S_ISLNK(st.st_mode):
            raise UserError(f"bundle file {rel} is a link", path=where, fix="do not use this bundle")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"bundle file {rel} is not a regular file", path=where, fix="do not use this bundle")
    if st.st_size != entry["bytes"]:
        raise UserError(f"bundle file {rel} is {st.st_size} bytes, not the {entry['bytes']} its manifest declares "
                        "(tampered or corrupted)", path=where, fix="do not use this bundle; fetch it again")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as fh:
        h = hashlib.sha256()
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    if h.hexdigest() != entry["sha256"]:
        raise UserError(f"bundle file {rel} does not match its manifest SHA-256 (tampered or corrupted)",
                        path=where, fix="do not use this bundle; fetch it again")


def _check_sidecar(archive: Path) -> None:
    sidecar = archive.with_name(archive.name + ".sha256")
    if not sidecar.is_file():
        return
    with open(sidecar, "rb") as fh:
        recorded = fh.read(4096).decode("utf-8", errors="replace").split()
    if not recorded or recorded[0].lower() != sha256_file(archive):
        raise UserError(f"the archive does not match its SHA-256 in {sidecar.name} (tampered or corrupted)",
                        path=archive, fix="fetch the bundle again")


def verify_tree(folder: Path, shown: Path | str | None = None) -> dict[str, Any]:
    """Check an unpacked bundle against its manifest; the manifest. Refuses links, anything
    that is not a file or folder, files the manifest does not list, listed files that are missing
    or differ in size or SHA-256, and any manifest :func:`check_manifest` refuses. Errors name
    ``shown`` (default: the folder)."""
    folder = Path(folder)
    where = shown if shown is not None else folder
    manifest_path = folder / "manifest.json"
    try:
        st = os.lstat(manifest_path)
    except FileNotFoundError:
        raise UserError("the bundle has no manifest.json", path=where,
                        fix="give a folder deploykit unpack wrote, or the bundle archive") from None
    if not stat.S_ISREG(st.st_mode):
        raise bad_bundle("manifest.json is not a regular file", where)
    if st.st_size > limits.MAX_MANIFEST_BYTES:
        raise bad_bundle(f"manifest.json is over {limits.MAX_MANIFEST_BYTES} bytes", where)
    with open(manifest_path, "rb") as fh:
        manifest = parse_manifest(fh.read(limits.MAX_MANIFEST_BYTES + 1), where)
    listed = manifest["files"]
    present: set[str] = set()
    for root, dirnames, filenames in os.walk(folder):          # does not follow links
        for name in dirnames + filenames:
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                raise UserError(f"bundle file {rel} is a link", path=where, fix="do not use this bundle")
            if stat.S_ISREG(mode):
                present.add(rel)
            elif not stat.S_ISDIR(mode):
                raise UserError(f"bundle file {rel} is not a regular file or folder", path=where,
                                fix="do not use this bundle")
    present.discard("manifest.json")
    extra = sorted(present - set(listed))
    if extra:
        raise UserError(f"bundle file {extra[0]} is not in the manifest (added after packaging)", path=where,
                        fix="do not use this bundle; fetch it again")
    for rel, entry in sorted(listed.items()):
        _hash_file(folder, rel, entry, where)
    return manifest


def check_target(manifest: dict[str, Any], expected: str | None, where: Path):
    from deploykit.targets import parse_target

    raw = dict(manifest.get("target") or {})
    name = raw.pop("name", None)
    if not name:
        raise UserError("the manifest names no target", path=where, fix="use a bundle written by deploykit package")
    if expected is not None and expected != name:
        raise UserError(f"the bundle is for target '{name}', not '{expected}'", path=where,
                        fix=f"package the run for {expected}: deploykit package <run> --target {expected}")
    raw.pop("source", None)
    target = parse_target(name, raw, f"{where} (manifest)")
    if target.runtime.name == "tensorrt":
        version = _tensorrt_version()
        if version is not None and not target.runtime.accepts(version):
            raise UserError(f"the bundle is for {target.runtime.describe()} (target '{name}'); this machine has "
                            f"TensorRT {version}", path=where,
                            fix="package for a target whose TensorRT range holds this version")
    return target


def _tensorrt_version() -> str | None:
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return None
    from importlib import metadata

    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt_libs"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _prepare_parent(dest: Path, archive: Path) -> list[Path]:
    """Create the missing folders above ``dest``; the ones created (outermost first). A parent
    that is a file, or an existing ``dest`` that is a link, a file or a non-empty folder, is refused."""
    for parent in reversed(dest.parents):
        if parent.exists() and not parent.is_dir():
            raise UserError(f"cannot unpack {archive} here: {parent} is a file, not a folder", path=dest,
                            fix="choose an --out path whose folders are folders")
    if dest.is_symlink():
        raise UserError("the destination is a link", path=dest, fix="choose a new folder with --out")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UserError("the destination exists and is not empty", path=dest,
                        fix="choose a new folder with --out (unpack never overwrites)")
    created: list[Path] = []
    missing = [p for p in reversed(dest.parents) if not p.exists()]
    try:
        for parent in missing:
            parent.mkdir()
            created.append(parent)
    except OSError as exc:
        _remove_created(created)
        raise UserError(f"cannot create the folder to unpack {archive} into ({os.strerror(exc.errno or 0) or exc})",
                        path=dest, fix="choose an --out path you can write to") from None
    return created


def _remove_created(created: list[Path]) -> None:
    for parent in reversed(created):
        try:
            parent.rmdir()
        except OSError:
            pass


def unpack_bundle(archive: str | Path, dest: str | Path | None = None, *, target: str | None = None,
                  announce: bool = True) -> Path:
    """Unpack and check a bundle into ``dest`` (default ``./<bundle name>``); the folder.

    Members are checked from their headers first (names, types, duplicates, sizes against the
    ceilings and the manifest's declared sizes), the manifest and target before anything is
    written; files are then streamed into a private staging folder beside ``dest``, each bounded
    by its declared size and hashed as it is written, and the folder is renamed onto ``dest`` at
    the end. On any error the staging folder and the folders created for it are removed."""
    archive = Path(archive)
    tar = _open_archive(archive)
    with tar:
        top, members, dirs, manifest_bytes = _read_members(tar, archive)
        manifest = parse_manifest(manifest_bytes, archive)
        _check_listing(manifest["files"], members, archive)
        check_target(manifest, target, archive)
        dest = Path(dest) if dest is not None else Path.cwd() / top
        _extract_into(dest, tar, archive, members, dirs, manifest_bytes, manifest["files"])
    if announce:        # device-verify unpacks into a private folder whose name is no concern of the user's
        say(f"unpacked {archive} -> {dest} ({len(manifest['files'])} files + manifest.json, hashes checked, target "
            f"{manifest['target']['name']})")
    return dest


def _open_archive(archive: Path) -> tarfile.TarFile:
    """The bundle archive, open for reading, once its ``.sha256`` (if any) matches."""
    if archive.is_dir():
        raise UserError("this is a folder, not a bundle archive", path=archive,
                        fix="device-verify an unpacked folder directly; unpack takes the .tar.gz")
    if not archive.is_file():
        raise UserError("bundle not found", path=archive, fix="check the path")
    _check_sidecar(archive)
    try:
        return tarfile.open(archive, "r:*")
    except _DAMAGED as exc:
        raise UserError(f"not a readable bundle archive ({exc})", path=archive,
                        fix="use the .tar.gz written by deploykit package; fetch it again if it was cut short") from None


def _read_members(tar: tarfile.TarFile, archive: Path) -> tuple[str, dict[str, tarfile.TarInfo], set[str], bytes]:
    """(top folder, files, folders, the bytes of manifest.json): every header checked, the
    manifest read within its ceiling."""
    try:
        top, members, dirs = _scan_members(tar, archive)
        if "manifest.json" not in members:
            raise UserError("the archive holds no manifest.json", path=archive,
                            fix="use an archive written by deploykit package")
        if members["manifest.json"].size > limits.MAX_MANIFEST_BYTES:
            raise bad_bundle(f"manifest.json is over {limits.MAX_MANIFEST_BYTES} bytes", archive)
        manifest_bytes = tar.extractfile(members["manifest.json"]).read(limits.MAX_MANIFEST_BYTES + 1)
    except _DAMAGED as exc:
        raise UserError(f"the bundle archive is damaged ({exc})", path=archive, fix="fetch it again") from None
    return top, members, dirs, manifest_bytes


def _check_listing(listed: dict[str, Any], members: dict[str, tarfile.TarInfo], archive: Path) -> None:
    """The archive holds exactly the files the manifest lists, none larger than it declares."""
    extra = sorted(set(members) - set(listed) - {"manifest.json"})
    if extra:
        raise UserError(f"bundle file {extra[0]} is not in the manifest (added after packaging)", path=archive,
                        fix="do not use this bundle; fetch it again")
    missing = sorted(set(listed) - set(members))
    if missing:
        raise UserError(f"bundle file {missing[0]} is missing", path=archive, fix="fetch the bundle again")
    for rel, member in sorted(members.items()):
        declared = listed[rel]["bytes"] if rel != "manifest.json" else member.size
        if member.size > declared:
            raise bad_bundle(f"bundle file {rel} holds {member.size} bytes, more than the {declared} its manifest "
                             "declares", archive)


def _extract_into(dest: Path, tar: tarfile.TarFile, archive: Path, members: dict[str, tarfile.TarInfo],
                  dirs: set[str], manifest_bytes: bytes, listed: dict[str, Any]) -> None:
    """Stream the members into a staging folder beside ``dest`` and rename it onto ``dest``; on
    any error remove the staging folder and the folders created for it."""
    created = _prepare_parent(dest, archive)
    staging: Path | None = None
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".staging", dir=dest.parent))
        _write_staging(staging, tar, archive, members, dirs, manifest_bytes, listed)
        os.chmod(staging, 0o777 & ~current_umask())
        with critical_section():
            os.replace(staging, dest)         # onto a missing or empty folder
        staging = None
    except BaseException as exc:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        _remove_created(created)
        if isinstance(exc, UserError):
            raise
        if isinstance(exc, (tarfile.TarError, EOFError, zlib.error)):
            raise UserError(f"the bundle archive is damaged ({exc})", path=archive, fix="fetch it again") from None
        if isinstance(exc, OSError):
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise UserError(f"cannot unpack into {dest} ({reason}); nothing was written", path=archive,
                            fix="free disk space or choose another --out") from None
        raise


def _write_staging(staging: Path, tar: tarfile.TarFile, archive: Path, members: dict[str, tarfile.TarInfo],
                   dirs: set[str], manifest_bytes: bytes, listed: dict[str, Any]) -> None:
    """The folders, the manifest and every member (in archive order, each bounded by its declared
    size, the ceiling and what the total ceiling leaves, and hashed as written) into ``staging``."""
    for rel in sorted(dirs):
        (staging / rel).mkdir(parents=True, exist_ok=True)
    (staging / "manifest.json").write_bytes(manifest_bytes)
    budget = limits.MAX_TOTAL_BYTES
    for rel, member in sorted(members.items(), key=lambda item: item[1].offset):
        if rel == "manifest.json":
            continue
        entry = listed[rel]
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        size, digest = _write_member(tar.extractfile(member), staging / rel,
                                     min(entry["bytes"], limits.MAX_MEMBER_BYTES, budget), rel, archive)
        budget -= size
        if size != entry["bytes"]:
            raise UserError(f"bundle file {rel} is {size} bytes, not the {entry['bytes']} its manifest "
                            "declares (tampered or corrupted)", path=archive,
                            fix="do not use this bundle; fetch it again")
        if digest != entry["sha256"]:
            raise UserError(f"bundle file {rel} does not match its manifest SHA-256 (tampered or corrupted)",
                            path=archive, fix="do not use this bundle; fetch it again")
