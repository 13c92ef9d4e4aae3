"""BiViT binarization: the formulas, the straight-through gradients, stages, exact export, counts."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from deploykit.compression import (
    ORT_EXACT_SESSION_CONFIG,
    binarize_initializers,
    model_stats,
    onnx_file_stats,
)
from deploykit.errors import UserError
from test_attention_recipes import tiny_vit  # the tiny ViT every transform test builds
from deploykit.recipes.binarize import (
    BinaryAttention,
    BinaryLinear,
    attention_density,
    binary_attention_modules,
    binary_linears,
    block_linears,
    recording_attention,
    set_binarization_stage,
)

FULL = [{"name": "binary-attention"}, {"name": "binary-weights", "targets": "all"},
        {"name": "binary-activations", "targets": "all"}]
FLOOR = torch.finfo(torch.float32).min


def ort_session(path, config=None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    source = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------- binary attention
def test_threshold_form_equals_softmax_form():
    """softmax(x) >= beta * rowmax(softmax(x))  <=>  x >= rowmax(x) - ln(1/beta).

    softmax(x)_i / max_j softmax(x)_j = exp(x_i - max x), so the two are the same test in
    exact arithmetic. In float32 they round differently (exp, the division by the row sum,
    beta * max against the subtraction of ln(1/beta)), so a logit within a few ulp of the
    threshold may land on either side: equality is checked away from the boundary, and
    the boundary itself is pinned down where both forms are exact (ties at the maximum)
    and, for the threshold form, at x == threshold (>= keeps it).
    """
    torch.manual_seed(0)
    beta = 0.25
    c = math.log(1 / beta)
    x = torch.randn(4, 3, 12, 12) * 2.0
    x[0, :, :, 7:] = FLOOR                              # additive finfo.min mask (padding)
    x[1, :, 4] = FLOOR                                  # one query row whose keys are all masked
    x[2, :, :, 9:] = float("-inf")                      # a -inf mask (timm's causal form)
    x[2, :, 5] = float("-inf")                          # ... and an empty -inf row
    x[3, 0, 0, 3] = x[3, 0, 0].max()                    # an exact tie at the row maximum
    x[3, 0, 1, 2] = x[3, 0, 1].max() - c                # a logit exactly at the threshold
    att = BinaryAttention(beta)
    softmax_form = att.train()(x).detach()
    threshold_form = att.eval()(x)
    # Independent float64 reference of the paper's definition over the valid keys.
    valid = x > FLOOR / 2
    p = torch.softmax(torch.where(valid, x, FLOOR).double(), -1)
    reference = ((p >= beta * p.amax(-1, keepdim=True)) & valid).float()
    threshold = x.amax(-1, keepdim=True) - c
    near = ((x - threshold).abs() <= 1e-5) & valid
    assert int(near.sum()) == 1                         # only the constructed boundary logit
    away = ~near
    assert torch.equal(softmax_form[away], threshold_form[away])
    assert torch.equal(reference[away], threshold_form[away])
    # Ties: both maxima kept in both forms; the logit at the threshold kept by >=.
    assert softmax_form[3, 0, 0, 3] == threshold_form[3, 0, 0, 3] == 1.0
    assert threshold_form[3, 0, 1, 2] == 1.0
    # beta = 1 keeps exactly the row maxima, ties included, in both forms.
    ones = BinaryAttention(1.0)
    assert torch.equal(ones.train()(x).detach(), ones.eval()(x))
    assert torch.equal(ones.eval()(x)[3, 0, 0], (x[3, 0, 0] == x[3, 0, 0].max()).float())
    # Masks: masked keys never kept, empty rows all zero, no NaN, in every mode and variant.
    for scale in (False, True):
        for mode in (True, False):
            out = BinaryAttention(beta, scale=scale).train(mode)(x).detach()
            assert torch.isfinite(out).all()
            assert not out[~valid].any()
            assert not out[1, :, 4].any() and not out[2, :, 5].any()
            assert (out[valid.any(-1)].amax(-1) > 0).all()          # a row with keys keeps its maximum


def test_attention_straight_through_gradient_is_the_softmax_gradient():
    torch.manual_seed(1)
    x = (torch.randn(2, 2, 5, 7) * 2).requires_grad_(True)
    g = torch.randn(2, 2, 5, 7)
    att = BinaryAttention(0.25).train()
    out = att(x)
    assert set(out.detach().unique().tolist()) <= {0.0, 1.0}        # the forward is exactly binary
    out.backward(g)
    (reference,) = torch.autograd.grad(torch.softmax(x, -1), x, g)
    assert torch.equal(x.grad, reference) and x.grad.abs().sum() > 0
    # Masked keys get no gradient.
    xm = x.detach().clone()
    xm[..., 5:] = FLOOR
    xm.requires_grad_(True)
    att(xm).backward(g)
    assert not xm.grad[..., 5:].any() and xm.grad[..., :5].abs().sum() > 0
    # ste: false trains nothing through the binary mask.
    frozen = BinaryAttention(0.25, ste=False).train()(x)
    assert not frozen.requires_grad


def test_scaled_binary_attention_uses_the_least_squares_row_scale():
    torch.manual_seed(2)
    x = torch.randn(1, 2, 4, 6) * 3
    att = BinaryAttention(0.3, scale=True).eval()
    out = att(x)
    a = torch.softmax(x, -1)
    b = (x >= x.amax(-1, keepdim=True) - math.log(1 / 0.3)).float()
    v = (a * b).sum(-1, keepdim=True) / (b * b).sum(-1, keepdim=True)
    torch.testing.assert_close(out, v * b, rtol=0, atol=0)


def test_density_statistics_are_recorded_on_demand():
    att = BinaryAttention(0.5).eval()
    x = torch.tensor([[[[0.0, 0.0, -5.0, FLOOR]]]])       # 2 of 3 valid keys kept
    att(x)
    assert att.stats()["rows"] == 0                       # not recording by default
    att.record = True
    att(x)
    att(torch.tensor([[[[1.0, 0.0, -5.0, 0.0]]]]))       # 1 of 4 kept
    s = att.stats()
    assert s["rows"] == 2 and s["density"] == pytest.approx((2 / 3 + 1 / 4) / 2)
    assert s["ones_per_row"] == 1.5 and s["min_density"] == 0.25


# ----------------------------------------------------------------------------- binary weights / activations
def test_binary_weight_values_sign_of_zero_and_scale_init():
    lin = nn.Linear(4, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 6.0],        # mean 3: centred -2, -1, 0, 3
                                       [-1.0, -1.0, 2.0, 4.0]]))    # mean 1: centred -2, -2, 1, 3
    b = BinaryLinear(lin)
    b.binarize_weights()
    assert b.weight is lin.weight and b.bias is lin.bias            # the same parameters, same names
    assert b.signs().tolist() == [[-1, -1, 1, 1], [-1, -1, 1, 1]]  # sign(0) = +1
    assert b.weight_scale.tolist() == [1.5, 2.0]                   # mean |W - rowmean|
    b.eval()
    assert b.weight_binary.tolist() == [[-1.5, -1.5, 1.5, 1.5], [-2.0, -2.0, 2.0, 2.0]]
    torch.manual_seed(3)
    big = BinaryLinear(nn.Linear(32, 16))
    big.binarize_weights()
    w = big.eval().weight_binary
    s = big.weight_scale.detach()
    assert torch.equal(w.abs(), s[:, None].expand_as(w))            # every channel is exactly +-s_c
    assert torch.equal(w, s[:, None] * big.signs().float())
    centred = big.weight - big.weight.mean(1, keepdim=True)
    torch.testing.assert_close(s, centred.abs().mean(1))
    # The eval buffer follows in-place changes of the latent weight (optimizer steps, loads).
    with torch.no_grad():
        big.weight.neg_()
    assert torch.equal(big(torch.ones(1, 32)), nn.functional.linear(torch.ones(1, 32), -w, big.bias))


def test_binary_weight_straight_through_gradient():
    torch.manual_seed(4)
    lin = nn.Linear(12, 6)
    with torch.no_grad():
        lin.weight.mul_(8.0)                                      # some |W - mean| > 1: clipped
    b = BinaryLinear(lin)
    b.binarize_weights()
    b.train()
    x, gy = torch.randn(5, 12), torch.randn(5, 6)
    y = b(x)
    torch.testing.assert_close(y, x @ (b.weight_scale[:, None] * b.signs().float()).T + b.bias, rtol=0, atol=0)
    y.backward(gy)
    g_wb = gy.T @ x                                               # dL/dW_b
    centred = b.weight.detach() - b.weight.detach().mean(1, keepdim=True)
    inside = (centred.abs() <= 1).float()
    assert 0 < inside.mean() < 1
    g_c = g_wb * b.weight_scale.detach()[:, None] * inside        # clipped identity, times s
    expected_w = g_c - g_c.mean(1, keepdim=True)                  # through the centring
    expected_s = (g_wb * b.signs().float()).sum(1)
    torch.testing.assert_close(b.weight.grad, expected_w, rtol=1e-5, atol=1e-6)   # fp32 reduction order
    torch.testing.assert_close(b.weight_scale.grad, expected_s, rtol=1e-5, atol=1e-6)
    assert b.weight.grad.abs().sum() > 0


def test_binary_activation_sign_and_clipped_identity():
    b = BinaryLinear(nn.Linear(7, 1))
    b.binarize_inputs(scale=True)
    b.train()
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0], requires_grad=True)
    out = b.binarized_input(x)
    assert out.tolist() == [-1, -1, -1, 1, 1, 1, 1]               # sign(0) = +1, scale starts at 1
    out.backward(torch.full((7,), 2.0))
    assert x.grad.tolist() == [0, 2, 2, 2, 2, 2, 0]               # 1[|x| <= 1]
    assert b.input_scale.grad.item() == 2.0 * (4 - 3)             # sum g * sign: four +1, three -1


# ----------------------------------------------------------------------------- transforms, stages, checkpoints
def test_targets_pick_block_linears_only(tiny_bundle):
    from deploykit.models import load_model

    vit = tiny_vit()
    parts = dict(block_linears(vit.module))
    assert parts == {f"blocks.{i}.{n}": p for i in (0, 1) for n, p in
                     (("attn.qkv", "attention"), ("attn.proj", "attention"), ("mlp.fc1", "mlp"), ("mlp.fc2", "mlp"))}
    mlp = tiny_vit([{"name": "binary-weights"}])
    assert sorted(n for n, m in mlp.module.named_modules() if isinstance(m, BinaryLinear)) == \
        ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    assert type(mlp.module.head) is nn.Linear and isinstance(mlp.module.patch_embed.proj, nn.Conv2d)
    bert = load_model(tiny_bundle.source, {"max_length": 64, "transforms": [
        {"name": "binary-weights", "targets": "attention"}]})
    names = sorted(n.split("layer.0.")[1] for n, m in bert.module.named_modules()
                   if isinstance(m, BinaryLinear) and "layer.0." in n)
    assert names == ["attention.output.dense", "attention.self.key", "attention.self.query", "attention.self.value"]
    assert all(not isinstance(m, BinaryLinear) for n, m in bert.module.named_modules() if "pooler" in n)
    report = bert.info["transforms"][0]
    assert report["linears"] == 8 and report["binary_weights"] == 8 * 32 * 32


def test_settings_are_checked():
    for bad, fragment in (([{"name": "binary-attention", "beta": 1.5}], "outside"),
                          ([{"name": "binary-attention", "beta": "high"}], "not a number"),
                          ([{"name": "binary-attention", "scale": "yes"}], "true or false"),
                          ([{"name": "binary-weights", "targets": "heads"}], "unknown binarization targets"),
                          ([{"name": "binary-weights", "bits": 1}], "does not take"),
                          ([{"name": "clipped-softmax", "gamma": -0.01}, {"name": "binary-attention"}],
                           "does not combine")):
        with pytest.raises(UserError, match=fragment):
            tiny_vit(bad)


def test_stages_switch_between_full_precision_and_binary():
    images = tiny_vit().example_feeds(batch=3)
    fp = tiny_vit().run_torch(images)
    binary = tiny_vit(FULL)
    full = binary.run_torch(images)
    assert set_binarization_stage(binary.module, "none") == {
        "stage": "none", "attention": 0, "attention_total": 2, "linears": 0, "linears_total": 8}
    # Full precision again: timm's fused attention and the core's matmul/softmax differ by fp32 rounding.
    np.testing.assert_allclose(binary.run_torch(images), fp, atol=1e-5)
    report = set_binarization_stage(binary.module, "attention")
    assert report["attention"] == 2 and report["linears"] == 4
    assert {m.part for m in binary_linears(binary.module) if m.enabled} == {"attention"}
    stage1 = tiny_vit([{"name": "binary-attention"}, {"name": "binary-weights", "targets": "attention"},
                       {"name": "binary-activations", "targets": "attention"}])
    np.testing.assert_array_equal(binary.run_torch(images), stage1.run_torch(images))
    set_binarization_stage(binary.module, "all")
    np.testing.assert_array_equal(binary.run_torch(images), full)
    with pytest.raises(UserError, match="unknown binarization stage"):
        set_binarization_stage(binary.module, "mlp")
    with pytest.raises(UserError, match="no binary modules"):
        set_binarization_stage(tiny_vit().module, "all")


def test_two_stage_training_and_checkpoints(tmp_path):
    from deploykit.data import DataSpec, make_splits
    from deploykit.train import TrainSpec, save_checkpoint, train

    fp = tiny_vit()
    save_checkpoint(fp, tmp_path / "fp.safetensors")
    # A full-precision checkpoint loads into the binary model; scales start from its weights.
    vit = tiny_vit(FULL, checkpoint=str(tmp_path / "fp.safetensors"))
    keys = set(vit.module.state_dict())
    assert keys - set(fp.module.state_dict()) == {f"blocks.{i}.{n}.weight_scale" for i in (0, 1)
                                                  for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    splits = make_splits(vit, DataSpec(source="digits", calibration=8, evaluation=16, training=64))
    spec = TrainSpec(enabled=True, epochs=1, max_steps=2, batch_size=16, lr=1e-3)
    fc1 = vit.module.blocks[0].mlp.fc1
    qkv = vit.module.blocks[0].attn.qkv
    set_binarization_stage(vit.module, "attention")
    before = fc1.weight_scale.detach().clone()
    train(vit, splits.training, spec)                             # stage 1: attention binary, MLP float
    assert torch.equal(fc1.weight_scale, before)                  # a disabled scale gets no gradient
    moved = fc1.weight.detach().clone()
    set_binarization_stage(vit.module, "all")                     # stage 2: scales restart from trained weights
    torch.testing.assert_close(fc1.weight_scale.detach(), (moved - moved.mean(1, keepdim=True)).abs().mean(1))
    qkv_scale = qkv.weight_scale.detach().clone()
    result = train(vit, splits.training, spec, checkpoint=tmp_path / "bin.safetensors")
    assert np.isfinite(result.final_loss) and not torch.equal(qkv.weight_scale, qkv_scale)
    again = tiny_vit(FULL, checkpoint=str(tmp_path / "bin.safetensors"))
    images = splits.evaluation.feeds
    np.testing.assert_array_equal(again.run_torch(images), vit.run_torch(images))


# ----------------------------------------------------------------------------- export
def _linear_inputs(module: nn.Module) -> tuple[list[torch.Tensor], list]:
    inputs: list[torch.Tensor] = []
    handles = [m.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().clone()))
               for m in binary_linears(module)]
    return inputs, handles


def test_binary_vit_exports_exactly(tmp_path):
    from deploykit.export import export_onnx

    vit = tiny_vit(FULL)
    torch.manual_seed(5)
    with torch.no_grad():
        for block in vit.module.blocks:
            block.attn.qkv.weight_scale.mul_(20.0)     # logits large enough for a non-trivial pattern
            # Trained-like biases. With timm's zero biases a binary layer's outputs lie on a
            # lattice of s_c, sums over kept keys are often exactly 0 in exact arithmetic, and
            # the sign of their +-1 ulp rounding residue depends on the summation order.
            for m in binary_linears(block):
                m.bias.normal_(0.0, 0.1)
    result = export_onnx(vit, tmp_path / "vit.onnx")
    # Same float arithmetic in both: only the summation order inside MatMul differs (MLAS vs
    # torch's CPU kernels), a few ulp per layer on logits of order 1.
    assert result.parity["max_abs_diff"] < 1e-5
    model = onnx.load(str(tmp_path / "vit.onnx"))
    assert not any(n.op_type in ("Sign", "Softmax", "Exp") for n in model.graph.node)
    # Expose the attention patterns (And), their inputs and the activations' sign tests.
    producers = {o: n for n in model.graph.node for o in n.output}
    ands = [n for n in model.graph.node if n.op_type == "And"]
    scores = [producers[n.input[0]].input[0] for n in ands]                  # And(GreaterOrEqual(x, thr), valid)
    signs = [n for n in model.graph.node if n.op_type == "GreaterOrEqual"
             and any(c.op_type == "Where" for c in model.graph.node if n.output[0] in c.input)]
    acts = [n.input[0] for n in signs]
    assert len(ands) == 2 and len(signs) == 8
    conversions = binarize_initializers(model)
    assert len(conversions) == 8 and {c["axis"] for c in conversions} == {1}
    onnx.checker.check_model(model, full_check=True)
    for names, elem in (([n.output[0] for n in ands], TensorProto.BOOL), (scores + acts, TensorProto.FLOAT)):
        model.graph.output.extend(helper.make_tensor_value_info(n, elem, None) for n in names)
    onnx.save(model, str(tmp_path / "vit.int8.onnx"))
    # The int8 weights are torch's signs, the scales torch's |s|, one conversion per binary linear.
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    torch_weights = [(m.signs().numpy(), m.weight_scale.detach().abs().numpy()) for m in binary_linears(vit.module)]
    matched = 0
    for c in conversions:
        q, s = inits[dq[c["name"]].input[0]], inits[dq[c["name"]].input[1]]
        assert q.dtype == np.int8 and set(np.unique(q)) == {-1, 1}
        matched += sum(np.array_equal(q.T, tq) and np.array_equal(s, ts) for tq, ts in torch_weights)
    assert matched == 8
    # ORT on the int8 graph (exact session config) equals ORT on the float graph bit for bit.
    feeds = vit.example_feeds(batch=4)
    names = [o.name for o in model.graph.output]
    ort_int8 = dict(zip(names, ort_session(tmp_path / "vit.int8.onnx", ORT_EXACT_SESSION_CONFIG).run(None, feeds)))
    float_out = ort_session(tmp_path / "vit.onnx").run(None, feeds)[0]
    np.testing.assert_array_equal(ort_int8[names[0]], float_out)
    # Torch's binary patterns: attention masks and activation signs.
    inputs, handles = _linear_inputs(vit.module)
    torch_scores: list[torch.Tensor] = []
    handles += [m.register_forward_pre_hook(lambda m, args: torch_scores.append(args[0].detach().clone()))
                for m in binary_attention_modules(vit.module)]
    try:
        with recording_attention(vit.module, keep_pattern=True) as modules:
            torch_out = vit.run_torch(feeds)
    finally:
        for h in handles:
            h.remove()
    np.testing.assert_allclose(ort_int8[names[0]], torch_out, atol=1e-5)      # as the parity above
    density = attention_density(vit.module)["density"]
    assert 0.05 < density < 0.95                                             # a pattern, not all ones
    c = math.log(4.0)
    for i, m in enumerate(modules):
        ort_scores = ort_int8[scores[i]]
        ref = torch_scores[i].numpy()
        # Both sides compute the pattern exactly from their scores; the scores differ by
        # float rounding only, far less than the closest logit's distance to the threshold,
        # so no entry can flip and the patterns must be identical.
        gap = np.abs(ref - (ref.max(-1, keepdims=True) - c)).min()
        assert np.abs(ort_scores - ref).max() * 4 < gap
        np.testing.assert_array_equal(ort_int8[ands[i].output[0]], m.last_pattern.numpy())
    for i, x in enumerate(inputs):
        ort_x = ort_int8[acts[i]]
        assert np.abs(ort_x - x.numpy()).max() * 4 < np.abs(x.numpy()).min()
        np.testing.assert_array_equal(ort_x >= 0, x.numpy() >= 0)


def test_binarize_initializers_reads_every_weight_layout():
    rng = np.random.default_rng(0)

    def binary(shape, axis):
        signs = rng.choice([-1.0, 1.0], size=shape).astype(np.float32)
        scale = rng.uniform(0.1, 2.0, size=shape[axis]).astype(np.float32)
        return signs * np.expand_dims(scale, 1 - axis)

    w = {"w1": binary((16, 8), 1),          # MatMul [in, out]
         "w2": binary((16, 8), 0),          # Gemm transB=1: [out, in]
         "w3": binary((16, 8), 1),          # Gemm: [in, out]
         "w4": binary((16, 8), 0),          # Transpose -> MatMul: [out, in]
         "w5": binary((16, 8), 1),          # one element off by one ulp: not binary
         "w6": binary((8, 8), 1)}           # also read as a plain tensor: left alone
    w["w5"][3, 2] = np.nextafter(w["w5"][3, 2], np.float32(0))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]),
             helper.make_node("Gemm", ["a", "w2"], ["b"], transB=1),
             helper.make_node("Gemm", ["b", "w3"], ["c"]),
             helper.make_node("Transpose", ["w4"], ["w4t"], perm=[1, 0]),
             helper.make_node("MatMul", ["c", "w4t"], ["d"]),
             helper.make_node("MatMul", ["d", "w5"], ["e"]),
             helper.make_node("MatMul", ["e", "w6"], ["y"]),
             helper.make_node("Identity", ["w6"], ["w6_out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8]),
                               helper.make_tensor_value_info("w6_out", TensorProto.FLOAT, [8, 8])],
                              [numpy_helper.from_array(v, k) for k, v in w.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    done = binarize_initializers(model)
    assert {c["name"]: c["axis"] for c in done} == {"w1": 1, "w2": 0, "w3": 1, "w4": 0}
    onnx.checker.check_model(model, full_check=True)
    x = {"x": rng.standard_normal((5, 16)).astype(np.float32)}
    ref = ort_session(reference.SerializeToString()).run(None, x)
    for config in (ORT_EXACT_SESSION_CONFIG, {"session.disable_quant_qdq": "1"}):
        out = ort_session(model.SerializeToString(), config).run(None, x)
        for a, b in zip(out, ref):
            np.testing.assert_array_equal(a, b)


def test_bert_binary_attention_exports_with_parity(tiny_bundle, tmp_path):
    from deploykit.export import export_onnx
    from deploykit.models import load_model

    # Random-init BERT logits spread over ~0.01: beta 0.99 (threshold 0.01 below the row
    # maximum) gives a partial pattern rather than all ones.
    bert = load_model(tiny_bundle.source, {"max_length": 64, "transforms": [{"name": "binary-attention", "beta": 0.99}]})
    feeds = tiny_bundle.preprocessor(["padding must not change this sentence", "short"])
    n = int(feeds["attention_mask"][0].sum())
    with recording_attention(bert.module):
        short = bert.run_torch({k: v[:, :n] for k, v in feeds.items()})
    assert 0.05 < attention_density(bert.module)["density"] < 0.95
    # Padded keys are never selected: extra padding leaves every embedding unchanged.
    np.testing.assert_array_equal(short, bert.run_torch({k: v[:, :n + 9] for k, v in feeds.items()}))
    result = export_onnx(bert, tmp_path / "bert.onnx")
    assert result.parity["max_abs_diff"] < 1e-5                  # fp32 summation order
    ops = {node.op_type for node in onnx.load(str(tmp_path / "bert.onnx")).graph.node}
    assert "Softmax" not in ops and "ReduceMax" in ops


# ----------------------------------------------------------------------------- sizes and counts
def test_model_stats_match_hand_counts():
    # Tiny ViT: 16x16 image, 4x4 patches -> 16 patches + cls = T = 17 tokens, width 32,
    # 4 heads of 8, MLP 64, 2 blocks, 10 classes. Batch of one.
    fp = tiny_vit()
    image = torch.from_numpy(fp.example_feeds(batch=1)["pixel_values"])
    per_block_params = 64 + (32 * 96 + 96) + (32 * 32 + 32) + 64 + (32 * 64 + 64) + (64 * 32 + 32)   # 8544
    params = 32 + 17 * 32 + (32 * 16 + 32) + 2 * per_block_params + 64 + (32 * 10 + 10)           # 18602
    conv = 16 * 32 * 16                          # 16 positions x 32 channels x (1 x 4 x 4)
    qkv, proj, fc1, fc2 = 17 * 32 * 96, 17 * 32 * 32, 17 * 32 * 64, 17 * 64 * 32
    qk = av = 4 * 17 * 17 * 8
    head = 32 * 10
    stats = model_stats(fp.module, image)
    assert stats["parameters"] == params and stats["float_bytes"] == stats["packed_bytes"] == 4 * params
    assert stats["bops"] == 0 and stats["binary_weights"] == 0
    assert stats["flops"] == conv + 2 * (qkv + proj + fc1 + fc2 + qk + av) + head == stats["ops"]
    # Binary MLP (weights and activations) and binary attention.
    vit = tiny_vit([{"name": "binary-attention"}, {"name": "binary-weights"}, {"name": "binary-activations"}])
    with torch.no_grad():
        for block in vit.module.blocks:
            block.attn.qkv.weight.mul_(20.0)
    with recording_attention(vit.module):
        stats = model_stats(vit.module, image)
    kept = sum(layer["ones_per_row"] * layer["rows"] for layer in attention_density(vit.module)["layers"])
    assert 0 < kept < 2 * 4 * 17 * 17
    scales = 2 * (64 + 32)
    binary = 2 * (32 * 64 + 64 * 32)
    assert stats["parameters"] == params + scales and stats["binary_weights"] == binary and stats["scales"] == scales
    assert stats["packed_bytes"] == binary // 8 + 4 * (params + scales - binary)
    assert stats["bops"] == 2 * (fc1 + fc2)
    adds = int(kept) * 8                         # one addition per kept key and value channel
    assert stats["breakdown"]["attention_av_adds"] == adds
    assert stats["flops"] == conv + 2 * (qkv + proj + qk) + adds + head
    assert stats["ops"] == stats["bops"] / 64 + stats["flops"]
    # Binary weights with float inputs: still FLOPs (BOPs need both operands binary).
    weights_only = model_stats(tiny_vit([{"name": "binary-weights"}]).module, image)
    assert weights_only["bops"] == 0 and weights_only["breakdown"]["linear_binary_weight_flops"] == 2 * (fc1 + fc2)


def test_onnx_file_stats_count_the_int8_weights(tmp_path):
    from deploykit.export import export_onnx

    vit = tiny_vit([{"name": "binary-weights"}])
    export_onnx(vit, tmp_path / "vit.onnx", parity_feeds=[vit.example_feeds(batch=1)])
    before = onnx_file_stats(tmp_path / "vit.onnx")
    model = onnx.load(str(tmp_path / "vit.onnx"))
    done = binarize_initializers(model)
    onnx.save(model, str(tmp_path / "vit.int8.onnx"))
    after = onnx_file_stats(tmp_path / "vit.int8.onnx")
    assert before["int8_initializers"] == 0 and after["int8_initializers"] == len(done) == 4
    assert after["dequantize_nodes"] == 4 and after["int8_initializer_bytes"] == 2 * (32 * 64 + 64 * 32)
    # Each [in, out] float weight (4 bytes/element) becomes int8 (1 byte) + a float per channel.
    saved = sum(3 * c["shape"][0] * c["shape"][1] - 4 * c["channels"] for c in done)
    assert before["initializer_bytes"] - after["initializer_bytes"] == saved
    assert after["file_bytes"] < before["file_bytes"]
