"""2:4 weight sparsity, top-k attention and head pruning: masks, training, export, stats."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from deploykit.errors import UserError
from test_attention_recipes import TINY_VIT, tiny_vit  # the tiny ViT every transform test builds
from deploykit.recipes.attention import attention_modules
from deploykit.recipes.sparsify import Sparse24Linear, TopKAttention, mask_2_4, prune_heads, step_sparsity
from deploykit.sparsity import (
    attention_sparsity,
    check_2_4,
    head_importance,
    is_2_4_compliant,
    parameter_counts,
    plan_head_pruning,
    record_attention_sparsity,
    weight_sparsity,
)

FMIN = torch.finfo(torch.float32).min


def tiny_bert(bundle, transforms):
    from deploykit.models import load_model

    return load_model(bundle.source, {"max_length": 64, "transforms": transforms})


def sparse_layers(module):
    return {n: m for n, m in module.named_modules() if isinstance(m, Sparse24Linear)}


def groups(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] -> zeros per group of 4 along in."""
    return (weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1)


# ============================================================================= 2:4 masks
def test_mask_is_2_4_and_keeps_the_two_largest_magnitudes():
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    mask = mask_2_4(w)
    assert mask.dtype == w.dtype and set(mask.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(groups(w * mask), torch.full((16, 8), 2))          # exactly 2 zeros per group
    kept = (mask.reshape(16, 8, 4) == 1)
    top2 = torch.zeros_like(kept).scatter_(-1, w.abs().reshape(16, 8, 4).topk(2, dim=-1).indices, True)
    assert torch.equal(kept, top2)                                          # the two largest |w| survive
    assert is_2_4_compliant(w * mask) and not is_2_4_compliant(w)
    assert not is_2_4_compliant((w * mask).t())                             # groups run along the input dim
    # Gradual levels: nested, never more than 2 zeros per group, 1.0 is the full pattern.
    previous = torch.ones_like(w)
    for fraction in (0.0, 0.25, 0.5, 0.9, 1.0):
        m = mask_2_4(w * previous, fraction)
        assert int((m == 0).sum()) == round(fraction * w.numel() / 2)
        assert bool((m <= previous).all()) and int(groups(w * m).max()) <= 2
        previous = m
    assert torch.equal(previous, mask)


def test_targets_pick_block_linears_only(tiny_bundle):
    vit = tiny_vit([{"name": "sparse-2-4"}])
    assert sorted(sparse_layers(vit.module)) == [f"blocks.{i}.mlp.{f}" for i in range(2) for f in ("fc1", "fc2")]
    vit_all = tiny_vit([{"name": "sparse-2-4", "targets": "all"}])
    assert len(sparse_layers(vit_all.module)) == 8 and "head" not in sparse_layers(vit_all.module)
    vit_attn = tiny_vit([{"name": "sparse-2-4", "targets": "attention"}])
    assert sorted(sparse_layers(vit_attn.module)) == sorted(f"blocks.{i}.attn.{f}" for i in range(2) for f in ("qkv", "proj"))
    bert = tiny_bert(tiny_bundle, [{"name": "sparse-2-4", "targets": "all"}])
    names = sorted(sparse_layers(bert.module))
    assert len(names) == 12 and not any("pooler" in n or "embeddings" in n for n in names)
    assert "model.encoder.layer.0.attention.output.dense" in names and "model.encoder.layer.1.output.dense" in names
    # Same parameter names and shapes as the dense model: dense weights and checkpoints load.
    dense = tiny_vit()
    assert {k: v.shape for k, v in vit_all.module.state_dict().items()} == \
        {k: v.shape for k, v in dense.module.state_dict().items()}
    for bad, fragment in (({"targets": "ffn"}, "targets"), ({"schedule": "gradual"}, "steps"),
                          ({"schedule": "cosine"}, "schedule"), ({"every": 3}, "does not take")):
        with pytest.raises(UserError, match=fragment):
            tiny_vit([{"name": "sparse-2-4", **bad}])


def test_masks_hold_through_training_and_checkpoints(tmp_path):
    from safetensors.torch import save_file

    from deploykit.models import load_model

    transforms = [{"name": "sparse-2-4", "targets": "all"}]
    vit = tiny_vit(transforms)
    layers = sparse_layers(vit.module)
    before = {n: (m.weight.detach() != 0) for n, m in layers.items()}
    module = vit.module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(module(x), y)
        optimizer.zero_grad()
        loss.backward()
        for n, m in layers.items():                     # masked weights get no gradient
            assert torch.count_nonzero(m.weight.grad[~before[n]]) == 0
        optimizer.step()
    module.eval()
    for n, m in layers.items():
        assert torch.equal(m.weight.detach() != 0, before[n]), n     # same pattern, masked values exactly 0
        assert torch.equal(groups(m.weight.detach()), torch.full_like(groups(m.weight.detach()), 2))
    moved = layers["blocks.0.mlp.fc1"].weight.detach()
    assert not torch.equal(moved, tiny_vit(transforms).module.blocks[0].mlp.fc1.weight)   # it did train
    # A checkpoint of the trained model loads into a model built with the same transforms,
    # whose masks are recomputed from the loaded (2:4) weights.
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(tmp_path / "sparse.safetensors"))
    again = load_model("timm:vit_tiny_patch16_224", {**TINY_VIT, "transforms": transforms,
                                                     "checkpoint": str(tmp_path / "sparse.safetensors")})
    images = vit.example_feeds(batch=3)
    np.testing.assert_array_equal(again.run_torch(images), vit.run_torch(images))
    for n, m in sparse_layers(again.module).items():
        assert torch.equal(m.weight_mask != 0, before[n])


def test_gradual_schedule_follows_optimizer_steps_and_deploykit_training():
    from deploykit.data import DataSpec, make_splits
    from deploykit.train import TrainSpec, train

    vit = tiny_vit([{"name": "sparse-2-4", "schedule": "gradual", "steps": 4}])
    layers = list(sparse_layers(vit.module).values())
    assert all(torch.count_nonzero(m.weight) == m.weight.numel() for m in layers)       # starts dense
    splits = make_splits(vit, DataSpec(source="digits", calibration=8, evaluation=8, training=64))
    train(vit, splits.training, TrainSpec(enabled=True, max_steps=2, batch_size=16, lr=1e-3))
    half = [float((m.weight == 0).float().mean()) for m in layers]
    assert all(m.step_count == 2 for m in layers)
    assert all(0.0 < s < 0.5 for s in half) and all(int(groups(m.weight).max()) <= 2 for m in layers)
    train(vit, splits.training, TrainSpec(enabled=True, max_steps=3, batch_size=16, lr=1e-3))
    for m in layers:                                   # past the 4 steps: exactly 2:4, and it stays so
        assert m.step_count == 4 and is_2_4_compliant(m.weight)
        assert torch.equal(groups(m.weight), torch.full_like(groups(m.weight), 2))
    stats = weight_sparsity(vit.module)
    assert stats["two_four_layers"] == 4 and stats["layers"][-1]["name"] == "head"
    # Manual driving: no optimizer involved.
    manual = tiny_vit([{"name": "sparse-2-4", "schedule": "gradual", "steps": 3, "drive": "manual"}])
    assert step_sparsity(manual.module, 3) == 1.0
    assert all(is_2_4_compliant(m.weight) for m in sparse_layers(manual.module).values())
    # Driven by a train loop's on_train_step call instead: optimizer steps alone do not advance it.
    looped = tiny_vit([{"name": "sparse-2-4", "schedule": "gradual", "steps": 2, "drive": "train-loop"}])
    fc1 = looped.module.blocks[0].mlp.fc1
    torch.optim.SGD(looped.module.parameters(), lr=0.0).step()
    assert fc1.step_count == 0
    for step in (1, 2):
        for m in looped.module.modules():
            if callable(getattr(m, "on_train_step", None)):
                m.on_train_step(step, 2)
    assert fc1.step_count == 2 and is_2_4_compliant(fc1.weight)
    fresh = tiny_vit([{"name": "sparse-2-4", "schedule": "gradual", "steps": 4}]).module.blocks[0].mlp.fc1
    fresh.on_train_step(1, 4)
    assert fresh.step_count == 0                        # optimizer-driven layers ignore on_train_step
    copied = copy.deepcopy(vit.module)                 # a copy is still held by the optimizer hook
    m = next(m for m in copied.modules() if isinstance(m, Sparse24Linear))
    opt = torch.optim.SGD([m.weight], lr=1.0)
    m.weight.grad = torch.ones_like(m.weight)
    opt.step()
    assert is_2_4_compliant(m.weight)


# ============================================================================= 2:4 in ONNX
def _onnx_with(nodes, inits):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(a, n) for n, a in inits.items()])
    return helper.make_model(graph)


def test_check_2_4_reads_every_weight_layout():
    torch.manual_seed(0)
    w = torch.randn(4, 8)                                     # torch layout [out, in]
    sparse = (w * mask_2_4(w)).numpy()
    dense = w.numpy()
    quantized = np.round(sparse.T * 20).astype(np.int8)
    cases = {   # each weight is 2:4 along its reduction dim; the same array transposed is not
        "matmul [in, out]": ([helper.make_node("MatMul", ["x", "W"], ["y"])], {"W": sparse.T}),
        "gemm transB=1": ([helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)], {"W": sparse}),
        "gemm transB=0": ([helper.make_node("Gemm", ["x", "W"], ["y"])], {"W": sparse.T}),
        "matmul A [out, in]": ([helper.make_node("MatMul", ["W", "x"], ["y"])], {"W": sparse}),
        "transposed": ([helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
                        helper.make_node("MatMul", ["x", "Wt"], ["y"])], {"W": sparse}),
        "dequantized": ([helper.make_node("DequantizeLinear", ["W", "s"], ["Wd"]),
                         helper.make_node("MatMul", ["x", "Wd"], ["y"])], {"W": quantized, "s": np.float32(0.05)}),
    }
    assert is_2_4_compliant(quantized, axis=0)
    for name, (nodes, inits) in cases.items():
        report = check_2_4(_onnx_with(nodes, inits))
        assert report["total"] == 1 and report["compliant"] == 1, name
        assert report["initializers"][0]["sparsity"] == 0.5 and is_2_4_compliant(report)
        wrong = {k: (np.ascontiguousarray(v.T) if v.ndim == 2 else v) for k, v in inits.items()}
        assert check_2_4(_onnx_with(nodes, wrong))["non_compliant"] == 1, name
    dense_model = _onnx_with([helper.make_node("MatMul", ["x", "W"], ["y"])], {"W": dense.T})
    assert check_2_4(dense_model)["initializers"][0]["compliant_groups"] == 0 and not is_2_4_compliant(dense_model)
    odd = check_2_4(_onnx_with([helper.make_node("MatMul", ["x", "W"], ["y"])], {"W": np.zeros((6, 4), np.float32)}))
    assert odd["non_compliant"] == 1 and "multiple of 4" in odd["initializers"][0]["reason"]


def test_exported_vit_weights_are_exactly_2_4(tmp_path):
    from deploykit.export import export_onnx

    vit = tiny_vit([{"name": "sparse-2-4"}])                  # mlp only
    result = export_onnx(vit, tmp_path / "vit.onnx")
    assert result.parity["max_abs_diff"] < 1e-5
    model = onnx.load(str(tmp_path / "vit.onnx"))
    report = check_2_4(model)
    rows = {r["name"]: r for r in report["initializers"]}
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    layouts = set()
    for name, linear in vit.module.named_modules():
        if not isinstance(linear, torch.nn.Linear):
            continue
        w = linear.weight.detach().numpy()
        match = [(k, op) for k, r in rows.items() for op in [r["op"]]
                 if inits[k].shape == w.T.shape and op == "MatMul" and np.array_equal(inits[k], w.T)
                 or inits[k].shape == w.shape and op == "Gemm" and np.array_equal(inits[k], w)]
        assert len(match) == 1, name
        layouts.add(match[0][1])
        targeted = isinstance(linear, Sparse24Linear)
        assert rows[match[0][0]]["compliant"] is targeted, name          # mlp 2:4; qkv, proj, head dense
        if targeted:
            assert rows[match[0][0]]["sparsity"] == 0.5                    # masked values exactly 0 in the file
    assert layouts == {"MatMul", "Gemm"}          # [in, out] MatMul weights and the head's Gemm(transB=1)
    assert report["compliant"] == 4 and report["non_compliant"] == 5


# ============================================================================= top-k attention
def reference_topk(scores: np.ndarray, allowed: np.ndarray, k: int | None, ratio: float | None) -> np.ndarray:
    """Row by row: sort the scores, take the k-th value, keep real keys >= it, softmax."""
    out = np.zeros_like(scores, dtype=np.float64)
    for idx in np.ndindex(*scores.shape[:-1]):
        row, ok = scores[idx].astype(np.float64), allowed[idx]
        real = int(ok.sum())
        if k is not None:
            kk = min(k, row.size)
        else:
            kk = int(min(max(1, int(np.ceil(ratio * real - 1e-9))), row.size))
        threshold = np.sort(row)[::-1][kk - 1]
        keep = (row >= threshold) & (ok if real else True)
        e = np.where(keep, np.exp(row - row[keep].max()), 0.0)
        out[idx] = e / e.sum()
    return out


@pytest.mark.parametrize("k,ratio", [(1, None), (3, None), (20, None), (None, 0.3), (None, 1.0)])
def test_topk_matches_a_sort_based_reference(k, ratio):
    torch.manual_seed(0)
    b, h, t = 2, 3, 9
    raw = torch.randn(b, h, t, t)
    raw[0, 0, 0, :4] = 2.0                                  # ties at the top of one row
    additive = torch.zeros(b, 1, 1, t)
    additive[0, ..., 5:] = FMIN                             # sentence 0 has 5 real keys
    causal = torch.ones(t, t, dtype=torch.bool).tril()      # row i has i + 1 real keys
    for mask in (None, additive, causal):
        module = TopKAttention(k=k, ratio=ratio)
        if mask is None:
            scores, allowed = raw, torch.ones(b, h, t, t, dtype=torch.bool)
        elif mask.dtype == torch.bool:
            scores, allowed = raw.masked_fill(~mask, FMIN), mask.expand(b, h, t, t)
        else:
            scores, allowed = raw + mask, (mask > FMIN / 2).expand(b, h, t, t)
        probs = module(scores, mask)
        expected = reference_topk(scores.numpy(), allowed.numpy(), k, ratio)
        np.testing.assert_allclose(probs.numpy(), expected, atol=1e-6)      # fp32 vs fp64 softmax
        assert torch.all(probs[~allowed] == 0)                               # padding never kept
        if k == 1 and mask is None:
            assert torch.count_nonzero(probs[0, 0, 0]) == 4                  # all four tied maxima kept


def test_topk_exports_with_a_dynamic_k(tmp_path):
    import onnxruntime as ort

    class Wrapper(torch.nn.Module):
        def __init__(self, **kw):
            super().__init__()
            self.topk = TopKAttention(**kw)

        def forward(self, scores, mask):
            return self.topk(scores + mask, mask)

    for kw in ({"k": 8}, {"ratio": 0.4}):
        module = Wrapper(**kw).eval()
        seq = torch.export.Dim("seq", min=2, max=64)
        mask = torch.zeros(2, 1, 1, 10)
        mask[1, ..., 6:] = FMIN
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, (torch.randn(2, 2, 10, 10), mask), dynamo=True, verbose=False,
                                        dynamic_shapes=({2: seq, 3: seq}, {3: seq}), optimize=True)
        proto = program.model_proto
        ops = {n.op_type for n in proto.graph.node}
        assert "TopK" in ops and "Softmax" in ops and {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        for t in (5, 13):                                  # k = 8 > 5 keys: every key kept
            scores = torch.randn(2, 2, t, t)
            mask = torch.zeros(2, 1, 1, t)
            mask[1, ..., t - 2:] = FMIN
            got = session.run(None, dict(zip(names, (scores.numpy(), mask.numpy()))))[0]
            want = module(scores, mask).numpy()
            np.testing.assert_allclose(got, want, atol=1e-6)
            assert np.array_equal(got == 0, want == 0)                      # the same keys dropped


def test_topk_models_export_and_record_sparsity(tmp_path, tiny_bundle):
    from deploykit.export import export_onnx

    vit = tiny_vit([{"name": "topk-attention", "k": 4}])
    assert export_onnx(vit, tmp_path / "vit.onnx").parity["max_abs_diff"] < 1e-5   # fp32 summation order
    with record_attention_sparsity(vit.module):
        vit.run_torch(vit.example_feeds(batch=3))
    stats = attention_sparsity(vit.module)
    assert [r["layer"] for r in stats["layers"]] == [0, 1]
    for row in stats["layers"]:                            # 17 tokens, 4 kept: 13/17 zeros in every head
        assert len(row["heads"]) == 4 and all(v == pytest.approx(13 / 17) for v in row["heads"])
    assert not any(m.core.prob_fn.recording for m in attention_modules(vit.module))
    bert = tiny_bert(tiny_bundle, [{"name": "topk-attention", "k": 6}])
    result = export_onnx(bert, tmp_path / "bert.onnx")      # parity at sequence 16 and 23 (dynamic)
    assert result.parity["max_abs_diff"] < 1e-5
    assert [b["shape"][1] for b in result.parity["batches"]] == [16, 23]
    # A sentence keeps the same keys however much padding follows it.
    feeds = tiny_bundle.preprocessor(["top k attention ignores padding entirely", "short"])
    n = int(feeds["attention_mask"][0].sum())
    for transforms in ([{"name": "topk-attention", "k": 4}], [{"name": "topk-attention", "ratio": 0.5}]):
        model = tiny_bert(tiny_bundle, transforms)
        np.testing.assert_allclose(model.run_torch({k: v[:, :n] for k, v in feeds.items()}),
                                   model.run_torch({k: v[:, :n + 7] for k, v in feeds.items()}), atol=1e-6)
    with record_attention_sparsity(bert.module):
        bert.run_torch(feeds)
    assert all(0 < v < 1 for row in attention_sparsity(bert.module)["layers"] for v in row["heads"])
    for bad, fragment in (({}, "exactly one"), ({"k": 0}, "k must"), ({"ratio": 1.5}, "outside")):
        with pytest.raises(UserError, match=fragment):
            tiny_vit([{"name": "topk-attention", **bad}])
    with pytest.raises(UserError, match="does not combine"):
        tiny_vit([{"name": "clipped-softmax", "gamma": -0.01}, {"name": "topk-attention", "k": 2}])


# ============================================================================= head pruning
class zeroed_heads:
    """Multiply the listed heads' context by 0 (the reference a pruned model must equal)."""

    def __init__(self, module, plan):
        self.handles = []
        for i, m in enumerate(attention_modules(module)):
            scale = torch.ones(m.core.num_heads)
            scale[plan.get(i, [])] = 0.0
            self.handles.append(m.core.register_forward_hook(
                lambda _m, _i, out, s=scale: out * s.view(1, -1, 1, 1)))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def test_pruned_vit_equals_zeroed_heads_and_exports(tmp_path):
    from deploykit.export import export_onnx

    plan = {0: [1, 3], 1: [0]}
    dense = tiny_vit([{"name": "topk-attention", "k": 17}])          # swapped, otherwise dense
    pruned = tiny_vit([{"name": "topk-attention", "k": 17}, {"name": "head-pruning", "heads": plan}])
    report = pruned.info["transforms"][1]
    assert report["heads_left"] == [2, 3] and report["heads"] == plan
    attn0, attn1 = attention_modules(pruned.module)
    assert attn0.qkv.weight.shape == (3 * 2 * 8, 32) and attn0.qkv.bias.shape == (48,)
    assert attn0.proj.weight.shape == (32, 16) and attn1.proj.weight.shape == (32, 24)
    assert (attn0.num_heads, attn0.core.num_heads, attn0.attn_dim, attn0.head_ids) == (2, 2, 16, [0, 2])
    # D = 32, d = 8: a head owns 3 (d D + d) qkv parameters and D d of the projection.
    per_head = 3 * (8 * 32 + 8) + 32 * 8
    assert report["parameters_removed"] == 3 * per_head
    assert parameter_counts(dense.module)["parameters"] - parameter_counts(pruned.module)["parameters"] == 3 * per_head
    assert [r["heads"] for r in parameter_counts(pruned.module)["layers"]] == [2, 3]
    images = dense.example_feeds(batch=4)
    with zeroed_heads(dense.module, plan):
        reference = dense.run_torch(images)
    # Zeroed heads add exact zeros; the shorter matmuls only sum the same products in
    # another order, so fp32 rounding is all that differs.
    np.testing.assert_allclose(pruned.run_torch(images), reference, atol=1e-5)
    assert np.abs(pruned.run_torch(images) - dense.run_torch(images)).max() > 1e-3
    assert export_onnx(pruned, tmp_path / "pruned.onnx").parity["max_abs_diff"] < 1e-5
    model = onnx.load(str(tmp_path / "pruned.onnx"))
    shapes = sorted(tuple(i.dims) for i in model.graph.initializer if len(i.dims) == 2)
    assert (32, 48) in shapes and (16, 32) in shapes                  # the qkv and proj MatMuls shrank
    for bad, fragment in (({"heads": {0: [0, 1, 2, 3]}}, "every head"), ({"heads": {0: [4]}}, "heads 0..3"),
                          ({"heads": {5: [0]}}, "layers 0..1"), ({"prune": 1, "ratio": 0.5}, "exactly one"),
                          ({"prune": 2, "importance": "gradient"}, "calibration data")):
        with pytest.raises(UserError, match=fragment):
            tiny_vit([{"name": "head-pruning", **bad}])


def test_pruned_bert_equals_zeroed_heads_and_exports(tmp_path, tiny_bundle):
    from deploykit.export import export_onnx

    plan = {0: [1]}
    pruned = tiny_bert(tiny_bundle, [{"name": "topk-attention", "k": 64}, {"name": "head-pruning", "heads": {"0": [1]}}])
    self0 = attention_modules(pruned.module)[0]
    assert self0.query.weight.shape == (16, 32) and self0.value.bias.shape == (16,)
    assert pruned.module.model.encoder.layer[0].attention.output.dense.weight.shape == (32, 16)
    assert self0.num_attention_heads == 1 and self0.core.num_heads == 1 and self0.all_head_size == 16
    reference = copy.deepcopy(tiny_bundle)
    from deploykit.recipes.attention import swap_all

    swap_all(reference.module)
    feeds = tiny_bundle.example_feeds(batch=3, seq=11)
    with zeroed_heads(reference.module, plan):
        expected = reference.run_torch(feeds)
    np.testing.assert_allclose(pruned.run_torch(feeds), expected, atol=1e-5)     # fp32 summation order
    assert pruned.info["transforms"][1]["parameters_removed"] == 3 * (16 * 32 + 16) + 32 * 16
    assert export_onnx(pruned, tmp_path / "bert.onnx").parity["max_abs_diff"] < 1e-5


def test_head_importance_finds_a_dead_head_and_plans_the_transform(tmp_path, tiny_bundle):
    from safetensors.torch import save_file

    from deploykit.data import DataSpec, make_splits
    from deploykit.models import load_model

    vit = tiny_vit()
    with torch.no_grad():                      # head 2 of layer 0 writes nothing: its values are zero
        vit.module.blocks[0].attn.qkv.weight[2 * 32 + 16: 2 * 32 + 24] = 0
        vit.module.blocks[0].attn.qkv.bias[2 * 32 + 16: 2 * 32 + 24] = 0
    splits = make_splits(vit, DataSpec(source="digits", calibration=32, evaluation=8))
    for method in ("gradient", "output-norm", "weight-norm"):
        scores = head_importance(vit, splits.calibration, method=method, batch_size=16)
        assert scores.shape == (2, 4) and torch.isfinite(scores).all()
        assert scores[0, 2] == 0 and bool((scores[0, [0, 1, 3]] > 0).all()), method
        if method != "weight-norm":
            torch.testing.assert_close(scores.norm(dim=1), torch.ones(2))         # per-layer L2 normalised
    entry = plan_head_pruning(vit, splits.calibration, prune=[1, 0], importance="gradient")
    assert entry == {"name": "head-pruning", "heads": {0: [2]}, "importance": "gradient"}
    ratio = plan_head_pruning(vit, splits.calibration, ratio=0.5, importance="output-norm")["heads"]
    assert sum(len(v) for v in ratio.values()) == 4 and 2 in ratio[0]
    # The entry goes into the variant's transforms; a checkpoint trained after pruning loads.
    pruned = copy.deepcopy(vit)
    prune_heads(pruned.module, entry["heads"])
    save_file({k: v.contiguous() for k, v in pruned.module.state_dict().items()}, str(tmp_path / "p.safetensors"))
    again = load_model("timm:vit_tiny_patch16_224", {**TINY_VIT, "transforms": [entry],
                                                     "checkpoint": str(tmp_path / "p.safetensors")})
    images = vit.example_feeds(batch=2)
    np.testing.assert_allclose(again.run_torch(images), vit.run_torch(images), atol=1e-5)  # a dead head: no change
    # Without data the transform ranks by weight norms; text models take a split as well.
    by_norm = tiny_vit([{"name": "head-pruning", "prune": 1}])
    assert by_norm.info["transforms"][0]["heads_left"] == [3, 3]
    text_splits = make_splits(tiny_bundle, DataSpec(source="docstrings", calibration=8, evaluation=8))
    bert = copy.deepcopy(tiny_bundle)
    scores = head_importance(bert, text_splits.calibration, batch_size=4)
    assert scores.shape == (2, 2) and torch.isfinite(scores).all()
