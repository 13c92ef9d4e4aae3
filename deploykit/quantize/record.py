"""The calibration record (``<int8 model stem>.ranges.json``) and its tie to the models.

``deploykit calibrate`` writes the Q/DQ model and its record together (one atomic commit);
the record carries the SHA-256 of the FP32 model it was calibrated from and of the Q/DQ model
it describes. Readers go through :func:`read_ranges`, which refuses a record that belongs to
another model (a model recalibrated or replaced by hand next to old ranges), so smoothing
factors or TensorRT scales are never applied to a graph they were not computed for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deploykit.errors import UserError
from deploykit.io import read_json, sha256_file


def ranges_path_for(quantized: str | Path) -> Path:
    """Where ``deploykit calibrate`` puts the record of ``quantized``."""
    quantized = Path(quantized)
    return quantized.with_name(quantized.stem + ".ranges.json")


def read_ranges(path: str | Path, *, quantized: str | Path | None = None,
                fp32: str | Path | None = None) -> dict[str, Any]:
    """The record at ``path``, checked against the Q/DQ model and the FP32 model given (by the
    hashes the record holds; records written before the hashes existed are accepted as they are)."""
    path = Path(path)
    record = read_json(path, what="calibration ranges")
    if not isinstance(record, dict) or not isinstance(record.get("tensors", {}), dict):
        raise UserError("calibration ranges are not a deploykit ranges record (no 'tensors' mapping)", path=path,
                        fix="pass the .ranges.json written by deploykit calibrate")
    for key, model, what in (("quantized_model_sha256", quantized, "INT8 model"),
                             ("model_sha256", fp32, "FP32 model")):
        expected = record.get(key)
        if model is None or not expected or not Path(model).is_file():
            continue
        if sha256_file(model) != expected:
            raise UserError(f"these calibration ranges were written for another {what} than {model} "
                            "(its SHA-256 differs from the one recorded)", path=path,
                            fix="recalibrate (deploykit calibrate) so the model and its ranges match")
    return record
