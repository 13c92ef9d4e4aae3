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
    code = ("import sys, deploykit.package.limits as p\n"
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


# ----------------------------------------------------------------------------- 2. bombs, member types, duplicates
MIB = 2**20


def test_a_member_bigger_than_its_declared_size_is_refused_before_writing(place):
    """4 MiB of zeros (a few KiB compressed) where the manifest declares the small inputs file."""
    files = _valid_files()
    manifest = _manifest(files)
    files["verify/inputs.npz"] = bytes(4 * MIB)
    archive = _bundle_with(place, files, manifest)
    assert archive.stat().st_size < 64 * 1024
    declared = manifest["files"]["verify/inputs.npz"]["bytes"]
    unpack_refused(archive, place, "verify/inputs.npz", f"more than the {declared} its manifest declares")
    refused(run_cli("device-verify", archive.name, cwd=place[0], tmpdir=place[2]), place, "verify/inputs.npz",
            "more than the")


def test_the_ceilings_bound_an_honest_manifest(place):
    """A manifest that declares its zeros honestly: the per-file and the total ceilings (lowered
    here to 1 and 3 MiB) refuse it from the member headers, before anything is written."""
    files = {**_valid_files(), "data/a.bin": bytes(2 * MIB), "data/b.bin": bytes(2 * MIB)}
    archive = _bundle_with(place, files, _honest(files))
    unpack_refused(archive, place, "data/a.bin", f"over the {MIB} a bundle file may hold",
                   patch={"MAX_MEMBER_BYTES": MIB})
    unpack_refused(archive, place, "more than 3145728 bytes", patch={"MAX_TOTAL_BYTES": 3 * MIB})
    refused(run_cli("device-verify", archive.name, cwd=place[0], tmpdir=place[2],
                    patch={"MAX_TOTAL_BYTES": 3 * MIB}), place, "more than 3145728 bytes")


@pytest.mark.parametrize("size,fragment", [(10 * 2**30, "over the"), (2**40, "over the")])
def test_a_manifest_declaring_more_than_the_ceilings_is_refused(size, fragment, place):
    files = _valid_files()
    manifest = _honest(files, lambda m: m["files"]["README.md"].update(bytes=size))
    unpack_refused(_bundle_with(place, files, manifest), place, "README.md", fragment)


def test_too_many_members_are_refused(place):
    files = {**_valid_files(), **{f"data/{i}.txt": b"" for i in range(40)}}
    unpack_refused(_bundle_with(place, files, _honest(files)), place, "more than 20 entries",
                   patch={"MAX_MEMBERS": 20})


def test_extraction_stops_at_the_declared_size_and_removes_the_partial_file(tmp_path, monkeypatch):
    """The streaming bound itself (what holds whatever a header says): chunks are written until
    the next would pass the limit; then the partial file is removed and nothing more is read."""
    import deploykit.package.unpack as package
    from deploykit.errors import UserError

    monkeypatch.setattr(package, "_CHUNK", 1024)

    class Zeros(io.RawIOBase):
        served = 0

        def read(self, n=-1):
            Zeros.served += n
            return bytes(n)                  # an endless stream of zeros

    out = tmp_path / "member.bin"
    with pytest.raises(UserError, match="holds more than the 10000 bytes"):
        package._write_member(Zeros(), out, 10_000, "verify/inputs.npz", "b.tar.gz")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert Zeros.served == 10 * 1024                 # 9 chunks written, the 10th refused, no more read
    ok = tmp_path / "ok.bin"
    assert package._write_member(io.BytesIO(b"x" * 3000), ok, 3000, "r", "b")[0] == 3000 and ok.stat().st_size == 3000


def _member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes | None = b"x", link: str = ""):
    return _info(name, kind, link=link), (data if kind in (tarfile.REGTYPE,) else None)


@pytest.mark.parametrize("extra,fragment", [
    (_member(f"{TOP}/model/out", tarfile.SYMTYPE, link="../../sentinel/outside.onnx"), "is a link"),
    (_member(f"{TOP}/model/abs", tarfile.SYMTYPE, link="/etc/passwd"), "is a link"),
    (_member(f"{TOP}/model/hard", tarfile.LNKTYPE, link="/etc/passwd"), "is a link"),
    (_member(f"{TOP}/dev", tarfile.BLKTYPE), "device or FIFO"),
    (_member(f"{TOP}/fifo", tarfile.FIFOTYPE), "device or FIFO"),
    (_member(f"{TOP}/sparse", tarfile.GNUTYPE_SPARSE), "not a regular file or folder"),
    (_member(f"{TOP}/README.md", data=b"# other\n"), "appears twice"),
    (_member(f"{TOP}/readme.MD", data=b"# other\n"), "appears twice"),
    (_member(f"./{TOP}/README.md", data=b"# other\n"), "not a plain relative path"),
    (_member(f"{TOP}/README.md/inner", data=b"x"), "both a file and a folder"),
    (_member("other-top/README.md"), "exactly one bundle folder"),
    (_member(f"{TOP}/../sentinel/keep.txt", data=b"overwritten"), "climbs out of the bundle"),
    (_member(str(Path.cwd() / "evil.txt")), "absolute path"),
])
def test_unsafe_archive_members_are_refused(extra, fragment, place):
    unpack_refused(_bundle_with(place, members=[extra]), place, fragment)
    assert not (place[0].parent / "evil.txt").exists()


# ----------------------------------------------------------------------------- 3. broken manifests
def _set(path: str, value):
    def change(m):
        *keys, last = path.split("/")
        node = m
        for k in keys:
            node = node[k]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value
    return change


MANIFEST_CASES = [
    ("list", lambda m: m.clear(), "a list, not a JSON object"),
    ("files-as-list", _set("files", ["README.md", "model/model.onnx"]), "'files' is a list, not an object"),
    ("entry-as-string", _set("files/README.md", "0" * 64), "files['README.md'] is a string"),
    ("variants-as-list", _set("variants", ["model/model.onnx"]), "'variants' is a list"),
    ("variant-as-number", _set("variants/int8", 3), "variants['int8'] is a number"),
    ("variant-as-object", _set("variants/int8", {"path": "model/model.onnx"}), "variants['int8'] is an object"),
    ("no-files", _set("files", KeyError), "lacks 'files'"),
    ("no-variants", _set("variants", KeyError), "lacks 'variants'"),
    ("no-name", _set("name", KeyError), "lacks 'name'"),
    ("target-as-list", _set("target", ["edge-cpu-x86"]), "'target' is a list"),
    ("target-no-name", _set("target/name", KeyError), "target has no name"),
    ("inputs-names-string", _set("inputs/names", "x"), "inputs.names is not a list"),
    ("bad-sha", _set("files/README.md/sha256", "not-a-hash"), "has no SHA-256"),
    ("negative-size", _set("files/README.md/bytes", -1), "has no size"),
    ("bool-size", _set("files/README.md/bytes", True), "has no size"),
    ("string-size", _set("files/README.md/bytes", "7"), "has no size"),
    ("other-format", _set("format", "zip/1"), "not a deploykit-bundle/1 manifest"),
    ("no-thresholds", lambda m: m["files"].pop("verify/thresholds.json"), "does not list verify/thresholds.json"),
    ("primary-unknown", _set("primary", "int4"), "primary 'int4'"),
    ("profile-strings", _set("profile/batch", ["1", "8", "32"]), "profile['batch']"),
]


@pytest.mark.parametrize("case,change,fragment", MANIFEST_CASES, ids=[c[0] for c in MANIFEST_CASES])
def test_a_malformed_manifest_is_refused_naming_the_archive(case, change, fragment, place):
    files = _valid_files()
    if case == "list":
        manifest = ["README.md", "model/model.onnx"]
    else:
        manifest = _honest(files, change)
        if case == "no-thresholds":
            files.pop("verify/thresholds.json")
    unpack_refused(_bundle_with(place, files, manifest), place, fragment)
    _unpacked_folder(place, files, manifest)
    refused(run_cli("device-verify", "folder", cwd=place[0], tmpdir=place[2]), place, fragment, shown="folder")


@pytest.mark.parametrize("raw,fragment", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
    (b"[" * 200_000, "not valid JSON"),             # nesting deep enough to exhaust the parser
    (b"1" * 100_000, "not valid JSON"),             # an integer longer than Python converts
    (b"", "not valid JSON"),
])
def test_a_manifest_that_is_not_json_is_refused(raw, fragment, place):
    unpack_refused(_bundle_with(place, manifest=raw), place, "manifest.json", fragment)


def test_a_missing_manifest_is_refused(place):
    unpack_refused(_bundle_with(place, manifest=False), place, "no manifest.json")
    files = _valid_files()
    folder = _unpacked_folder(place, files, _manifest(files))
    (folder / "manifest.json").unlink()
    refused(run_cli("device-verify", "folder", cwd=place[0], tmpdir=place[2]), place, "no manifest.json",
            shown="folder")


def test_an_oversized_manifest_is_refused(place):
    unpack_refused(_bundle_with(place, manifest=b" " * 5000 + b"{}"), place, "manifest.json is over 4096 bytes",
                   patch={"MAX_MANIFEST_BYTES": 4096})


def _npy_claiming(shape: tuple[int, ...]) -> bytes:
    """A .npy whose header declares ``shape`` float32 but which holds 16 bytes."""
    from numpy.lib import format as npy

    buf = io.BytesIO()
    npy.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buf.getvalue() + bytes(16)


CONTENT_CASES = {
    "thresholds-list": ("verify/thresholds.json", b'["fp32.cosine_min >= 0.9"]', "verify/thresholds.json"),
    "thresholds-bad-rule": ("verify/thresholds.json", json.dumps({"task": "text-embedding",
                            "rules": {"fp32.cosine_min": "about 1"}}).encode(), "verify/thresholds.json"),
    "thresholds-not-json": ("verify/thresholds.json", b"{", "verify/thresholds.json"),
    "expected-no-reference": ("verify/expected.npz", _npz(other=np.zeros((8, 4), np.float32)), "'reference'"),
    "expected-not-zip": ("verify/expected.npz", b"PK\x03\x04 not a zip", "verify/expected.npz"),
    "expected-npy-bomb": ("verify/expected.npz", None, "declares more data than it holds"),
    "inputs-lack-x": ("verify/inputs.npz", _npz(y=np.zeros((8, 4), np.float32)), "lack input(s) ['x']"),
    "model-not-onnx": ("model/model.int8.onnx", b"\x08\x07garbage", "model/model.int8.onnx"),
    "expected-wrong-shape": ("verify/expected.npz", _npz(reference=np.zeros((8, 3), np.float32)), "shape"),
}


@pytest.mark.parametrize("case", sorted(CONTENT_CASES))
def test_hashed_but_malformed_content_is_refused_naming_the_archive(case, place):
    """The manifest rewritten to hash a broken file (only the outer .sha256 catches that): the
    file is refused in one line that names the archive and the file inside it, never the
    temporary folder device-verify unpacked into."""
    rel, data, fragment = CONTENT_CASES[case]
    if data is None:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("reference.npy", _npy_claiming((10**12, 4)))
        data = buf.getvalue()
    files = {**_valid_files(), rel: data}
    archive = _bundle_with(place, files, _honest(files))
    refused(run_cli("device-verify", archive.name, cwd=place[0], tmpdir=place[2]), place, fragment)


# ----------------------------------------------------------------------------- 5. destinations
def test_unpack_into_a_path_below_a_file_is_one_line(valid, place):
    work = place[0]
    archive = work / "b.tar.gz"
    archive.write_bytes(valid.read_bytes())
    (work / "afile").write_text("mine")
    for out in ("afile/dest", "afile/deeper/dest", "b.tar.gz/x"):
        proc = run_cli("unpack", archive.name, "--out", out, cwd=work, tmpdir=place[2])
        refused(proc, place, "is a file, not a folder", "b.tar.gz", shown=out)
    assert (work / "afile").read_text() == "mine"
    assert sorted(p.name for p in work.iterdir()) == ["afile", "b.tar.gz"]


def test_a_failed_unpack_leaves_the_empty_destination_as_it_was(place):
    """A late failure (a hash, found while writing): the folders created for the destination go,
    an empty destination that was there stays, nothing partial is left."""
    work = place[0]
    files = _valid_files()
    manifest = _manifest(files)
    files["verify/thresholds.json"] = files["verify/thresholds.json"].replace(b"0.99", b"0.10")
    archive = _bundle_with(place, files, manifest)
    (work / "empty").mkdir()
    proc = run_cli("unpack", archive.name, "--out", "empty", cwd=work, tmpdir=place[2])
    refused(proc, place, "does not match its manifest SHA-256")
    assert list((work / "empty").iterdir()) == []
    unpack_refused(archive, place, "does not match its manifest SHA-256")     # new/dest: neither is left
    assert sorted(p.name for p in work.iterdir()) == ["b.tar.gz", "empty"]


def test_unpack_never_writes_into_a_busy_or_linked_destination(valid, place):
    work, sentinel, tmpdir = place
    archive = work / "b.tar.gz"
    archive.write_bytes(valid.read_bytes())
    (work / "linked").symlink_to(sentinel)
    refused(run_cli("unpack", archive.name, "--out", "linked", cwd=work, tmpdir=tmpdir), place, "is a link",
            shown="linked")
    refused(run_cli("unpack", archive.name, "--out", str(sentinel), cwd=work, tmpdir=tmpdir), place, "not empty",
            shown=str(sentinel))
    deploykit("-q", "unpack", archive.name, "--out", "d", cwd=work, tmpdir=tmpdir)
    refused(run_cli("unpack", archive.name, "--out", "d", cwd=work, tmpdir=tmpdir), place, "not empty", shown="d")


@pytest.mark.parametrize("failure", ["disk-full", "interrupt"])
def test_a_write_failure_or_interrupt_mid_unpack_leaves_nothing(failure, valid, tmp_path, monkeypatch):
    import errno
    import signal

    from typer.testing import CliRunner

    import deploykit.package.unpack as package
    from deploykit.cli import app
    from deploykit.io import Interrupted

    real = package._copy_bounded
    calls = {"n": 0}

    def failing(src, fd, limit, rel, where):
        calls["n"] += 1
        if calls["n"] == 3:
            os.write(fd, b"partial")
            raise OSError(errno.ENOSPC, "No space left on device") if failure == "disk-full" else Interrupted(signal.SIGINT)
        return real(src, fd, limit, rel, where)

    monkeypatch.setattr(package, "_copy_bounded", failing)
    archive = tmp_path / "b.tar.gz"
    archive.write_bytes(valid.read_bytes())
    result = CliRunner().invoke(app, ["unpack", str(archive), "--out", str(tmp_path / "new" / "dest")])
    if failure == "disk-full":
        assert result.exit_code == 2, result.output
        assert f"deploykit: error: {archive}: cannot unpack into" in result.output and "No space left" in result.output
    else:
        assert result.exit_code == 130, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.tar.gz"]
