"""Sparsity measurements: 2:4 compliance of exported weights, weight and attention sparsity,
head importance and the head-pruning plan, parameter counts.

2:4 compliance (:func:`check_2_4`)
    A weight is 2:4 when every group of 4 consecutive values along its *reduction*
    dimension holds at least 2 zeros, the layout TensorRT's ``SPARSE_WEIGHTS`` uses on
    sparse tensor cores. In an exported graph the reduction dimension of a ``MatMul``
    initializer ``B`` (``[..., in, out]``) is axis -2 and of an initializer ``A`` axis -1;
    of a ``Gemm`` ``B`` it is axis 1 with ``transB=1`` (``[out, in]``, the torch Linear
    layout) and axis 0 otherwise. Weights reached through ``Transpose``, ``Identity``,
    ``Cast`` or ``DequantizeLinear`` (quantized graphs) are followed back to their
    initializer. A reduction dimension that is not a multiple of 4 is not compliant.

Head importance (:func:`head_importance`)
    ``gradient`` (the default) is Michel, Levy, Neubig, "Are Sixteen Heads Really Better
    than One?" (NeurIPS 2019): a mask variable ``xi_h = 1`` multiplies every head's context;
    ``I_h = sum over batches |dL/dxi_h|``, each layer then scaled to unit L2 norm. ``L`` is
    the cross-entropy on the given labels; without labels, a classifier uses its own
    predictions as labels and any other model (sentence embeddings) ``L = <r, f(x)>`` with
    a fixed-seed Gaussian ``r`` per batch, whose gradient measures the size of the head's
    first-order effect on the output. ``output-norm`` is a cheaper, forward-only proxy: the
    mean L2 norm, over real tokens, of the head's contribution ``W_O[:, h] ctx_h`` to the
    attention output (Kobayashi et al. 2020). ``weight-norm`` needs no data.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from deploykit.errors import UserError

_PASS_THROUGH = ("Identity", "Cast", "DequantizeLinear")


# ----------------------------------------------------------------------------- 2:4 compliance
def two_four_groups(array: np.ndarray, axis: int) -> np.ndarray:
    """Zeros per group of 4 along ``axis``: shape ``(groups,)`` (flattened over the other axes)."""
    a = np.moveaxis(np.asarray(array), axis, -1)
    if a.shape[-1] % 4:
        raise ValueError(f"axis of length {a.shape[-1]} is not a multiple of 4")
    return (a.reshape(-1, 4) == 0).sum(axis=-1)


def is_2_4_compliant(weight, axis: int = -1) -> bool:
    """Whether ``weight`` is 2:4 along ``axis``.

    ``weight``: an array or tensor (``axis`` -1 is the input dimension of a torch Linear
    weight ``[out, in]``), an ``onnx.ModelProto`` / ONNX path, or a :func:`check_2_4`
    result; for a model, every MatMul / Gemm weight must be compliant.
    """
    if isinstance(weight, (onnx.ModelProto, str, Path)):
        weight = check_2_4(weight)
    if isinstance(weight, dict):
        return bool(weight["total"]) and weight["non_compliant"] == 0
    array = weight.detach().cpu().numpy() if isinstance(weight, torch.Tensor) else np.asarray(weight)
    if array.shape[axis] % 4:
        return False
    return bool((two_four_groups(array, axis) >= 2).all())


def _weight_source(name: str, producers: dict[str, onnx.NodeProto], inits: dict[str, onnx.TensorProto],
                   axis: int, rank: int) -> tuple[str, int] | None:
    """Follow ``name`` back to an initializer; returns it and where ``axis`` (of the consumed
    value, of rank ``rank``) lies in it."""
    axis = axis % rank
    for _ in range(16):
        if name in inits:
            return name, axis
        node = producers.get(name)
        if node is None:
            return None
        if node.op_type == "Transpose":
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), list(range(rank))[::-1])
            axis = perm[axis]
        elif node.op_type not in _PASS_THROUGH:
            return None
        name = node.input[0]
    return None


def check_2_4(model: onnx.ModelProto | str | Path) -> dict[str, Any]:
    """2:4 compliance of every MatMul / Gemm weight initializer (see the module docstring).

    Returns ``{"initializers": [{name, node, op, shape, axis, groups, compliant_groups,
    compliant, sparsity}], "total", "compliant", "non_compliant", "compliant_names"}``.
    ``sparsity`` is the share of exact zeros in the initializer.
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    for node in graph.node:                      # Constant nodes hold weights too in some exports
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            inits[node.output[0]] = node.attribute[0].t
    producers = {o: n for n in graph.node for o in n.output}
    rows, seen = [], set()
    for node in graph.node:
        candidates: list[tuple[int, int]] = []           # (input index, reduction axis of that input)
        if node.op_type == "MatMul":
            candidates = [(1, -2), (0, -1)]
        elif node.op_type == "Gemm":
            attrs = {a.name: a.i for a in node.attribute}
            candidates = [(1, 1 if attrs.get("transB", 0) else 0)]
        for index, axis in candidates:
            if index >= len(node.input):
                continue
            found = None
            name = node.input[index]
            source = inits.get(name)
            if source is None and name in producers:
                # rank of the consumed value: the initializer's rank (Transpose / Cast keep it)
                probe = _weight_source(name, producers, inits, 0, 2)
                if probe is not None:
                    rank = len(inits[probe[0]].dims)
                    found = _weight_source(name, producers, inits, axis, rank)
            elif source is not None:
                found = (name, axis % len(source.dims)) if len(source.dims) >= 2 else None
            if found is None or found[0] in seen:
                continue
            init_name, init_axis = found
            array = numpy_helper.to_array(inits[init_name])
            if array.ndim < 2:
                continue
            seen.add(init_name)
            row = {"name": init_name, "node": node.name, "op": node.op_type, "shape": list(array.shape),
                   "axis": init_axis, "sparsity": round(float((array == 0).mean()), 6)}
            if array.shape[init_axis] % 4:
                row.update(groups=0, compliant_groups=0, compliant=False, reason="reduction dim not a multiple of 4")
            else:
                zeros = two_four_groups(array, init_axis)
                row.update(groups=int(zeros.size), compliant_groups=int((zeros >= 2).sum()),
                           compliant=bool((zeros >= 2).all()))
            rows.append(row)
    good = [r["name"] for r in rows if r["compliant"]]
    return {"initializers": rows, "total": len(rows), "compliant": len(good),
            "non_compliant": len(rows) - len(good), "compliant_names": good}


# ----------------------------------------------------------------------------- weight sparsity
def weight_sparsity(module: nn.Module) -> dict[str, Any]:
    """Exact zeros of every Linear weight (``[out, in]``, 2:4 along ``in``) and of all parameters."""
    from deploykit.recipes.sparsify import Sparse24Linear

    layers = []
    for name, m in module.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        w = m.weight.detach()
        layers.append({"name": name, "shape": list(w.shape), "sparsity": round(float((w == 0).float().mean()), 6),
                       "two_four": is_2_4_compliant(w, -1), "masked": isinstance(m, Sparse24Linear)})
    total = sum(p.numel() for p in module.parameters())
    zeros = sum(int((p.detach() == 0).sum()) for p in module.parameters())
    linear_total = sum(int(np.prod(r["shape"])) for r in layers)
    linear_zeros = sum(int(m.weight.detach().eq(0).sum()) for m in module.modules() if isinstance(m, nn.Linear))
    return {"layers": layers, "parameters": total, "zero_parameters": zeros,
            "sparsity": round(zeros / max(total, 1), 6),
            "linear_sparsity": round(linear_zeros / max(linear_total, 1), 6),
            "two_four_layers": sum(r["two_four"] for r in layers)}


# ----------------------------------------------------------------------------- attention sparsity
@contextlib.contextmanager
def record_attention_sparsity(root: nn.Module) -> Iterator[None]:
    """Within the block, every top-k attention layer counts its zero probabilities
    (counts reset on entry; read them with :func:`attention_sparsity`)."""
    from deploykit.recipes.sparsify import topk_modules

    modules = [m for m in topk_modules(root) if m is not None]
    if not modules:
        raise UserError("the model has no top-k attention to record", fix="list topk-attention in the transforms")
    for m in modules:
        m.reset_stats()
        m.recording = True
    try:
        yield
    finally:
        for m in modules:
            m.recording = False


def attention_sparsity(root: nn.Module) -> dict[str, Any]:
    """Per layer and head: the recorded share of zero attention probabilities among real keys."""
    from deploykit.recipes.sparsify import topk_modules

    layers = []
    for i, m in enumerate(topk_modules(root)):
        if m is not None:
            layers.append({"layer": i, "k": m.k, "ratio": m.ratio, **m.stats()})
    means = [r["mean"] for r in layers if r["mean"] is not None]
    return {"layers": layers, "mean": round(float(np.mean(means)), 6) if means else None}


# ----------------------------------------------------------------------------- parameter counts
def parameter_counts(root: nn.Module) -> dict[str, Any]:
    """Total parameters, those of the attention layers (q/k/v or qkv and output projection),
    and heads per layer."""
    from deploykit.recipes.attention import attention_modules
    from deploykit.recipes.sparsify import output_projection, head_layout

    layers = []
    for i, m in enumerate(attention_modules(root)):
        proj = output_projection(root, m)
        params = sum(p.numel() for n, p in m.named_parameters() if not n.startswith("core.")) + \
            sum(p.numel() for p in proj.parameters())
        heads, head_dim = head_layout(m)
        layers.append({"layer": i, "heads": heads, "head_dim": head_dim, "attention_parameters": params,
                       "head_ids": list(getattr(m, "head_ids", range(heads)))})
    return {"parameters": sum(p.numel() for p in root.parameters()),
            "attention_parameters": sum(r["attention_parameters"] for r in layers), "layers": layers}


def sparsity_report(root: nn.Module, onnx_model: onnx.ModelProto | str | Path | None = None) -> dict[str, Any]:
    """Everything above in one dict for a report (attention sparsity only when recorded)."""
    from deploykit.recipes.sparsify import topk_modules

    out: dict[str, Any] = {"weights": weight_sparsity(root), "parameters": parameter_counts(root)}
    if any(m is not None for m in topk_modules(root)):
        out["attention"] = attention_sparsity(root)
    if onnx_model is not None:
        out["onnx_2_4"] = check_2_4(onnx_model)
    return out


# ----------------------------------------------------------------------------- head importance
def _batches(batches, bundle, batch_size: int) -> Iterator[tuple[tuple, dict, torch.Tensor | None]]:
    """(args, kwargs, labels) per batch from a Split, one feeds dict, or an iterable of
    dicts / tuples / tensors / ``(inputs, labels)`` pairs."""
    from deploykit.data import Split, iterate_batches

    def convert(x):
        return torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x

    def unpack(batch, labels=None):
        if isinstance(batch, dict):
            if bundle is not None:
                return tuple(convert(batch[n]) for n in bundle.input_names), {}, labels
            return (), {k: convert(v) for k, v in batch.items()}, labels
        if isinstance(batch, (tuple, list)):
            return tuple(convert(x) for x in batch), {}, labels
        return (convert(batch),), {}, labels

    if isinstance(batches, Split):
        labels = None if batches.labels is None else torch.from_numpy(np.asarray(batches.labels, dtype=np.int64))
        for start, feeds in zip(range(0, batches.count, batch_size), iterate_batches(batches.feeds, batch_size)):
            yield unpack(feeds, None if labels is None else labels[start:start + batch_size])
        return
    if isinstance(batches, dict):
        batches = [batches]
    for batch in batches:
        if isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[0], dict):
            yield unpack(batch[0], convert(batch[1]))
        else:
            yield unpack(batch)


def _token_validity(args: tuple, kwargs: dict, bundle) -> torch.Tensor | None:
    if bundle is not None and "attention_mask" in bundle.input_names:
        return args[bundle.input_names.index("attention_mask")].bool()
    mask = kwargs.get("attention_mask")
    return None if mask is None else mask.bool()


def head_importance(bundle_or_module, batches: Any, *, method: str = "gradient", batch_size: int = 32,
                    max_batches: int | None = None, normalise: bool = True, seed: int = 0) -> torch.Tensor:
    """Importance of every head, ``[layers, max_heads]`` (NaN pads layers with fewer heads).

    ``batches``: a :class:`deploykit.data.Split` (its labels are used when it has them),
    one feeds dict, or an iterable of feeds dicts (``bundle.input_names`` order with a
    bundle), argument tuples, tensors or ``(feeds, labels)`` pairs. ``method``:
    ``gradient`` (Michel et al. 2019), ``output-norm`` or ``weight-norm`` (module docstring).
    The attention modules are swapped to deploykit's (weights, names and outputs kept).
    """
    from deploykit.recipes.attention import TimmAttention, swap_all
    from deploykit.recipes.sparsify import output_projection, head_layout, pad_layers, weight_norm_importance

    bundle = bundle_or_module if hasattr(bundle_or_module, "input_names") else None
    module = bundle.module if bundle is not None else bundle_or_module
    if method == "weight-norm":
        return weight_norm_importance(module)
    if method not in ("gradient", "output-norm"):
        raise UserError(f"unknown head importance '{method}'", fix="use gradient, output-norm or weight-norm")
    modules = swap_all(module)
    layouts = [head_layout(m) for m in modules]
    masks = [torch.ones(h, requires_grad=method == "gradient") for h, _ in layouts]
    totals = [torch.zeros(h, dtype=torch.float64) for h, _ in layouts]
    captured: list[torch.Tensor | None] = [None] * len(modules)
    projections = []
    for m in modules:
        proj = output_projection(module, m)
        usable = not isinstance(m, TimmAttention) or isinstance(m.norm, nn.Identity)
        projections.append(proj.weight if usable else None)

    def hook(index):
        def run(_core, _inputs, output):
            captured[index] = output
            return output * masks[index].to(output.dtype).view(1, -1, 1, 1)
        return run

    handles = [m.core.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    classifier = bundle is not None and bundle.task == "image-classification"
    generator = torch.Generator().manual_seed(seed)
    was_training = module.training
    module.eval()
    tokens = 0
    try:
        for count, (args, kwargs, labels) in enumerate(_batches(batches, bundle, batch_size)):
            if max_batches is not None and count >= max_batches:
                break
            valid = _token_validity(args, kwargs, bundle)
            if method == "output-norm":
                with torch.no_grad():
                    module(*args, **kwargs)
                    for i, ctx in enumerate(captured):
                        b, h, t, d = ctx.shape
                        weight = projections[i]
                        if weight is None:
                            norms = ctx.norm(dim=-1)                                       # (B, H, T)
                        else:
                            w = weight.detach().to(ctx.dtype).view(weight.shape[0], h, d)  # (D, H, d)
                            norms = torch.einsum("bhtd,ehd->bhte", ctx, w).norm(dim=-1)
                        keep = torch.ones(b, t, dtype=torch.bool) if valid is None else valid[:, :t]
                        totals[i] += (norms * keep[:, None].to(norms.dtype)).sum(dim=(0, 2)).double()
                    tokens += int(keep.sum())
                continue
            out = module(*args, **kwargs)
            if labels is not None:
                loss = nn.functional.cross_entropy(out, labels.long())
            elif classifier:
                loss = nn.functional.cross_entropy(out, out.detach().argmax(dim=-1))
            else:
                loss = (out * torch.randn(out.shape, generator=generator).to(out.dtype)).sum()
            grads = torch.autograd.grad(loss, masks)
            for i, g in enumerate(grads):
                totals[i] += g.detach().abs().double()
    finally:
        for handle in handles:
            handle.remove()
        module.train(was_training)
    rows = [t / max(tokens, 1) for t in totals] if method == "output-norm" else list(totals)
    if normalise:
        rows = [r / r.norm().clamp(min=1e-20) for r in rows]
    return pad_layers([r.float() for r in rows])


def plan_head_pruning(bundle_or_module, batches: Any, *, prune: int | list[int] | None = None,
                      ratio: float | None = None, importance: str = "gradient", **kwargs) -> dict[str, Any]:
    """The ``head-pruning`` transform entry for a variant, with heads ranked on ``batches``.

    Append the returned mapping to the variant's ``model.options.transforms`` (after the
    transforms the ranking was computed with): its explicit ``heads`` list prunes the same
    heads at load time, before a checkpoint trained after pruning loads. ``kwargs`` go to
    :func:`head_importance` (call it directly for the scores themselves).
    """
    from deploykit.recipes.sparsify import select_heads

    scores = head_importance(bundle_or_module, batches, method=importance, **kwargs)
    heads = select_heads(scores, prune=prune, ratio=ratio)
    return {"name": "head-pruning", "heads": {int(k): v for k, v in heads.items() if v}, "importance": importance}
