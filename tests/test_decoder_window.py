"""A causal LM's sliding-window variant through deploykit's causal NeighborhoodAttention op:
the Llama attention swapped in torch (exactly dense causal attention when the window covers
the sequence; causal and local otherwise), exported as one deploykit node per layer that ONNX
Runtime runs, and calibrated to W8A8 with the op's INT8 plugin form."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from deploykit.errors import UserError

sys.path.insert(0, str(Path(__file__).parent))

LAYERS = 2


def _window(kernel: int, causal: bool = True) -> dict:
    return {"name": "neighborhood-attention", "kernel_size": kernel, "causal": causal}


def _load(folder: Path, transforms=None, max_length: int = 32):
    from deploykit.models import load_model

    options = {"max_length": max_length, **({"transforms": transforms} if transforms else {})}
    return load_model(f"hf:{folder}", options)


def _logits(bundle, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return bundle.module(ids, torch.ones_like(ids))


def _ids(n: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(1000, 5000, (2, n), generator=torch.Generator().manual_seed(seed))


def test_a_window_covering_the_sequence_is_dense_causal_attention(tiny_llama_dir):
    dense, windowed = _load(tiny_llama_dir), _load(tiny_llama_dir, [_window(24)])
    ids = _ids(24)
    # float32, different summation order (window gather vs full matmul) through 2 layers of a
    # width-32 random model with O(1) logits
    torch.testing.assert_close(_logits(windowed, ids), _logits(dense, ids), atol=2e-5, rtol=0)
    # the tokenizer pads to the right; padded keys stay masked in the window too
    mask = torch.ones_like(ids)
    mask[1, 16:] = 0
    with torch.no_grad():
        a = dense.module(ids, mask)[1, :16]
        b = windowed.module(ids, mask)[1, :16]
    torch.testing.assert_close(b, a, atol=2e-5, rtol=0)


def test_a_short_window_is_causal_and_local(tiny_llama_dir):
    kernel = 4
    windowed = _load(tiny_llama_dir, [_window(kernel)])
    ids = _ids(24)
    base = _logits(windowed, ids)
    # Each layer sees kernel - 1 tokens back, so after 2 layers position p depends on tokens
    # p - 2 (kernel - 1) .. p only: changing token 0 leaves positions > 6 exactly as they were.
    first = ids.clone()
    first[:, 0] = 4242
    moved = _logits(windowed, first)
    reach = LAYERS * (kernel - 1)
    assert torch.equal(moved[:, reach + 1:], base[:, reach + 1:])
    assert not torch.allclose(moved[:, :reach + 1], base[:, :reach + 1])
    # causal: changing the last token changes nothing before it
    last = ids.clone()
    last[:, -1] = 4242
    assert torch.equal(_logits(windowed, last)[:, :-1], base[:, :-1])
    # and it is not the dense model
    assert not torch.allclose(base, _logits(_load(tiny_llama_dir), ids), atol=1e-3)


def test_a_decoder_window_must_be_causal(tiny_llama_dir):
    with pytest.raises(UserError) as info:
        _load(tiny_llama_dir, [_window(4, causal=False)])
    assert "must be causal" in str(info.value) and "causal: true" in str(info.value.fix)


def test_exports_one_neighborhood_node_per_layer_and_calibrates_to_its_int8_form(tiny_llama_dir, tmp_path):
    from deploykit.context import reference_outputs
    from deploykit.data import DataSpec, make_splits
    from deploykit.export import export_onnx
    from deploykit.plugins import DOMAIN
    from deploykit.quantize import QuantConfig, calibrate
    from deploykit.runners import OrtRunner
    from deploykit.verify import verify

    bundle = _load(tiny_llama_dir, [_window(8)])
    result = export_onnx(bundle, tmp_path / "model.onnx")
    model = onnx.load(str(tmp_path / "model.onnx"))
    ops = [n for n in model.graph.node if n.domain == DOMAIN]
    assert len(ops) == LAYERS and {n.op_type for n in ops} == {"NeighborhoodAttention1D"}
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in ops[0].attribute}
    assert list(attrs["kernel_size"]) == [8] and list(attrs["is_causal"]) == [1]
    # ONNX Runtime runs the op's function body: parity with torch as for the dense export
    assert result.parity["max_abs_diff"] < 1e-4
    # sequences shorter than the window (trimmed batches) still run and match torch
    ids = _ids(5).numpy().astype(np.int64)
    out = OrtRunner(tmp_path / "model.onnx").infer({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    np.testing.assert_allclose(out, _logits(bundle, torch.from_numpy(ids)).numpy(), atol=1e-4, rtol=0)

    splits = make_splits(bundle, DataSpec(calibration=16, evaluation=12, seed=0))
    cal = calibrate(tmp_path / "model.onnx", splits.calibration, tmp_path / "model.int8.onnx",
                    QuantConfig(preset="gpu-trt"))
    assert len(cal.plugin_int8_nodes) == LAYERS             # Q -> op -> DQ: the plugin's INT8 form
    reference = reference_outputs(bundle, splits.evaluation, batch_size=4)
    checked = verify({"fp32": OrtRunner(tmp_path / "model.onnx"), "int8": OrtRunner(tmp_path / "model.int8.onnx")},
                     reference, splits.evaluation, bundle.task, batch_size=4)
    assert checked.accuracy["fp32"]["top1_agreement"] == 1.0
    # as for the dense tiny decoder: a random model's near-uniform distribution kept within 5 %
    assert abs(checked.accuracy["int8"]["perplexity_ratio"] - 1.0) < 0.05
