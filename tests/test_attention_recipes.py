"""Clipped softmax and gated attention: the formulas, the module swaps, export, metrics, training."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from deploykit.errors import UserError
from deploykit.recipes.attention import (
    GateSpec,
    HeadGate,
    SoftmaxSpec,
    attention_modules,
    clipped_softmax,
    fold_gate_scales,
    logit,
    valid_keys,
)

TINY_VIT = {"img_size": 16, "patch_size": 4, "in_chans": 1, "num_classes": 10, "seed": 0,
            "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 4, "mlp_ratio": 2.0}}


def tiny_vit(transforms=None, **extra):
    from deploykit.models import load_model

    options = {**TINY_VIT, **extra}
    if transforms:
        options["transforms"] = transforms
    return load_model("timm:vit_tiny_patch16_224", options)


# ----------------------------------------------------------------------------- clipped softmax
def test_paper_setting_zeroes_a_uniform_row():
    # BERT-base in the paper: zeta = 1, gamma = -0.025 at T = 128. A uniform row is 1/128 =
    # 0.0078 per key; (1 + 0.025) * 0.0078 - 0.025 < 0, so every entry clips to exactly 0.
    row = torch.zeros(1, 128)
    out = clipped_softmax(row, zeta=1.0, gamma=-0.025)
    assert torch.equal(out, torch.zeros_like(out))
    # The same through the spec the recipes use (alpha 3.2 at T = 128 is gamma -0.025).
    assert SoftmaxSpec(alpha=3.2, seq_len=128).fixed_gamma() == pytest.approx(-0.025)


def test_clipped_softmax_formula_and_gradient():
    x = torch.tensor([[4.0, 1.0, 0.0, -2.0]], requires_grad=True)
    zeta, gamma = 1.1, -0.1
    p = torch.softmax(x.detach(), -1)
    expected = torch.clamp((zeta - gamma) * p + gamma, 0, 1)
    out = clipped_softmax(x, zeta=zeta, gamma=gamma)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert out[0, 0] == 1.0 and out[0, 3] == 0.0           # both ends clipped
    out[0, 3].backward()
    assert torch.count_nonzero(x.grad) == 0                  # a clipped entry passes no gradient


def test_fixed_gamma_cannot_zero_short_rows_but_length_normalised_can():
    # The documented failure of the fixed form: a 20-key row (short sentence) with gamma
    # tuned for T = 128 keeps its uniform value 1/20 > 0.025, so the head cannot do nothing.
    short = torch.zeros(1, 1, 1, 20)
    assert clipped_softmax(short, gamma=-0.025).min() > 0
    # Length-normalised: gamma = -alpha / n from the valid keys zeroes it at any length.
    for n in (5, 20, 128, 300):
        row = torch.zeros(1, 1, 1, n)
        gamma = -3.2 / valid_keys(None, row)
        assert torch.count_nonzero(clipped_softmax(row, gamma=gamma)) == 0


def test_valid_keys_reads_additive_and_boolean_masks():
    scores = torch.zeros(2, 1, 3, 5)
    additive = torch.zeros(2, 1, 1, 5)
    additive[0, ..., 3:] = torch.finfo(torch.float32).min          # row 0: 3 valid keys
    assert valid_keys(additive, scores)[:, 0, 0, 0].tolist() == [3.0, 5.0]
    boolean = torch.ones(2, 1, 3, 5, dtype=torch.bool).tril()       # causal: 1, 2, 3 keys
    assert valid_keys(boolean, scores)[0, 0, :, 0].tolist() == [1.0, 2.0, 3.0]


def test_length_normalised_gamma_ignores_padding(tiny_bundle):
    """A padded sentence gives the same embedding as the unpadded one: gamma counts valid keys only."""
    from deploykit.models import load_model

    bundle = load_model(tiny_bundle.source, {"max_length": 64, "transforms": [
        {"name": "clipped-softmax", "alpha": 1.5, "length_normalised": True}]})
    feeds = tiny_bundle.preprocessor(["a short sentence about padding"])
    n = int(feeds["attention_mask"].sum())
    short = {k: v[:, :n] for k, v in feeds.items()}
    long = {k: v[:, :n + 10] for k, v in feeds.items()}
    np.testing.assert_allclose(bundle.run_torch(short), bundle.run_torch(long), atol=1e-6)  # fp32 rounding


# ----------------------------------------------------------------------------- gates
def test_per_head_gate_equals_one_linear_per_head():
    torch.manual_seed(0)
    h, d = 3, 8
    gate = HeadGate(GateSpec(kind="per-head", init=0.25), h, d, h * d)
    x = torch.randn(2, 5, h * d)
    heads = x.view(2, 5, h, d)
    expected = torch.stack([torch.sigmoid(heads[:, :, i] @ gate.weight[i] + gate.bias[i]) for i in range(h)], dim=1)
    torch.testing.assert_close(gate(x), expected.unsqueeze(-1), rtol=1e-6, atol=1e-6)  # fp32 summation order
    # Bias starts at logit(pi_init): with zero input the gate opens to exactly pi_init.
    assert torch.allclose(gate(torch.zeros(1, 1, h * d)), torch.full((1, h, 1, 1), 0.25))
    assert logit(0.25) == pytest.approx(math.log(1 / 3))


@pytest.mark.parametrize("kind", ["per-head", "mlp", "linear"])
def test_fine_tuning_gate_starts_as_identity(kind, tiny_bundle):
    from deploykit.models import load_model

    feeds = tiny_bundle.example_feeds(batch=3, seq=12)
    ref = tiny_bundle.run_torch(feeds)
    gated = load_model(tiny_bundle.source, {"max_length": 64, "transforms": [
        {"name": "gated-attention", "gate": kind, "init": 0.25, "fine_tune": True}]})
    # sigmoid(logit(0.25)) * (1 / 0.25) is 1 up to one float rounding.
    np.testing.assert_allclose(gated.run_torch(feeds), ref, atol=1e-6)
    vit = tiny_vit()
    gated_vit = tiny_vit([{"name": "gated-attention", "gate": kind, "fine_tune": True}])
    images = vit.example_feeds(batch=2)
    np.testing.assert_allclose(gated_vit.run_torch(images), vit.run_torch(images), atol=1e-5)


def test_swapping_alone_changes_nothing(tiny_bundle):
    from deploykit.recipes.attention import swap_all

    feeds = tiny_bundle.example_feeds(batch=2, seq=9)
    ref = tiny_bundle.run_torch(feeds)
    import copy

    swapped = copy.deepcopy(tiny_bundle)
    assert len(swap_all(swapped.module)) == 2
    np.testing.assert_array_equal(swapped.run_torch(feeds), ref)


def test_transforms_compose_and_validate():
    vit = tiny_vit([{"name": "clipped-softmax", "alpha": 1.0, "seq_len": 17},
                    {"name": "gated-attention", "gate": "mlp"}])
    modules = attention_modules(vit.module)
    assert len(modules) == 2
    assert all(m.core.softmax_spec is not None and m.core.gate is not None for m in modules)
    assert [t["name"] for t in vit.info["transforms"]] == ["clipped-softmax", "gated-attention"]
    for bad, fragment in (([{"name": "flash"}], "unknown transform"),
                          ([{"name": "clipped-softmax", "gama": -0.1}], "does not take"),
                          ([{"name": "clipped-softmax", "gamma": 0.1}], "positive"),
                          ([{"name": "clipped-softmax"}], "needs gamma"),
                          ([{"name": "gated-attention", "gate": "conv"}], "unknown gate"),
                          ([{"name": "gated-attention", "init": 1.5}], "outside")):
        with pytest.raises(UserError, match=fragment):
            tiny_vit(bad)


def test_fold_moves_the_fine_tuning_scale_into_the_projection():
    vit = tiny_vit([{"name": "gated-attention", "fine_tune": True}])
    with torch.no_grad():
        for m in attention_modules(vit.module):
            m.core.gate.weight.normal_(0, 0.3)          # a trained gate, not the identity
    images = vit.example_feeds(batch=3)
    before = vit.run_torch(images)
    proj = attention_modules(vit.module)[0].proj.weight.clone()
    assert fold_gate_scales(vit.module) == 2
    assert all(m.core.gate.scale == 1.0 for m in attention_modules(vit.module))
    torch.testing.assert_close(attention_modules(vit.module)[0].proj.weight, proj * 4.0)
    np.testing.assert_allclose(vit.run_torch(images), before, atol=1e-5)   # float rounding of the product


# ----------------------------------------------------------------------------- export
def test_exported_graphs_use_standard_ops_and_match_torch(tmp_path, tiny_bundle):
    import onnx

    from deploykit.export import export_onnx
    from deploykit.models import load_model

    vit = tiny_vit([{"name": "clipped-softmax", "alpha": 1.0, "seq_len": 17},
                    {"name": "gated-attention", "fine_tune": True}])
    with torch.no_grad():
        for m in attention_modules(vit.module):
            m.core.gate.weight.normal_(0, 0.3)
    result = export_onnx(vit, tmp_path / "vit.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "vit.onnx")).graph.node]
    assert ops.count("Clip") >= 2 and ops.count("Sigmoid") == 2 and ops.count("Softmax") == 2
    assert {n.domain for n in onnx.load(str(tmp_path / "vit.onnx")).graph.node} <= {"", "ai.onnx"}
    # Parity against the *unfolded* torch module: the fold is checked by the export itself.
    assert result.parity["max_abs_diff"] < 1e-5            # fp32 kernels differ in summation order
    bert = load_model(tiny_bundle.source, {"max_length": 64, "transforms": [
        {"name": "clipped-softmax", "alpha": 2.0, "length_normalised": True},
        {"name": "gated-attention", "gate": "per-head"}]})
    assert export_onnx(bert, tmp_path / "bert.onnx").parity["max_abs_diff"] < 1e-5


# ----------------------------------------------------------------------------- outlier metrics
def test_sequence_stats_match_the_paper_formulas():
    from deploykit.outliers import sequence_stats

    torch.manual_seed(0)
    x = torch.randn(4, 50, 40)
    x[1, 3, 7] = 80.0                                            # one outlier in sequence 1
    inf, kurt = sequence_stats(x, None)
    flat = x.view(4, -1).double()
    mu = flat.mean(1, keepdim=True)
    paper = ((flat - mu) ** 4).mean(1) / (flat.std(1) ** 4 + 1e-6)   # the paper's kurtosis()
    np.testing.assert_allclose(kurt, paper.numpy(), rtol=1e-9)
    np.testing.assert_allclose(inf, flat.abs().max(1).values.numpy())
    assert abs(kurt[0] - 3.0) < 0.3 and kurt[1] > 100             # Gaussian ~3; an outlier explodes it
    valid = torch.ones(4, 50, dtype=torch.bool)
    valid[1, 3] = False                                          # padding excluded: the outlier vanishes
    inf_masked, _ = sequence_stats(x, valid)
    assert inf_masked[1] < 10 and inf_masked[0] == inf[0]


def test_measure_outliers_on_bert_and_vit(tiny_bundle, tiny_splits):
    from deploykit.data import DataSpec, make_splits
    from deploykit.outliers import SITES, measure_outliers

    stats = measure_outliers(tiny_bundle, tiny_splits.evaluation, batch_size=8, samples=16)
    assert [r["layer"] for r in stats.layers] == [0, 1] and stats.samples == 16
    assert stats.summary["max_inf_norm"] == max(stats.summary[f"max_inf_{s}"] for s in SITES)
    vit = tiny_vit()
    splits = make_splits(vit, DataSpec(source="digits", calibration=8, evaluation=16))
    vstats = measure_outliers(vit, splits.evaluation, batch_size=8)
    assert len(vstats.layers) == 2 and all(r["inf_block_out"] > 0 for r in vstats.layers)


# ----------------------------------------------------------------------------- quantization settings
def test_running_minmax_is_an_ema_of_batch_extremes():
    from deploykit.calib.calibrators import CalibrationConfig, RangeCollector

    c = RangeCollector(CalibrationConfig(method="running-minmax", symmetric=False))
    for lo, hi in ((-1.0, 2.0), (-3.0, 4.0), (-1.0, 10.0)):
        c.observe("t", np.array([lo, 0.5, hi]))
    r = c.compute()["t"]
    assert r.lo == pytest.approx(0.9 * (0.9 * -1 + 0.1 * -3) + 0.1 * -1)
    assert r.hi == pytest.approx(0.9 * (0.9 * 2 + 0.1 * 4) + 0.1 * 10)
    assert r.max == 10.0                                            # minmax is still recorded


def test_paper_preset_places_the_papers_quantizers(tiny_onnx, tiny_splits, tmp_path):
    import onnx
    from onnx import numpy_helper

    from deploykit.quantize import QuantConfig, calibrate

    result = calibrate(tiny_onnx, tiny_splits.calibration, tmp_path / "paper.onnx", QuantConfig(preset="paper-w8a8"))
    assert result.config.method == "running-minmax" and result.config.per_channel is False
    model = onnx.load(str(tmp_path / "paper.onnx"))
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}

    def fed_by_dq(node, k=0):
        p = producers.get(node.input[k])
        return p is not None and p.op_type == "DequantizeLinear"

    softmax = [n for n in model.graph.node if n.op_type == "Softmax"]
    layernorm = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    # Softmax outputs feed the P.V MatMul through Q/DQ; LayerNorm inputs (residual sums) are quantized.
    assert all(fed_by_dq(n) for n in layernorm[1:])
    consumers = [n for n in model.graph.node for s in softmax if s.output[0] in n.input]
    assert consumers and all(c.op_type == "QuantizeLinear" for c in consumers)
    # Weights: per-tensor (scalar scale), symmetric (zero point 0), activations uint8.
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            assert numpy_helper.to_array(inits[n.input[1]]).size == 1
    q_types = {numpy_helper.to_array(inits[n.input[2]]).dtype for n in model.graph.node
               if n.op_type == "QuantizeLinear" and n.input[2] in inits}
    assert np.dtype(np.uint8) in q_types


# ----------------------------------------------------------------------------- training + study
def test_training_learns_and_the_checkpoint_round_trips(tmp_path):
    from deploykit.data import DataSpec, make_splits
    from deploykit.models import load_model
    from deploykit.train import TrainSpec, train

    transforms = [{"name": "gated-attention"}]
    vit = tiny_vit(transforms)
    splits = make_splits(vit, DataSpec(source="digits", calibration=8, evaluation=64, training=512))
    spec = TrainSpec(enabled=True, epochs=20, batch_size=32, lr=3e-3)
    result = train(vit, splits.training, spec, checkpoint=tmp_path / "vit.safetensors")
    # A ViT sits at chance (ln 10 = 2.30) for its first ~100 steps on digits; by 320 steps
    # the loss is well below it (measured 0.35 with this seed). One logged value per 6 steps.
    assert result.steps == 320 and result.log_every == 6 and len(result.losses) == 54
    assert np.mean(result.losses[-5:]) < 1.8 < np.mean(result.losses[:5])
    again = load_model("timm:vit_tiny_patch16_224", {**TINY_VIT, "transforms": transforms,
                                                     "checkpoint": str(tmp_path / "vit.safetensors")})
    images = splits.evaluation.feeds
    np.testing.assert_array_equal(again.run_torch(images), vit.run_torch(images))
    with pytest.raises(UserError, match="does not fit"):       # gate weights in the file, no gates in the model
        load_model("timm:vit_tiny_patch16_224", {**TINY_VIT, "transforms": [{"name": "clipped-softmax", "gamma": -0.01}],
                                                 "checkpoint": str(tmp_path / "vit.safetensors")})


def test_training_split_takes_what_is_left(tiny_bundle):
    from deploykit.data import DataSpec, make_splits

    vit = tiny_vit()
    splits = make_splits(vit, DataSpec(source="digits", calibration=100, evaluation=200, training=-1))
    assert splits.training.count == 1797 - 300
    again = make_splits(vit, DataSpec(source="digits", calibration=100, evaluation=200))
    assert again.training is None and again.evaluation.sha256 == splits.evaluation.sha256


def test_study_recipe_runs_end_to_end(tmp_path):
    from test_cli import deploykit

    from deploykit.report import validate_report

    overrides = ["--set", "train.epochs=1", "--set", "data.evaluation=64", "--set", "data.calibration=16",
                 "--set", "model.options.kwargs={embed_dim: 32, depth: 2, num_heads: 4, mlp_ratio: 2.0}",
                 "--set", "model.options.patch_size=4", "--set", "study.variants.clipped-softmax="
                 "[{name: clipped-softmax, alpha: 1.0, seq_len: 17}]", "--set", "acceptance={}"]
    deploykit("-q", "run", "outliers-vit-digits", "--out", "out", "--name", "s", *overrides, cwd=tmp_path)
    run_dir = tmp_path / "out" / "s"
    report = json.loads((run_dir / "report.json").read_text())
    validate_report(report)
    table = report["study"]["table"]
    assert [r["variant"] for r in table] == ["vanilla", "clipped-softmax", "gated-attention"]
    for row in table:
        assert row["max_inf_norm"] > 0 and row["avg_kurtosis"] > 0
        assert all(0 <= row[k] <= 1 for k in ("fp32", "paper-w8a8", "gpu-trt"))
    for name in ("report.md", "outliers.png", "training_loss.png", "gated-attention/model.safetensors",
                 "gated-attention/model.paper-w8a8.onnx", "vanilla/model.gpu-trt.onnx"):
        assert (run_dir / name).is_file(), name
    assert "Study: outlier-suppressing attention" in (run_dir / "report.md").read_text()


def test_outliers_and_train_commands(tmp_path):
    from test_cli import assert_user_error, deploykit

    deploykit("-q", "outliers", "timm:vit_tiny_patch16_224", "--data", "digits", "--evaluation", "32",
              "--calibration", "8", "--option", "img_size=16", "--option", "patch_size=4", "--option", "in_chans=1",
              "--option", "kwargs={embed_dim: 32, depth: 2, num_heads: 4}",
              "--transform", "{name: gated-attention}", "-o", "o", cwd=tmp_path)
    result = json.loads((tmp_path / "o" / "outliers.json").read_text())
    assert len(result["layers"]) == 2 and result["transforms"][0]["name"] == "gated-attention"
    assert (tmp_path / "o" / "outliers.png").is_file()
    proc = deploykit("outliers", "timm:vit_tiny_patch16_224", "--transform", "{name: sparkle}", cwd=tmp_path,
                     check_rc=None)
    assert_user_error(proc, "unknown transform")
    deploykit("-q", "train", "outliers-vit-digits", "-o", "ckpt.safetensors", "--set", "train.max_steps=3",
              "--set", "model.options.kwargs={embed_dim: 32, depth: 1, num_heads: 4}",
              "--set", "model.options.transforms=[{name: gated-attention}]", cwd=tmp_path)
    summary = json.loads((tmp_path / "ckpt.train.json").read_text())
    assert summary["steps"] == 3 and (tmp_path / "ckpt.safetensors").is_file()


# ----------------------------------------------------------------------------- attention swaps
def test_full_window_neighborhood_swap_equals_dense_attention():
    # No class token: a 2-D window as large as the 4 x 4 patch grid sees every patch, which
    # is dense attention. The swap keeps all weights, so the outputs must agree.
    extra = {"kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 4, "class_token": False, "global_pool": "avg"}}
    dense = tiny_vit(**extra)
    swapped = tiny_vit([{"name": "neighborhood-attention", "kernel_size": 4}], **extra)
    images = dense.example_feeds(batch=3)
    np.testing.assert_allclose(swapped.run_torch(images), dense.run_torch(images), atol=1e-5)  # fp32 sum order
    narrow = tiny_vit([{"name": "neighborhood-attention", "kernel_size": 3}], **extra)
    assert np.abs(narrow.run_torch(images) - dense.run_torch(images)).max() > 1e-3


def test_swapped_models_export_custom_nodes_that_ort_runs(tmp_path, tiny_bundle):
    import onnx

    from deploykit.export import export_onnx
    from deploykit.models import load_model

    vit = tiny_vit([{"name": "neighborhood-attention", "kernel_size": 2, "dilation": [1, 2]}])  # 4 x 4 grid
    result = export_onnx(vit, tmp_path / "vit.onnx")          # parity vs torch on ORT, inside
    assert result.parity["max_abs_diff"] < 1e-5              # fp32 kernels differ in summation order
    ops = [n.op_type for n in onnx.load(str(tmp_path / "vit.onnx")).graph.node if n.domain == "deploykit"]
    assert ops == ["NeighborhoodAttention2D"] * 2
    feeds = tiny_bundle.preprocessor(["padding must not change this sentence", "short"])
    n = int(feeds["attention_mask"][0].sum())
    for swap in ({"name": "linear-attention"}, {"name": "neighborhood-attention", "kernel_size": 5}):
        bert = load_model(tiny_bundle.source, {"max_length": 64, "transforms": [swap]})
        assert export_onnx(bert, tmp_path / "bert.onnx").parity["max_abs_diff"] < 1e-5
        # Padded keys drop out exactly and windows sit on each sentence's own length: an
        # embedding ignores the padding after it (the 3-token "short" row is shorter than k).
        np.testing.assert_allclose(bert.run_torch({k: v[:, :n] for k, v in feeds.items()}),
                                   bert.run_torch({k: v[:, :n + 9] for k, v in feeds.items()}), atol=1e-6)


def test_attention_swap_settings_are_checked():
    with pytest.raises(UserError, match="does not take"):
        tiny_vit([{"name": "neighborhood-attention", "window": 3}])
    with pytest.raises(UserError, match="feature map"):
        tiny_vit([{"name": "linear-attention", "feature": "softplus"}])
    with pytest.raises(UserError, match="do not combine"):
        tiny_vit([{"name": "clipped-softmax", "gamma": -0.01}, {"name": "linear-attention"}])


def test_study_layer_latency_per_variant_kind(tmp_path):
    """Each variant's own attention kind is timed; a 2-D window runs on a square grid."""
    from deploykit.recipe import load_recipe
    from deploykit.study import measure_layer_latency
    from deploykit.study_report import layer_latency_lines, plot_layer_latency

    rec = load_recipe("swap-attention-vit-digits", ["study.layer_latency.lengths=[16, 60]",
                                                    "study.layer_latency.heads=2", "study.layer_latency.head_dim=8",
                                                    "study.layer_latency.iterations=2"])
    layer = measure_layer_latency(rec)
    assert {k: v["kind"] for k, v in layer["ops"].items()} == {
        "dense": "dense", "neighborhood-3x3": "neighborhood", "linear-elu1": "linear"}
    assert layer["ops"]["neighborhood-3x3"]["kernel_size"] == 3
    assert [r["seq_len"] for r in layer["variants"]["dense"].values()] == [16, 60]
    assert [r["seq_len"] for r in layer["variants"]["neighborhood-3x3"].values()] == [16, 64]   # 4x4, 8x8 grids
    for rows in layer["variants"].values():
        for row in rows.values():
            assert 0 < row["p50_ms"] <= row["p99_ms"] and row["batch"] == 1
    assert "| neighborhood-3x3 | neighborhood k=3 2-D |" in "\n".join(layer_latency_lines(layer))
    assert plot_layer_latency(layer, tmp_path / "layer.png").stat().st_size > 1000
