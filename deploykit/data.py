"""Calibration and evaluation data: seeded, disjoint splits, hashed, saved as model feeds.

A data source yields raw samples (sentences, images) or ready feeds; the model's
preprocessor turns samples into feeds. The split is a seeded permutation of the source, so
calibration and evaluation sets are disjoint by construction and identical for the same
source and seed; the SHA-256 of each set's raw samples goes into the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np

from deploykit.errors import UserError
from deploykit.io import read_json, read_npz, sha256_arrays, sha256_text, write_json, write_npz

if TYPE_CHECKING:                       # device-side code reads saved feeds without loading torch
    from deploykit.models.base import ModelBundle

SOURCES = ("docstrings", "digits")


@dataclass
class DataSpec:
    source: str = "docstrings"      # docstrings | digits | <file>.txt | <file>.npz
    calibration: int = 256
    evaluation: int = 1000
    seed: int = 0
    tuning: int = 0                 # > 0: a third disjoint split for accuracy-driven tuning
    training: int = 0               # > 0: a fourth disjoint split to train on (-1: every sample left)


@dataclass
class Split:
    name: str
    feeds: dict[str, np.ndarray]
    sha256: str
    samples: list[str] | None = None        # texts, when the source is text
    labels: np.ndarray | None = None        # class labels, when the source has them

    @property
    def count(self) -> int:
        return int(next(iter(self.feeds.values())).shape[0])

    def summary(self) -> dict[str, Any]:
        return {"count": self.count, "sha256": self.sha256}


@dataclass
class DataSplits:
    spec: DataSpec
    calibration: Split
    evaluation: Split
    total_available: int
    info: dict[str, Any] = field(default_factory=dict)
    tuning: Split | None = None
    training: Split | None = None

    def summary(self) -> dict[str, Any]:
        out = {"source": self.spec.source, "seed": self.spec.seed, "available": self.total_available,
               "calibration": self.calibration.summary(), "evaluation": self.evaluation.summary(), **self.info}
        for name in ("tuning", "training"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name).summary()
        return out

    def parts(self) -> list[tuple[str, Split]]:
        named = [("calibration", self.calibration), ("evaluation", self.evaluation)]
        return named + [(name, getattr(self, name)) for name in ("tuning", "training")
                        if getattr(self, name) is not None]


def _split_indices(n: int, spec: DataSpec, where: str) -> list[np.ndarray | None]:
    """Calibration, evaluation, tuning and training indices: consecutive slices of one seeded
    permutation, so the earlier splits do not depend on whether a later one is asked for.
    Splits of size 0 are None; ``training: -1`` takes every sample the others leave."""
    if spec.calibration < 1 or spec.evaluation < 1 or spec.tuning < 0 or spec.training < -1:
        raise UserError("calibration and evaluation sizes must be at least 1", path=where,
                        fix="set data.calibration and data.evaluation to positive numbers")
    if n == 0:
        raise UserError("the data set is empty", path=where, fix="supply a data source with samples")
    sizes = [spec.calibration, spec.evaluation, spec.tuning, max(spec.training, 0)]
    if spec.training == -1:
        sizes[3] = max(n - sum(sizes[:3]), 0)
    need = sum(sizes)
    if n < need or (spec.training == -1 and sizes[3] == 0):
        parts = " + ".join(f"{k} {name}" for k, name in zip(sizes, _SPLIT_NAMES) if k)
        raise UserError(f"the data source has {n} samples but {need} are needed ({parts})"
                        + (" and none are left to train on" if spec.training == -1 else ""), path=where,
                        fix="lower data.calibration / data.evaluation / data.training / quantize.tune.samples "
                            "or supply more samples")
    order = np.random.default_rng(spec.seed).permutation(n)
    bounds = np.cumsum([0] + sizes)
    return [np.sort(order[a:b]) if b > a else None for a, b in zip(bounds[:-1], bounds[1:])]


_SPLIT_NAMES = ("calibration", "evaluation", "tuning", "training")


def _check_feeds(feeds: dict[str, np.ndarray], bundle: ModelBundle, where: str | Path) -> dict[str, np.ndarray]:
    """Names, dtypes, ranks, fixed sizes and finiteness of saved feeds against the model's
    inputs (a wrong file must fail here in one line, not deep inside torch or ORT). Returns the
    feeds, a dtype cast where no value changes (int32 ids -> int64)."""
    from deploykit.feeds import castable

    feeds = dict(feeds)
    missing = [n for n in bundle.input_names if n not in feeds]
    if missing:
        raise UserError(f"the feeds lack input(s) {missing}; they have {sorted(feeds)}", path=where,
                        fix=f"save arrays named {bundle.input_names}")
    expected = bundle.example_feeds(batch=2, seq=16)
    sizes = {int(feeds[n].shape[0]) for n in bundle.input_names if feeds[n].ndim}
    for name in bundle.input_names:
        got, want = feeds[name], expected[name]
        dynamic = set(bundle.dynamic_axes.get(name, {}))
        fixed = [(axis, size) for axis, size in enumerate(want.shape) if axis not in dynamic and axis > 0]
        if got.dtype != want.dtype:
            if not castable(got, want.dtype):
                raise UserError(f"input '{name}' is {got.dtype}, the model takes {want.dtype}", path=where,
                                fix=f"save '{name}' as {want.dtype}")
            feeds[name] = got = got.astype(want.dtype)
        if got.ndim != want.ndim or any(got.shape[axis] != size for axis, size in fixed):
            shape = ["N" if a == 0 or a in dynamic else s for a, s in enumerate(want.shape)]
            raise UserError(f"input '{name}' has shape {tuple(got.shape)}, the model takes "
                            f"({', '.join(map(str, shape))})", path=where,
                            fix="save feeds prepared for this model (e.g. a run's data/evaluation.npz)")
        if got.dtype.kind == "f" and not np.isfinite(got).all():
            raise UserError(f"input '{name}' holds NaN or inf values", path=where,
                            fix="save finite inputs (NaN/inf would poison calibration ranges and metrics)")
    if len(sizes) > 1 or 0 in sizes:
        raise UserError(f"the feeds hold {sorted(sizes)} samples per input", path=where,
                        fix="save the same, non-zero number of samples for every input")
    return feeds


def make_splits(bundle: ModelBundle, spec: DataSpec) -> DataSplits:
    source = spec.source
    if source == "docstrings" or (source.endswith(".txt") and Path(source).is_file()):
        if bundle.preprocessor.kind != "text":
            raise UserError(f"text data '{source}' does not fit the image model {bundle.name}",
                            fix="use data.source: digits (or an .npz of image feeds)")
        if source == "docstrings":
            from deploykit.calib.text import docstring_sentences

            texts = list(docstring_sentences())
        else:
            from deploykit.calib.text import read_text_file

            texts = read_text_file(source)
        splits = []
        for name, idx in zip(_SPLIT_NAMES, _split_indices(len(texts), spec, source)):
            if idx is None:
                splits.append(None)
                continue
            samples = [texts[i] for i in idx]
            splits.append(Split(name, bundle.preprocessor(samples), sha256_text(samples), samples=samples))
        info = {"max_length": bundle.preprocessor.max_length}
        return DataSplits(spec, splits[0], splits[1], len(texts), info, *splits[2:])
    if source == "digits":
        if bundle.preprocessor.kind != "image":
            raise UserError(f"image data 'digits' does not fit the text model {bundle.name}",
                            fix="use data.source: docstrings (or a .txt file, one sample per line)")
        from deploykit.calib.images import digits

        images, labels = digits()
        splits = []
        for name, idx in zip(_SPLIT_NAMES, _split_indices(len(images), spec, source)):
            if idx is None:
                splits.append(None)
                continue
            raw = {"images": images[idx], "labels": labels[idx]}
            splits.append(Split(name, bundle.preprocessor(images[idx]), sha256_arrays(raw), labels=labels[idx]))
        return DataSplits(spec, splits[0], splits[1], len(images), {"img_size": bundle.preprocessor.img_size},
                          *splits[2:])
    if source.endswith(".npz"):
        arrays = read_npz(source, what="feeds file")
        labels = arrays.pop("labels", None)
        arrays = _check_feeds(arrays, bundle, source)
        arrays = {n: arrays[n] for n in bundle.input_names}
        n = int(next(iter(arrays.values())).shape[0])
        splits = []
        for name, idx in zip(_SPLIT_NAMES, _split_indices(n, spec, source)):
            if idx is None:
                splits.append(None)
                continue
            feeds = {k: v[idx] for k, v in arrays.items()}
            splits.append(Split(name, feeds, sha256_arrays(feeds),
                                labels=None if labels is None else labels[idx]))
        return DataSplits(spec, splits[0], splits[1], n, {}, *splits[2:])
    if source.endswith((".txt", ".npz")):
        raise UserError("data file not found", path=source, fix="check data.source")
    raise UserError(f"unknown data source '{source}'",
                    fix="use docstrings, digits, a .txt file (one sample per line) or an .npz of feeds")


def split_arrays(split: Split) -> dict[str, np.ndarray]:
    """What ``<name>.npz`` holds: the feeds, and the labels when there are any."""
    return {**split.feeds, **({"labels": split.labels} if split.labels is not None else {})}


def split_record(split: Split) -> dict[str, Any]:
    """``<name>.json`` next to the arrays: the samples' hash, the arrays' hash (checked by
    :func:`load_split`), the count and the raw texts."""
    return {"name": split.name, "sha256": split.sha256, "feeds_sha256": sha256_arrays(split_arrays(split)),
            "count": split.count, "samples": split.samples}


def save_split(split: Split, folder: str | Path) -> Path:
    """Feeds (+labels) as ``<name>.npz`` and the raw texts as ``<name>.json``."""
    folder = Path(folder)
    path = write_npz(folder / f"{split.name}.npz", split_arrays(split))
    write_json(folder / f"{split.name}.json", split_record(split))
    return path


def load_split(path: str | Path, input_names: list[str], bundle: ModelBundle | None = None) -> Split:
    """Read a split saved by :func:`save_split` (or any .npz holding the model's feeds)."""
    path = Path(path)
    arrays = read_npz(path, what="feeds file")
    labels = arrays.pop("labels", None)
    missing = [n for n in input_names if n not in arrays]
    if missing:
        raise UserError(f"the feeds lack input(s) {missing}; they have {sorted(arrays)}", path=path,
                        fix=f"save arrays named {input_names}")
    feeds = {n: arrays[n] for n in input_names}
    if bundle is not None:
        feeds = _check_feeds(feeds, bundle, path)
    meta_path = path.with_suffix(".json")
    meta = read_json(meta_path) if meta_path.is_file() else {}
    recorded = meta.get("feeds_sha256")
    if recorded:
        actual = sha256_arrays({**arrays, **({"labels": labels} if labels is not None else {})})
        if actual != recorded:
            raise UserError(f"the feeds do not match the SHA-256 recorded in {meta_path.name} (changed after they "
                            "were saved)", path=path, fix="use the saved inputs unchanged, or save them again")
    return Split(meta.get("name", path.stem), feeds, meta.get("sha256") or sha256_arrays(feeds),
                 samples=meta.get("samples"), labels=labels)


def iterate_batches(feeds: dict[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Consecutive batches; text batches are trimmed to their longest unpadded row.

    Trimming only drops columns where every row is padding (attention_mask == 0), so outputs
    are unchanged and short sentences do not pay for 128 positions.
    """
    n = int(next(iter(feeds.values())).shape[0])
    for start in range(0, n, batch_size):
        batch = {k: v[start: start + batch_size] for k, v in feeds.items()}
        mask = batch.get("attention_mask")
        if mask is not None and mask.ndim == 2:
            used = np.flatnonzero(mask.any(axis=0))
            length = int(used[-1]) + 1 if used.size else 1
            batch = {k: (v[:, :length] if v.ndim == 2 and v.shape[1] == mask.shape[1] else v)
                     for k, v in batch.items()}
        yield {k: np.ascontiguousarray(v) for k, v in batch.items()}


def map_batches(infer, batches: Iterable[dict[str, np.ndarray]], batch_size: int, reduce=None) -> np.ndarray:
    """``infer(feeds)`` on each batch (``batch_size`` rows each but the last), concatenated;
    ``reduce(feeds, output, start)`` (a causal LM's per-position record,
    :func:`deploykit.metrics.output_reducer`) shrinks each output before the next batch runs."""
    outs = []
    for i, feeds in enumerate(batches):
        out = infer(feeds)
        outs.append(out if reduce is None else reduce(feeds, out, i * batch_size))
    return np.concatenate(outs, axis=0)
