"""Data sources and the seeded calibration/evaluation split."""

from __future__ import annotations

import numpy as np
import pytest

from deploykit.calib.text import docstring_sentences, is_prose, sentences_from_docstring
from deploykit.data import DataSpec, iterate_batches, load_split, make_splits, save_split
from deploykit.errors import UserError


def test_docstring_corpus_is_large_real_prose_and_stable():
    sentences = docstring_sentences()
    assert len(sentences) >= 1256 + 500       # default split needs 256 + 1000 with room to spare
    assert len(set(sentences)) == len(sentences)
    assert all(is_prose(s) for s in sentences[:500])
    assert not any(">>>" in s or s.startswith(" ") for s in sentences)
    docstring_sentences.cache_clear()
    assert docstring_sentences() == sentences  # parsed again: same order, same text


def test_code_and_field_lists_are_not_prose():
    doc = ("Return the frobnicated value of the argument given here.\n\n"
           "    >>> frob(2)\n    4\n\n:param x: the value\n\nx == y and {a: b} are not sentences at all.")
    assert sentences_from_docstring(doc) == ["Return the frobnicated value of the argument given here."]


def test_split_is_disjoint_seeded_and_hashed(tiny_bundle):
    spec = DataSpec(source="docstrings", calibration=256, evaluation=1000, seed=0)
    a = make_splits(tiny_bundle, spec)
    assert a.calibration.count == 256 and a.evaluation.count == 1000
    assert not set(a.calibration.samples) & set(a.evaluation.samples)
    b = make_splits(tiny_bundle, spec)
    assert (a.calibration.sha256, a.evaluation.sha256) == (b.calibration.sha256, b.evaluation.sha256)
    c = make_splits(tiny_bundle, DataSpec(source="docstrings", calibration=256, evaluation=1000, seed=1))
    assert c.calibration.sha256 != a.calibration.sha256
    summary = a.summary()
    assert summary["calibration"]["sha256"] == a.calibration.sha256 and summary["seed"] == 0


def test_saved_split_roundtrips(tiny_bundle, tiny_splits, tmp_path):
    path = save_split(tiny_splits.evaluation, tmp_path)
    back = load_split(path, tiny_bundle.input_names)
    assert back.sha256 == tiny_splits.evaluation.sha256 and back.samples == tiny_splits.evaluation.samples
    for name in tiny_bundle.input_names:
        np.testing.assert_array_equal(back.feeds[name], tiny_splits.evaluation.feeds[name])


def test_user_text_file_empty_and_too_small(tiny_bundle, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(UserError, match="empty") as err:
        make_splits(tiny_bundle, DataSpec(source=str(empty), calibration=1, evaluation=1))
    assert str(empty) in str(err.value)
    small = tmp_path / "small.txt"
    small.write_text("One sentence here.\nAnother sentence there.\nA third one.\n")
    with pytest.raises(UserError, match="has 3 samples"):
        make_splits(tiny_bundle, DataSpec(source=str(small), calibration=2, evaluation=2))
    split = make_splits(tiny_bundle, DataSpec(source=str(small), calibration=1, evaluation=2))
    assert split.calibration.count == 1 and split.evaluation.count == 2


def test_wrong_data_kind_and_unknown_source(tiny_bundle):
    with pytest.raises(UserError, match="does not fit the text model"):
        make_splits(tiny_bundle, DataSpec(source="digits"))
    with pytest.raises(UserError, match="unknown data source"):
        make_splits(tiny_bundle, DataSpec(source="wikipedia"))


def test_digits_for_vision_models():
    from deploykit.models import load_model

    bundle = load_model("timm:vit_tiny_patch16_224", {"img_size": 16, "patch_size": 8, "num_classes": 10})
    splits = make_splits(bundle, DataSpec(source="digits", calibration=100, evaluation=300, seed=0))
    feeds = splits.evaluation.feeds["pixel_values"]
    assert feeds.shape == (300, 3, 16, 16) and feeds.dtype == np.float32
    assert splits.evaluation.labels.shape == (300,) and set(np.unique(splits.evaluation.labels)) <= set(range(10))


def test_batches_trim_only_all_padding_columns(tiny_splits):
    feeds = tiny_splits.evaluation.feeds
    seen = 0
    for batch in iterate_batches(feeds, 10):
        mask = batch["attention_mask"]
        assert mask[:, -1].any(), "the last kept column must hold a real token for some row"
        original = feeds["attention_mask"][seen: seen + len(mask)]
        assert original[:, mask.shape[1]:].sum() == 0, "a dropped column held a real token"
        seen += len(mask)
    assert seen == tiny_splits.evaluation.count
