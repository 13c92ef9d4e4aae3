"""Import-time compatibility for the libraries deploykit drives.

torchvision wheels on PyPI are CUDA builds. Next to a CPU build of torch (the build used
on CPU-only machines) torchvision's compiled extension cannot load, and its Python import
then fails at ``register_fake("torchvision::nms")`` because that op was never defined.
transformers (through ``image_utils``) and timm (through its norm layers) import
torchvision, so both would fail to import. deploykit uses neither the NMS op nor any other
compiled torchvision op; when the extension cannot load it defines the two op schemas that
torchvision's Python side registers fake kernels for, and nothing else. When the extension
loads (matching builds), nothing is changed.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_done = False
_TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # keeps the torch.library fragment alive


def torchvision_extension_loads() -> bool | None:
    """True/False whether torchvision's compiled ops load; None if torchvision is absent."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return None
    import torch

    libs = sorted(Path(spec.origin).parent.glob("_C.*"))
    if not libs:
        return False
    try:
        torch.ops.load_library(str(libs[0]))
    except (OSError, RuntimeError):
        return False
    return True


def ensure_model_libraries_importable() -> None:
    """Call before importing transformers or timm."""
    global _done, _library
    if _done or "torchvision" in sys.modules:
        _done = True
        return
    if torchvision_extension_loads() is False:
        import torch

        _library = torch.library.Library("torchvision", "FRAGMENT")
        for schema in _TORCHVISION_SCHEMAS:
            name = schema.split("(", 1)[0]
            if not hasattr(torch.ops.torchvision, name):
                _library.define(schema)
    _done = True


def offline_transformers() -> None:
    """transformers and the hub set up to read local files only, quietly (no network, no
    progress bars, errors only), with the model libraries importable."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    ensure_model_libraries_importable()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
