"""Hostile and broken edge bundles: ``unpack`` and ``device-verify`` refuse each in one line (exit
code 2, naming the archive or folder the user gave, with a fix), read and run nothing outside the
bundle nor anything the manifest does not hash, write nothing outside the destination and leave
no temporary file.

The bundles are built here, in the package's layout, from a tiny ONNX model (y = x * w), not by
a run: every case rewrites one thing of a valid bundle. Ceilings are lowered per case (a patched
module constant in the CLI's process), so no case writes more than a few MiB.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from contract import assert_no_temp_files, assert_user_error, deploykit, tree_hashes  # noqa: E402

TOP = "tiny-edge-cpu-x86"
TEMP_NAMES = ("deploykit-bundle-", ".staging", ".tmp")
ORT_SESSION_FILE = ".ses"     # onnxruntime (1.2x+) keeps this in TMPDIR on import: not deploykit's


def no_temp_files(*roots: Path, tmpdir: Path) -> None:
    """``assert_no_temp_files``, with onnxruntime's own file in TMPDIR set aside."""
    ses = tmpdir / ORT_SESSION_FILE
    if ses.is_file():
        ses.unlink()
    assert_no_temp_files(*roots, tmpdir=tmpdir)


# ----------------------------------------------------------------------------- building bundles
def _model(external: str | None = None) -> bytes:
    """y = x * w, x float32 [batch, 4]; with ``external``, w's data lives in that file."""
    import onnx
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [4], [1.0, 1.0, 1.0, 1.0])
    if external is not None:
        w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4])
        w.data_location = TensorProto.EXTERNAL
        for key, value in (("location", external), ("offset", "0"), ("length", "16")):
            w.external_data.add(key=key, value=value)
    graph = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["y"])], "tiny",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model.SerializeToString()


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _valid_files() -> dict[str, bytes]:
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    model = _model()
    return {
        "README.md": b"# tiny\n",
        "model/model.int8.onnx": model,
        "model/model.onnx": model,
        "verify/inputs.npz": _npz(x=x),
        "verify/expected.npz": _npz(reference=x, int8=x, fp32=x),
        "verify/thresholds.json": json.dumps({"task": "text-embedding", "primary": "int8",
                                              "rules": {"fp32.cosine_min": ">= 0.9999",
                                                        "int8.cosine_mean": ">= 0.99"}}).encode(),
    }


def _manifest(files: dict[str, bytes]) -> dict:
    from deploykit.package import FORMAT
    from deploykit.targets import get_target

    return {"format": FORMAT, "name": TOP, "target": get_target("edge-cpu-x86").to_dict(),
            "variants": {"int8": "model/model.int8.onnx", "fp32": "model/model.onnx"}, "primary": "int8",
            "task": "text-embedding", "inputs": {"names": ["x"], "samples": 8, "sha256": "0" * 64},
            "profile": {"batch": [1, 8, 32], "sequence": [1, 4, 4]},
            "files": {rel: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                      for rel, data in sorted(files.items())}}


def _info(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname, info.mode = kind, size, link, 0o644 if kind != tarfile.DIRTYPE else 0o755
    return info


def write_bundle(path: Path, files: dict[str, bytes] | None = None, manifest=None, *,
                 members: list[tuple[tarfile.TarInfo, bytes | None]] = (), top: str = TOP) -> Path:
    """A bundle archive: ``files`` (default: the valid ones) under ``top/``, ``manifest`` (a dict,
    raw bytes, or None for the files' own; ``False`` for none), then the extra ``members``."""
    files = _valid_files() if files is None else files
    if manifest is None:
        manifest = _manifest(files)
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        tar.addfile(_info(top, tarfile.DIRTYPE))
        content = dict(files)
        if manifest is not False:
            content["manifest.json"] = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
        for rel, data in sorted(content.items()):
            tar.addfile(_info(f"{top}/{rel}", size=len(data)), io.BytesIO(data))
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> Path:
    return write_bundle(tmp_path_factory.mktemp("valid") / "b.tar.gz")


@pytest.fixture
def place(tmp_path):
    """(work folder, sentinel folder beside it with its hashes, private TMPDIR)."""
    work, sentinel, tmpdir = tmp_path / "work", tmp_path / "sentinel", tmp_path / "tmp"
    work.mkdir()
    sentinel.mkdir()
    (sentinel / "keep.txt").write_text("mine")
    (sentinel / "outside.onnx").write_bytes(_model())
    return work, sentinel, tmpdir


def run_cli(*args, cwd: Path, tmpdir: Path, patch: dict[str, int] | None = None) -> subprocess.CompletedProcess:
    """The CLI in a subprocess; ``patch`` lowers ``deploykit.package`` ceilings in that process."""
    if not patch:
        return deploykit(*args, cwd=cwd, check_rc=None, tmpdir=tmpdir, timeout=120)
    code = ("import sys, deploykit.package as p\n"
            + "".join(f"p.{k} = {int(v)}\n" for k, v in patch.items())
            + f"sys.argv = ['deploykit', *{list(args)!r}]\nfrom deploykit.cli import main\nmain()\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200", TMPDIR=str(tmpdir))
    tmpdir.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=120)


def refused(proc, place, *fragments: str, shown: str = "b.tar.gz") -> str:
    """The contract for every refusal here; the error line."""
    work, sentinel, tmpdir = place
    assert_user_error(proc, shown, *fragments)
    line = next(x for x in proc.stderr.splitlines() if x.startswith("deploykit: error:"))
    assert line.startswith(f"deploykit: error: {shown}: "), line        # the path the user gave
    assert not any(mark in line for mark in TEMP_NAMES), line            # never an internal name
    assert tree_hashes(sentinel) == SENTINEL_HASHES
    no_temp_files(work, sentinel, tmpdir=tmpdir)
    return line


SENTINEL_HASHES = {"keep.txt": hashlib.sha256(b"mine").hexdigest(),
                   "outside.onnx": hashlib.sha256(_model()).hexdigest()}


def unpack_refused(archive: Path, place, *fragments: str, patch=None) -> str:
    """``unpack`` refuses and leaves the work folder as it was (only the archive)."""
    work = place[0]
    before = sorted(p.name for p in work.iterdir())
    proc = run_cli("unpack", archive.name, "--out", "new/dest", cwd=work, tmpdir=place[2], patch=patch)
    line = refused(proc, place, *fragments)
    assert sorted(p.name for p in work.iterdir()) == before            # no dest, no parent, no staging
    return line


# ----------------------------------------------------------------------------- the valid bundle
def test_the_valid_bundle_unpacks_and_device_verifies(valid, place):
    work, sentinel, tmpdir = place
    archive = work / "b.tar.gz"
    archive.write_bytes(valid.read_bytes())
    proc = deploykit("-q", "unpack", archive.name, "--out", "deep/er/dest", cwd=work, tmpdir=tmpdir)
    dest = work / "deep/er/dest"
    assert proc.stdout.strip() == "deep/er/dest"
    assert sorted(tree_hashes(dest)) == sorted([*_valid_files(), "manifest.json"])
    assert stat.S_IMODE(dest.stat().st_mode) == 0o777 & ~_umask()          # not the staging folder's 0700
    no_temp_files(work, tmpdir=tmpdir)
    for bundle in ("deep/er/dest", "b.tar.gz"):
        proc = deploykit("device-verify", bundle, "--iterations", "1", cwd=work, tmpdir=tmpdir)
        assert "PASS" in proc.stdout
    no_temp_files(work, tmpdir=tmpdir)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _bundle_with(place, files=None, manifest=None, **kw) -> Path:
    return write_bundle(place[0] / "b.tar.gz", files, manifest, **kw)


def _honest(files: dict[str, bytes], change=None) -> dict:
    """The files' own manifest (hashes and sizes right), changed by ``change(manifest)``."""
    manifest = _manifest(files)
    if change is not None:
        change(manifest)
    return manifest


def _unpacked_folder(place, files: dict[str, bytes], manifest: dict) -> Path:
    """A folder as unpack writes it, with files and manifest as given (no unpack checks)."""
    folder = place[0] / "folder"
    for rel, data in {**files, "manifest.json": json.dumps(manifest).encode()}.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder


# ----------------------------------------------------------------------------- 1. paths outside the bundle
OUTSIDE_CASES = {
    "absolute-variant": lambda sentinel: {"variants": {"int8": str(sentinel / "outside.onnx"),
                                                       "fp32": "model/model.onnx"}},
    "dotdot-variant": lambda sentinel: {"variants": {"int8": "../sentinel/outside.onnx", "fp32": "model/model.onnx"}},
    "unlisted-variant": lambda sentinel: {"variants": {"int8": "model/other.onnx", "fp32": "model/model.onnx"}},
    "non-onnx-variant": lambda sentinel: {"variants": {"int8": "README.md", "fp32": "model/model.onnx"}},
}


@pytest.mark.parametrize("case", sorted(OUTSIDE_CASES))
def test_a_variant_outside_the_bundle_or_unhashed_is_never_run(case, place):
    """The manifest names a model outside the bundle, or one it does not hash: unpack and
    device-verify (archive and folder) refuse before any model is opened. The outside model
    is a FIFO in these runs: opening it would block (the run would time out)."""
    work, sentinel, tmpdir = place
    fifo = sentinel / "outside.onnx"
    fifo.unlink()
    os.mkfifo(fifo)
    global SENTINEL_HASHES
    saved, SENTINEL_HASHES = SENTINEL_HASHES, {"keep.txt": SENTINEL_HASHES["keep.txt"]}
    try:
        files = _valid_files()
        archive = _bundle_with(place, files, _honest(files, lambda m: m.update(OUTSIDE_CASES[case](sentinel))))
        line = unpack_refused(archive, place, "variants['int8']")
        assert "unsafe path" in line or "not an ONNX file the manifest lists" in line
        refused(run_cli("device-verify", archive.name, cwd=work, tmpdir=tmpdir), place, "variants['int8']")
        folder = _unpacked_folder(place, files, _honest(files, lambda m: m.update(OUTSIDE_CASES[case](sentinel))))
        refused(run_cli("device-verify", "folder", cwd=work, tmpdir=tmpdir), place, "variants['int8']",
                shown="folder")
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and tree_hashes(folder)
    finally:
        SENTINEL_HASHES = saved


@pytest.mark.parametrize("rel,fragment", [
    ("/etc/evil.onnx", "absolute path"),
    ("../evil.onnx", "climbs out of the bundle"),
    ("model/../../evil.onnx", "climbs out of the bundle"),
    ("model//x.onnx", "not a plain relative path"),
    ("model\\..\\x.onnx", "backslash"),
    ("manifest.json", "the manifest itself"),
])
def test_a_files_entry_outside_the_bundle_is_refused(rel, fragment, place):
    files = _valid_files()
    manifest = _honest(files, lambda m: m["files"].update({rel: {"sha256": "0" * 64, "bytes": 1}}))
    unpack_refused(_bundle_with(place, files, manifest), place, "unsafe path", fragment)
    _unpacked_folder(place, files, manifest)
    refused(run_cli("device-verify", "folder", cwd=place[0], tmpdir=place[2]), place, "unsafe path",
            shown="folder")


@pytest.mark.parametrize("what", ["file", "folder"])
def test_a_symlink_out_of_an_unpacked_folder_is_refused(what, place):
    """A folder whose model (or model folder) is a link to a file outside, with the manifest's
    hash even matching the outside file: refused as a link, the outside file never run."""
    work, sentinel, tmpdir = place
    files = _valid_files()
    folder = _unpacked_folder(place, files, _honest(files))
    if what == "file":
        (folder / "model/model.int8.onnx").unlink()
        (folder / "model/model.int8.onnx").symlink_to(sentinel / "outside.onnx")
        fragment = "model/model.int8.onnx is a link"
    else:
        outside = sentinel / "models"
        outside.mkdir()
        for rel in ("model.onnx", "model.int8.onnx"):
            (outside / rel).write_bytes(files[f"model/{rel}"])
        (folder / "model/model.onnx").unlink()
        (folder / "model/model.int8.onnx").unlink()
        (folder / "model").rmdir()
        (folder / "model").symlink_to(outside)
        SENTINEL_HASHES.update(tree_hashes(sentinel))
        fragment = "model is a link"
    try:
        refused(run_cli("device-verify", "folder", cwd=work, tmpdir=tmpdir), place, fragment, shown="folder")
    finally:
        for rel in ("models/model.onnx", "models/model.int8.onnx"):
            SENTINEL_HASHES.pop(rel, None)


@pytest.mark.parametrize("location", ["../../sentinel/weights.bin", "/etc/passwd", "model/unlisted.bin"])
def test_external_weights_outside_the_bundle_are_never_read(location, place):
    """A hash-checked model whose weights live in an external file outside the bundle (or in
    one the manifest does not list): device-verify refuses before ONNX Runtime reads it."""
    work, sentinel, tmpdir = place
    files = _valid_files()
    files["model/model.int8.onnx"] = _model(external=location)
    archive = _bundle_with(place, files, _honest(files))
    line = refused(run_cli("device-verify", archive.name, cwd=work, tmpdir=tmpdir), place,
                   "model/model.int8.onnx reads its weights from", location)
    assert "manifest does not list" in line or "climbs out" in line or "absolute" in line


@pytest.mark.parametrize("rel", ["model/model.int8.onnx", "verify/expected.npz", "README.md"])
def test_a_hash_mismatch_is_refused_whatever_the_file(rel, place):
    files = _valid_files()
    manifest = _manifest(files)
    files[rel] = files[rel][:-1] + bytes([files[rel][-1] ^ 1])     # same size, other content
    archive = _bundle_with(place, files, manifest)
    unpack_refused(archive, place, rel, "does not match its manifest SHA-256")
    refused(run_cli("device-verify", archive.name, cwd=place[0], tmpdir=place[2]), place, rel,
            "does not match its manifest SHA-256")
    _unpacked_folder(place, files, manifest)
    refused(run_cli("device-verify", "folder", cwd=place[0], tmpdir=place[2]), place, rel,
            "does not match its manifest SHA-256", shown="folder")


def test_a_file_the_manifest_does_not_list_is_refused_in_a_folder(place):
    files = _valid_files()
    folder = _unpacked_folder(place, files, _manifest(files))
    (folder / "model/extra.onnx").write_bytes(_model())
    refused(run_cli("device-verify", "folder", cwd=place[0], tmpdir=place[2]), place, "model/extra.onnx",
            "not in the manifest", shown="folder")
