"""Export: dynamic batch/sequence, checker-clean, parity with torch."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from deploykit.data import iterate_batches
from deploykit.errors import UserError
from deploykit.export import export_onnx
from deploykit.onnx_utils import get_metadata
from deploykit.runners import OrtRunner

# FP32 ONNX Runtime vs eager torch differ only by kernel summation order: on these
# L2-normalised embeddings that is ~1e-7; 1e-5 leaves margin for other CPUs' kernels while
# any real export bug (wrong mask, swapped inputs) shows up at 1e-2 or more.
PARITY_ATOL = 1e-5


def _dims(model, name):
    value = next(v for v in model.graph.input if v.name == name)
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_tiny_bert_export_is_dynamic_checked_and_matches_torch(tiny_bundle, tiny_onnx, tiny_splits):
    model = onnx.load(str(tiny_onnx))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version >= 17
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        assert _dims(model, name) == ["batch", "sequence"]
    assert [o.name for o in model.graph.output] == ["sentence_embedding"]
    meta = get_metadata(model)
    assert meta["source"] == tiny_bundle.source and meta["task"] == "text-embedding"
    runner = OrtRunner(tiny_onnx)
    # Shapes never seen at export time: batch 1, 7 and 13 rows of real text, trimmed lengths.
    for size in (1, 7, 13):
        feeds = next(iterate_batches(tiny_splits.evaluation.feeds, size))
        np.testing.assert_allclose(runner.infer(feeds), tiny_bundle.run_torch(feeds), atol=PARITY_ATOL, rtol=0)


def test_input_order_is_kept(tiny_bundle, tiny_onnx, tiny_splits):
    """Swapping attention_mask and token_type_ids must change the output (guards the export's input naming)."""
    feeds = next(iterate_batches(tiny_splits.evaluation.feeds, 4))
    swapped = dict(feeds, attention_mask=feeds["token_type_ids"] + 1, token_type_ids=feeds["attention_mask"] * 0)
    out = OrtRunner(tiny_onnx).infer(feeds)
    assert np.abs(OrtRunner(tiny_onnx).infer(swapped) - out).max() > 1e-3
    np.testing.assert_allclose(out, tiny_bundle.run_torch(feeds), atol=PARITY_ATOL, rtol=0)


def test_padding_trim_leaves_outputs_unchanged(tiny_bundle, tiny_splits):
    feeds = {k: v[:6] for k, v in tiny_splits.evaluation.feeds.items()}
    trimmed = next(iterate_batches(feeds, 6))
    assert trimmed["input_ids"].shape[1] < feeds["input_ids"].shape[1]
    # Masked positions contribute exactly zero after softmax; only float summation order differs.
    np.testing.assert_allclose(tiny_bundle.run_torch(trimmed), tiny_bundle.run_torch(feeds), atol=1e-6, rtol=0)


def test_opset_below_17_is_a_user_error(tiny_bundle, tmp_path):
    with pytest.raises(UserError, match="opset"):
        export_onnx(tiny_bundle, tmp_path / "m.onnx", opset=16)


def test_timm_vit_exports_with_dynamic_batch(tmp_path):
    from deploykit.models import load_model

    bundle = load_model("timm:vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "num_classes": 10})
    result = export_onnx(bundle, tmp_path / "vit.onnx")
    model = onnx.load(str(tmp_path / "vit.onnx"))
    assert _dims(model, "pixel_values") == ["batch", 3, 32, 32]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert result.parity["max_abs_diff"] < PARITY_ATOL
    feeds = bundle.example_feeds(batch=9)
    np.testing.assert_allclose(OrtRunner(tmp_path / "vit.onnx").infer(feeds), bundle.run_torch(feeds),
                               atol=PARITY_ATOL, rtol=0)


@pytest.mark.slow
def test_minilm_export_parity(minilm_bundle, tmp_path):
    result = export_onnx(minilm_bundle, tmp_path / "minilm.onnx")
    assert result.parity["max_abs_diff"] < PARITY_ATOL
    assert len(result.parity["batches"]) == 2
