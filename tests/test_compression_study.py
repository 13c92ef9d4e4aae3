"""The compression study end to end on a tiny ViT: base trained first, every variant
started from it and fine-tuned by distillation (binary attention + MLP in two stages), the
binary weights shipped as int8 ±1 with per-channel scales, 2:4 compliance of the export,
head pruning ranked on data and recorded, and the figures in report.json / report.md come
from the run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).parent))


def test_compression_recipe_runs_end_to_end(tmp_path):
    from test_cli import deploykit

    from deploykit.report import validate_report

    overrides = ["--set", "train.epochs=2", "--set", "study.fine_tune.epochs=2", "--set", "data.evaluation=64",
                 "--set", "data.calibration=16",
                 "--set", "model.options.kwargs={embed_dim: 32, depth: 2, num_heads: 4, mlp_ratio: 2.0}",
                 "--set", "model.options.patch_size=4", "--set", "acceptance={}"]
    deploykit("-q", "run", "compress-vit-digits", "--out", "out", "--name", "c", *overrides, cwd=tmp_path)
    run_dir = tmp_path / "out" / "c"
    report = json.loads((run_dir / "report.json").read_text())
    validate_report(report)
    study = report["study"]
    rows = {r["variant"]: r for r in study["compression_table"]}
    assert list(rows) == ["fp", "binary-attention", "binary-attention-mlp", "sparse-2-4-mlp", "topk-attention",
                          "head-pruning"]
    for row in rows.values():
        assert 0.0 <= row["value"] <= 1.0 and row["p50_ms_b1"] > 0 and row["ops"] > 0

    # BiViT: two fine-tuning stages, binary weights shipped as int8 +-1 with per-channel scales,
    # and the int8 model reproduces the torch binary model (its own FP32 reference) exactly.
    train = study["variants"]["binary-attention-mlp"]["train"]
    assert [s["stage"] for s in train["stages"]] == ["attention", "all"]
    assert rows["binary-attention-mlp"]["deployed"] == "binary"
    assert rows["binary-attention-mlp"]["packed_bytes"] < 0.75 * rows["fp"]["packed_bytes"]
    binary = onnx.load(str(run_dir / "binary-attention-mlp" / "model.binary.onnx"))
    signs = [onnx.numpy_helper.to_array(i) for i in binary.graph.initializer
             if i.data_type == onnx.TensorProto.INT8 and i.dims and len(i.dims) == 2]
    assert len(signs) == 4 and all(set(np.unique(s)) == {-1, 1} for s in signs)   # 2 blocks x fc1, fc2
    metrics = report["accuracy"]["binary-attention-mlp:binary"]
    assert metrics["top1_agreement"] == 1.0 and metrics["max_abs_diff"] < 1e-4
    assert "Softmax" not in {n.op_type for n in binary.graph.node}     # binary attention: threshold, no softmax

    # 2:4: the MLP weights of the export are compliant, and counted as such
    compression = study["variants"]["sparse-2-4-mlp"]["compression"]
    assert compression["onnx_2_4"]["compliant"] == 4 and rows["sparse-2-4-mlp"]["two_four_layers"] == 4
    assert 0.1 < rows["sparse-2-4-mlp"]["linear_sparsity"] <= 0.5      # MLP at 50 %, attention dense

    # top-k keeps about a quarter of the keys; head pruning removed 25 % of the heads, ranked on data
    assert 0.2 < rows["topk-attention"]["attention_density"] < 0.5
    derived = study["variants"]["head-pruning"]["train"]["derived_transforms"]
    assert sum(len(v) for v in derived[0]["heads"].values()) == 2                 # 25 % of 2 x 4 heads
    assert rows["head-pruning"]["parameters"] < rows["fp"]["parameters"]
    md = (run_dir / "report.md").read_text()
    assert "### Compression" in md and "| head-pruning |" in md
