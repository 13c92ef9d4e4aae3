"""What every model source hands to the rest of the pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from deploykit.errors import UserError


@dataclass
class TextPreprocessor:
    """Tokenises text to fixed-length int64 feeds (padding to ``max_length``).

    Feeds are padded to ``max_length`` when stored; batches are trimmed to their longest
    row before inference (see :func:`deploykit.data.iterate_batches`), which leaves
    every output unchanged because padded positions are masked.
    """

    tokenizer: Any
    max_length: int
    input_names: list[str]
    kind: str = "text"

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             max_length=self.max_length, return_tensors="np")
        return {name: np.asarray(enc[name], dtype=np.int64) for name in self.input_names}

    def save(self, folder) -> None:
        self.tokenizer.save_pretrained(str(folder))


@dataclass
class ImagePreprocessor:
    """Resizes grey images in [0, 1] to the model's input and normalises them."""

    img_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_names: list[str] = field(default_factory=lambda: ["pixel_values"])
    kind: str = "image"

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.asarray(images, dtype=np.float32))
        if x.ndim == 3:
            x = x[:, None]
        x = torch.nn.functional.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear",
                                            align_corners=False)
        x = x.expand(-1, self.in_chans, -1, -1)
        mean = torch.tensor(self.mean[: self.in_chans]).view(1, -1, 1, 1)
        std = torch.tensor(self.std[: self.in_chans]).view(1, -1, 1, 1)
        return {self.input_names[0]: ((x - mean) / std).contiguous().numpy()}


@dataclass
class ModelBundle:
    """A torch module ready for export plus how to feed it.

    ``module`` takes its inputs positionally in ``input_names`` order and returns one tensor
    named ``output_name``. ``dynamic_axes`` names the symbolic dimensions per input.
    """

    source: str
    name: str
    task: str                      # "text-embedding" | "image-classification" | "text-generation"
    module: torch.nn.Module
    input_names: list[str]
    output_name: str
    dynamic_axes: dict[str, dict[int, str]]
    preprocessor: TextPreprocessor | ImagePreprocessor
    dim_max: dict[str, int] = field(default_factory=dict)   # upper bounds of symbolic dims
    info: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)   # what load_model was given (recorded at export)

    def example_feeds(self, batch: int = 2, seq: int = 16) -> dict[str, np.ndarray]:
        """Small synthetic feeds of the right names, dtypes and ranks (for tracing)."""
        rng = np.random.default_rng(0)
        if self.task in ("text-embedding", "text-generation"):
            vocab = int(self.info.get("vocab_size", 1000))
            ids = rng.integers(1000 if vocab > 2000 else 1, vocab, size=(batch, seq), dtype=np.int64)
            mask = np.ones((batch, seq), dtype=np.int64)
            mask[0, seq // 2:] = 0     # one padded row so masking is traced
            feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            return {k: feeds[k] for k in self.input_names}
        pre = self.preprocessor
        return {self.input_names[0]: rng.standard_normal((batch, pre.in_chans, pre.img_size, pre.img_size),
                                                         dtype=np.float32)}

    @torch.inference_mode()
    def run_torch(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self.input_names]
        return self.module(*args).float().numpy()


def check_options(options: dict[str, Any], allowed: set[str], kind: str) -> None:
    """Refuse model options a loader does not take, naming the ones it does."""
    unknown = set(options) - allowed
    if unknown:
        raise UserError(f"unknown model option(s) {sorted(unknown)} for {kind}", fix=f"use only {sorted(allowed)}")


def installed_files(package: str, suffix: str, *, fix: str | None = None) -> list:
    """The files (``importlib.metadata`` entries) of the installed distribution ``package``
    whose names end with ``suffix``; a missing package is one line naming ``fix``."""
    import importlib.metadata as metadata

    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        raise UserError(f"the model package {package} is not installed", fix=fix or f"pip install {package}") from None
    return [f for f in dist.files or [] if str(f).endswith(suffix)]
