"""Reference quantizations to compare deploykit's static INT8 against.

``ort-dynamic``: ONNX Runtime's dynamic quantization of the MatMuls (per-channel int8 weights,
activations quantized per call from their runtime range). Accurate and fast on CPUs, but
not a TensorRT path: TensorRT has no runtime-range activation quantization.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import onnx

import deploykit
from deploykit.errors import UserError
from deploykit.io import atomic_path
from deploykit.onnx_utils import get_metadata, load_onnx, set_metadata

BASELINES = ("ort-dynamic",)
VARIANT = {"ort-dynamic": "int8-dynamic"}


def make_baseline(kind: str, model_path: Path, out_path: Path) -> Path:
    if kind not in BASELINES:
        raise UserError(f"unknown baseline '{kind}'", fix=f"use one of {', '.join(BASELINES)}")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source = load_onnx(model_path)
    meta = get_metadata(source)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="deploykit-") as tmp:
            raw = Path(tmp) / "dynamic.onnx"
            # A ModelProto, not the path: given a path, ORT writes "<model>-inferred.onnx" beside
            # the user's file (and deletes it after); given a model it works in its own temp folder.
            quantize_dynamic(source, str(raw), op_types_to_quantize=["MatMul"],
                             weight_type=QuantType.QInt8, per_channel=True)
            model = onnx.load(str(raw))
    finally:
        root.setLevel(level)
    set_metadata(model, {**meta, "variant": VARIANT[kind], "version": deploykit.__version__,
                         "baseline": kind})
    with atomic_path(out_path, inputs=(model_path,)) as tmp_path:
        onnx.save_model(model, str(tmp_path))
    return out_path
