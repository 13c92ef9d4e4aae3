"""SmoothQuant (Xiao et al., 2023) on the ONNX graph.

For a Linear ``y = x W`` (ONNX ``MatMul(x, W)``, ``W`` of shape ``[K, N]``) the activation's
per-channel outliers are moved into the weights:
``y = (x / s) (diag(s) W)`` with ``s_k = max|x_k|^alpha / max|W_k|^(1 - alpha)``.
MatMuls that read the same activation (Q, K and V) share one ``s`` computed over all their
weights, as in the paper.

Where ``1 / s`` goes, from best to fallback:

* ``layernorm``: the activation is a LayerNormalization output read only by the group, so
  ``gamma / s`` and ``beta / s`` absorb it (pre-LN blocks: ViT, GPT-style models).
* ``rmsnorm``: the activation is an RMSNorm output (``Mul(weight, x * rsqrt(mean(x^2) + eps))``,
  the Llama family's ``input_layernorm`` -> q/k/v and ``post_attention_layernorm`` ->
  gate/up) read only by the group, so ``weight / s`` absorbs it.
* ``linear``: the activation comes from another Linear through ops that keep the channel
  axis (Reshape, Transpose, the attention's ``P @ V``), read by nothing else, so that
  Linear's output columns and bias absorb it (e.g. the value projection feeding the
  attention output projection), or is an elementwise product with such a Linear's output
  (SwiGLU's ``act(gate) * up`` feeding ``down_proj``: scaling ``up``'s columns scales the
  product).
* ``mul``: an explicit per-channel ``Mul`` before the group. Post-LN blocks (the BERT family,
  MiniLM included) need it: the LayerNorm output also feeds the residual path, so folding
  ``1 / s`` into it would change the function. TensorRT fuses such a pointwise Mul into
  the neighbouring kernel.

With ``shift`` each channel is also centred before it is scaled (Outlier Suppression+,
Wei et al., 2023): ``x' = (x - c) / s`` with ``c_k`` the middle of the channel's calibrated
range, and every MatMul of the group gets ``c W`` added to its bias, so
``x W + b = x' (diag(s) W) + (b + c W)`` exactly. A one-sided channel (GELU outputs, most of
an FFN's input; LayerNorm channels pushed off zero by their beta) then uses the whole
symmetric int8 range instead of half of it, and ``s`` is computed from the centred
half-range. The centre goes where the scale goes: into the LayerNorm's beta, into the
previous Linear's bias (through ``P @ V`` too: softmax rows sum to 1), or as an explicit
``Add`` after the ``Mul``; the compensation goes into the bias ``Add`` that follows each
MatMul, or into a new one when it has none.

Every fold is checked numerically against the unsmoothed graph on real inputs; a fold that
does not reproduce the FP32 outputs falls back to ``mul``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from deploykit.data import Split
from deploykit.errors import UserError
from deploykit.onnx_utils import unique_name
from deploykit.quantize.config import GROUP_KINDS
from deploykit.quantize.graph import (
    consumers,
    cpu_session,
    initializers,
    iterate_activations,
    producers,
)

TARGETS = ("ln-fed", "all")
# Where a group sits, found from the graph alone (no model-specific names):
#   attention-in:  its outputs reach a MatMul of two activations (Q K^T, P V): Q/K/V projections
#   attention-out: its input comes from such a MatMul (the attention output projection)
#   mlp-out:       otherwise, a down-projection (K > N): FFN output, SwiGLU down
#   mlp-in:        the rest (FFN input, gate/up)
KINDS = GROUP_KINDS
_KIND_HOPS = 12                      # ops walked from a group to find the attention product
_CHANNEL_PRESERVING = ("Reshape", "Transpose")
# s is clipped to this range so a dead channel (max|x| = 0) or a zero weight row cannot
# produce inf/0 scales.
_S_MIN, _S_MAX = 1e-5, 1e5


@dataclass
class SmoothGroup:
    input: str                      # activation read by every MatMul of the group
    nodes: list[str]                # MatMul node names
    weights: list[str]              # their [K, N] weight initializers
    fold: str = "mul"               # layernorm | rmsnorm | linear | mul
    fold_nodes: list[str] = field(default_factory=list)   # LN or (MatMul[, Add]) that absorb 1/s
    kind: str = "mlp-in"            # one of KINDS: where the group sits in its block (for per-kind alpha)

    def summary(self) -> dict[str, Any]:
        return {"input": self.input, "nodes": self.nodes, "fold": self.fold, "fold_nodes": self.fold_nodes,
                "kind": self.kind}


def find_groups(model: onnx.ModelProto, targets: str = "ln-fed",
                exclude_nodes: tuple[str, ...] = ()) -> list[SmoothGroup]:
    """MatMuls with a constant 2-D weight, grouped by their activation input."""
    if targets not in TARGETS:
        raise UserError(f"unknown SmoothQuant targets '{targets}'", fix=f"use one of {', '.join(TARGETS)}")
    inits = initializers(model)
    prod = producers(model)
    users = consumers(model)
    groups: dict[str, SmoothGroup] = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.name in exclude_nodes:
            continue
        x, w = node.input[0], node.input[1]
        if w not in inits or x in inits or len(inits[w].dims) != 2:
            continue
        if targets == "ln-fed" and (x not in prod or prod[x].op_type != "LayerNormalization"):
            continue
        group = groups.setdefault(x, SmoothGroup(input=x, nodes=[], weights=[]))
        group.nodes.append(node.name)
        group.weights.append(w)
    for group in groups.values():
        _plan_fold(group, prod, users, inits)
        group.kind = _group_kind(group, model, prod, users, inits)
    return list(groups.values())


def _is_attention_product(node: onnx.NodeProto, inits) -> bool:
    return node.op_type == "MatMul" and node.input[0] not in inits and node.input[1] not in inits


def _stops(node: onnx.NodeProto, inits) -> bool:
    """Walking stops at the next Linear or normalisation: the attention product is within a block."""
    return ((node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in inits)
            or "Normalization" in node.op_type)


def _group_kind(group: SmoothGroup, model: onnx.ModelProto, prod, users, inits) -> str:
    by_name = {n.name: n for n in model.graph.node}
    frontier = [o for name in group.nodes for o in by_name[name].output]
    seen: set[str] = set()
    for _ in range(_KIND_HOPS):                       # forward: Q/K/V feed the attention product
        nxt = []
        for tensor in frontier:
            for user in users.get(tensor, []):
                if user.name in seen:
                    continue
                seen.add(user.name)
                if _is_attention_product(user, inits):
                    return "attention-in"
                if not _stops(user, inits):
                    nxt += list(user.output)
        frontier = nxt
    frontier, seen = [group.input], set()
    for _ in range(_KIND_HOPS):                       # backward: the output projection reads it
        nxt = []
        for tensor in frontier:
            node = prod.get(tensor)
            if node is None or node.name in seen:
                continue
            seen.add(node.name)
            if _is_attention_product(node, inits):
                return "attention-out"
            if not _stops(node, inits):
                nxt += [i for i in node.input if i and i not in inits]
        frontier = nxt
    k, n = inits[group.weights[0]].dims
    return "mlp-out" if k > n else "mlp-in"


def _plan_fold(group: SmoothGroup, prod, users, inits) -> None:
    readers = {n.name for n in users.get(group.input, [])}
    if readers != set(group.nodes):
        return                                       # shared (e.g. residual path): explicit Mul
    source = prod.get(group.input)
    if source is None:
        return
    if source.op_type == "LayerNormalization":
        scale_ok = len(source.input) > 1 and source.input[1] in inits
        bias_ok = len(source.input) < 3 or not source.input[2] or source.input[2] in inits
        if scale_ok and bias_ok:
            group.fold, group.fold_nodes = "layernorm", [source.name]
        return
    channels = inits[group.weights[0]].dims[0]
    if source.op_type == "Mul":
        const = [i for i in source.input if i in inits]
        other = [i for i in source.input if i not in inits]
        if len(const) == 1 and len(other) == 1 and list(inits[const[0]].dims) == [channels] \
                and _is_rms_normalised(other[0], prod):
            group.fold, group.fold_nodes = "rmsnorm", [source.name]
            return
    chain = _linear_chain(group.input, prod, users, inits)
    channels = inits[group.weights[0]].dims[0]
    if chain and inits[chain[0].input[1]].dims[-1] == channels:
        group.fold, group.fold_nodes = "linear", [n.name for n in chain]



def _is_rms_normalised(tensor: str, prod) -> bool:
    """``tensor`` is ``x * rsqrt(mean(x^2) + eps)`` (the exported RMSNorm before its weight):
    a Mul one of whose inputs comes from Reciprocal(Sqrt(...)) or Rsqrt over a ReduceMean."""
    node = prod.get(tensor)
    if node is None or node.op_type != "Mul":
        return False
    for name in node.input:
        walk = prod.get(name)
        for _ in range(4):
            if walk is None:
                break
            if walk.op_type == "ReduceMean":
                return True
            if walk.op_type not in ("Reciprocal", "Sqrt", "Rsqrt", "Add", "Div"):
                break
            walk = prod.get(walk.input[1] if walk.op_type == "Div" else walk.input[0])
    return False


def _product_factor(node: onnx.NodeProto, prod, users, inits) -> list[onnx.NodeProto] | None:
    """For ``a * b`` (no constant input), the Linear producing one factor, read only here."""
    if any(i in inits for i in node.input) or len(node.input) != 2:
        return None
    for name in node.input:
        producer = prod.get(name)
        if (producer is not None and producer.op_type == "MatMul" and producer.input[1] in inits
                and len(users.get(name, [])) == 1):
            return [producer]
    return None


def _linear_chain(tensor: str, prod, users, inits) -> list[onnx.NodeProto] | None:
    """Walk back through channel-preserving ops to a MatMul with a constant weight
    (optionally followed by a constant bias Add); every hop must have a single reader."""
    current = tensor
    for _ in range(16):
        node = prod.get(current)
        if node is None:
            return None
        if node.op_type in _CHANNEL_PRESERVING:
            current = node.input[0]
        elif node.op_type == "MatMul" and node.input[1] not in inits and node.input[0] not in inits:
            current = node.input[1]                  # P @ V: channels come from V
        elif node.op_type == "Add":
            const = [i for i in node.input if i in inits]
            other = [i for i in node.input if i not in inits]
            if len(const) != 1 or len(other) != 1 or len(inits[const[0]].dims) != 1:
                return None
            producer = prod.get(other[0])
            if (producer is None or producer.op_type != "MatMul" or producer.input[1] not in inits
                    or len(users.get(other[0], [])) != 1):
                return None
            return [producer, node]
        elif node.op_type == "MatMul" and node.input[1] in inits:
            return [node]
        elif node.op_type == "Mul" and current == tensor:
            return _product_factor(node, prod, users, inits)
        else:
            return None
        if len(users.get(current, [])) != 1:
            return None
    return None


def channel_ranges(model: onnx.ModelProto, groups: list[SmoothGroup], split: Split, *, batch_size: int = 16,
                   threads: int | None = None, sentinel_abs: float = 1e30) -> dict[str, np.ndarray]:
    """``[min, max]`` per channel (last axis; an array of shape ``[2, C]``) of each group's
    activation over ``split``. Non-finite values and mask sentinels are ignored, as in
    calibration; a channel with no value left reads ``[0, 0]``."""
    stats: dict[str, np.ndarray] = {}
    names = [g.input for g in groups]
    for values in iterate_activations(model, names, split, batch_size, threads,
                                      description="smoothquant: channel statistics"):
        for name, value in values.items():
            x = value.astype(np.float64).reshape(-1, value.shape[-1])
            valid = np.isfinite(x) & (np.abs(x) < sentinel_abs)
            lo = np.where(valid, x, np.inf).min(axis=0)
            hi = np.where(valid, x, -np.inf).max(axis=0)
            if name in stats:
                lo, hi = np.minimum(stats[name][0], lo), np.maximum(stats[name][1], hi)
            stats[name] = np.stack([lo, hi])
    for name, r in stats.items():
        empty = ~np.isfinite(r).all(axis=0)
        r[:, empty] = 0.0
    return stats


def channel_absmax(ranges: np.ndarray, shift: bool = False) -> np.ndarray:
    """What the smoothing divides: max |x| per channel, or with ``shift`` the half-range
    around the channel's centre."""
    lo, hi = ranges
    return (hi - lo) / 2.0 if shift else np.maximum(-lo, hi)


def channel_centres(ranges: np.ndarray) -> np.ndarray:
    """The middle of each channel's range: what ``shift`` subtracts."""
    return ((ranges[0] + ranges[1]) / 2.0).astype(np.float32)


def smoothing_scales(act_absmax: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    w_absmax = np.max(np.stack([np.abs(w).max(axis=1) for w in weights]), axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.power(act_absmax, alpha) / np.power(w_absmax, 1.0 - alpha)
    s = np.where((act_absmax > 0) & (w_absmax > 0) & np.isfinite(s), s, 1.0)
    return np.clip(s, _S_MIN, _S_MAX)


def alpha_for(alpha: float | dict[str, float | None], kind: str) -> float | None:
    """The strength for a group of ``kind``: ``alpha`` itself, or its entry for the kind
    (a kind missing from the mapping, or mapped to None, is not smoothed)."""
    return alpha.get(kind) if isinstance(alpha, dict) else alpha


def check_alpha(alpha: float | dict[str, float | None]) -> None:
    values = alpha.values() if isinstance(alpha, dict) else [alpha]
    if isinstance(alpha, dict):
        unknown = sorted(set(alpha) - set(KINDS))
        if unknown:
            raise UserError(f"unknown SmoothQuant group kind(s) {unknown}", fix=f"use {', '.join(KINDS)}")
    for a in values:
        if a is not None and (isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0):
            raise UserError(f"SmoothQuant alpha {a} is outside [0, 1]", fix="use e.g. 0.5 to 0.9")


def group_scales(model: onnx.ModelProto, groups: list[SmoothGroup], stats: dict[str, np.ndarray],
                 alpha: float | dict[str, float | None], shift: bool = False) -> dict[str, np.ndarray]:
    """The smoothing vector ``s`` of every group for strength ``alpha`` (one value, or one per
    group kind) from its channel ranges (:func:`channel_ranges`), on the centred half-range
    with ``shift``; a group whose strength is None gets ``s = 1``."""
    check_alpha(alpha)
    inits = initializers(model)
    out = {}
    for g in groups:
        a = alpha_for(alpha, g.kind)
        spread = channel_absmax(stats[g.input], shift)
        if a is None:
            out[g.input] = np.ones(len(spread), np.float32)
            continue
        out[g.input] = smoothing_scales(spread, [numpy_helper.to_array(inits[w]) for w in g.weights],
                                        a).astype(np.float32)
    return out


def apply_smoothing(model: onnx.ModelProto, groups: list[SmoothGroup], scales: dict[str, np.ndarray],
                    shifts: dict[str, np.ndarray] | None = None) -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
    """A smoothed copy of ``model`` with the given per-group ``scales`` (and, for the groups in
    ``shifts``, channel centres subtracted first); returns it and a per-group record (scales
    and shifts included, so the smoothing can be re-applied exactly)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = {n.name: n for n in out.graph.node}
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    uses = use_counts(out)
    shifts = shifts or {}
    records = []
    for group in groups:
        s = np.asarray(scales[group.input], dtype=np.float32)
        c = shifts.get(group.input)
        c = None if c is None or not np.any(c) else np.asarray(c, dtype=np.float32)
        bias_nodes: dict[str, str] = {}
        for node_name, w_name in zip(group.nodes, group.weights):
            node = nodes[node_name]
            if c is not None:     # x W = x' (diag(s) W) + c W: the bias takes c W of the weight as it stands
                bias_nodes[node_name] = _add_to_bias(
                    out, node, (c.astype(np.float64) @ inits[node.input[1]]).astype(np.float32), uses, inits, nodes)
            replace_initializer(out, node, w_name, (inits[w_name] * s[:, None]).astype(np.float32),
                           f"{w_name}_smoothed", uses, inits)
        explicit_shift = c is not None
        if group.fold == "layernorm":
            ln = nodes[group.fold_nodes[0]]
            replace_initializer(out, ln, ln.input[1], inits[ln.input[1]] / s, f"{ln.input[1]}_smoothed", uses, inits)
            if len(ln.input) > 2 and ln.input[2]:
                beta = inits[ln.input[2]] - (0.0 if c is None else c)
                replace_initializer(out, ln, ln.input[2], beta / s, f"{ln.input[2]}_smoothed", uses, inits)
            elif c is not None:
                name = unique_name(out, f"{ln.name}_shift_beta")
                out.graph.initializer.append(numpy_helper.from_array((-c / s).astype(np.float32), name))
                inits[name] = (-c / s).astype(np.float32)
                uses[name] = 1
                ln.input[:] = list(ln.input[:2]) + [name]
            explicit_shift = False
        elif group.fold == "rmsnorm":
            mul = nodes[group.fold_nodes[0]]
            weight = next(i for i in mul.input if i in inits)
            replace_initializer(out, mul, weight, inits[weight] / s, f"{weight}_smoothed", uses, inits)
        elif group.fold == "linear":
            matmul = nodes[group.fold_nodes[0]]
            w = inits[matmul.input[1]]
            replace_initializer(out, matmul, matmul.input[1], w / s[None, :], f"{matmul.input[1]}_smoothed", uses, inits)
            if len(group.fold_nodes) > 1:
                add = nodes[group.fold_nodes[1]]
                bias = next(i for i in add.input if i in inits)
                replace_initializer(out, add, bias, (inits[bias] - (0.0 if c is None else c)) / s,
                               f"{bias}_smoothed", uses, inits)
                explicit_shift = False
            else:
                added = _bias_after(out, matmul, inits)   # one another group's shift gave it: scaled alike
                if added is not None:
                    bias = next(i for i in added.input if i in inits)
                    replace_initializer(out, added, bias, inits[bias] / s, f"{bias}_smoothed", uses, inits)
        else:
            _insert_mul(out, group, (1.0 / s).astype(np.float32))
        shift_node = _insert_shift(out, group, (-c / s).astype(np.float32), nodes) if explicit_shift else None
        records.append({**group.summary(), "s_min": float(s.min()), "s_max": float(s.max()),
                        "s_median": float(np.median(s)), "scales": [float(v) for v in s],
                        **({"shift": [float(v) for v in c], "shift_node": shift_node, "bias_nodes": bias_nodes}
                           if c is not None else {})})
    return out, records


def reapply(model: onnx.ModelProto, records: list[dict[str, Any]]) -> onnx.ModelProto:
    """Rebuild the smoothed FP32 graph from ``model`` and the records of an earlier smoothing."""
    groups = [SmoothGroup(input=r["input"], nodes=list(r["nodes"]), weights=[], fold=r["fold"],
                          fold_nodes=list(r["fold_nodes"])) for r in records]
    by_name = {n.name: n for n in model.graph.node}
    for g in groups:
        missing = [n for n in g.nodes + g.fold_nodes if n not in by_name]
        if missing:
            raise UserError(f"the smoothing record names node(s) {missing} that the model lacks",
                            fix="give the FP32 model the INT8 model was calibrated from")
        g.weights = [by_name[n].input[1] for n in g.nodes]
    smoothed, _ = apply_smoothing(model, groups, {r["input"]: np.asarray(r["scales"], np.float32) for r in records},
                                  {r["input"]: np.asarray(r["shift"], np.float32) for r in records if r.get("shift")})
    return smoothed


def use_counts(model: onnx.ModelProto) -> dict[str, int]:
    """How many node inputs read each name (what :func:`replace_initializer` keeps current)."""
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    return uses


def replace_initializer(model, node, old: str, array: np.ndarray, new_base: str, uses: dict[str, int],
                        inits: dict[str, np.ndarray]) -> None:
    """Point ``node`` at a new initializer holding ``array`` (the old one may be shared; it is
    removed once no node reads it, by ``uses`` from :func:`use_counts`); ``inits``
    (name -> array) is kept current, so a weight can be smoothed twice (rows as a group
    member, columns as a fold target)."""
    name = unique_name(model, new_base.replace("_smoothed_smoothed", "_smoothed"))
    model.graph.initializer.append(numpy_helper.from_array(array.astype(np.float32), name))
    inits[name] = array.astype(np.float32)
    uses[name] = uses.get(name, 0) + 1
    node.input[:] = [name if i == old else i for i in node.input]
    uses[old] = uses.get(old, 1) - 1
    if uses[old] <= 0:
        for k, init in enumerate(model.graph.initializer):
            if init.name == old:
                del model.graph.initializer[k]
                break


def _insert_mul(model: onnx.ModelProto, group: SmoothGroup, inv_s: np.ndarray) -> None:
    scale_name = unique_name(model, f"{group.input}_smooth_scale")
    out_name = unique_name(model, f"{group.input}_smoothed")
    model.graph.initializer.append(numpy_helper.from_array(inv_s, scale_name))
    mul = helper.make_node("Mul", [group.input, scale_name], [out_name], name=unique_name(model, "smooth_mul"))
    members = set(group.nodes)
    first = next(i for i, n in enumerate(model.graph.node) if n.name in members)
    model.graph.node.insert(first, mul)
    for node in model.graph.node:
        if node.name in members:
            node.input[0] = out_name


def _bias_after(model: onnx.ModelProto, matmul: onnx.NodeProto, inits: dict[str, np.ndarray]) -> onnx.NodeProto | None:
    """The bias ``Add`` after ``matmul`` (its only reader, one constant input). A ``linear`` fold
    planned without one (its chain ended at the MatMul) has one only when another group's
    shift put it there since."""
    readers = [n for n in model.graph.node if matmul.output[0] in n.input]
    if len(readers) == 1 and readers[0].op_type == "Add" and sum(1 for i in readers[0].input if i in inits) == 1:
        return readers[0]
    return None


def _insert_shift(model: onnx.ModelProto, group: SmoothGroup, offset: np.ndarray,
                  nodes: dict[str, onnx.NodeProto]) -> str:
    """``Add(x, offset)`` between the group's (smoothed) input and its MatMuls: the centring
    where nothing before the group can absorb it (TensorRT fuses it with the Mul and the Q)."""
    members = [nodes[n] for n in group.nodes]
    current = members[0].input[0]
    offset_name = unique_name(model, f"{group.input}_shift")
    out_name = unique_name(model, f"{group.input}_shifted")
    model.graph.initializer.append(numpy_helper.from_array(offset, offset_name))
    add = helper.make_node("Add", [current, offset_name], [out_name], name=unique_name(model, "smooth_shift"))
    first = min(i for i, n in enumerate(model.graph.node) if n.name in set(group.nodes))
    model.graph.node.insert(first, add)
    nodes[add.name] = add
    for node in members:
        node.input[0] = out_name
    return add.name


def _add_to_bias(model: onnx.ModelProto, matmul: onnx.NodeProto, delta: np.ndarray, uses: dict[str, int],
                 inits: dict[str, np.ndarray], nodes: dict[str, onnx.NodeProto]) -> str:
    """Add ``delta`` to the bias of ``matmul``'s output: the constant of the ``Add`` that is its
    only reader, or a new ``Add`` after it (the MatMul's output renamed, so every reader and a
    graph output keep their tensor). Returns the bias Add's name."""
    out_name = matmul.output[0]
    readers = [n for n in model.graph.node if out_name in n.input]
    is_output = any(o.name == out_name for o in model.graph.output)
    if len(readers) == 1 and not is_output and readers[0].op_type == "Add" and len(readers[0].input) == 2:
        add = readers[0]
        const = [i for i in add.input if i in inits]
        if len(const) == 1 and inits[const[0]].shape == delta.shape:
            replace_initializer(model, add, const[0], inits[const[0]] + delta, f"{const[0]}_shifted", uses, inits)
            return add.name
    raw = unique_name(model, f"{out_name}_unbiased")
    bias = unique_name(model, f"{matmul.name}_shift_bias")
    model.graph.initializer.append(numpy_helper.from_array(delta.astype(np.float32), bias))
    inits[bias] = delta.astype(np.float32)
    uses[bias] = 1
    matmul.output[0] = raw
    add = helper.make_node("Add", [raw, bias], [out_name], name=unique_name(model, f"{matmul.name}_shift_add"))
    index = next(i for i, n in enumerate(model.graph.node) if n is matmul or n.name == matmul.name)
    model.graph.node.insert(index + 1, add)
    nodes[add.name] = add
    return add.name


def smooth(model: onnx.ModelProto, split: Split, alpha: float | dict[str, float | None], *, targets: str = "ln-fed",
           exclude_nodes: tuple[str, ...] = (), batch_size: int = 16, threads: int | None = None,
           stats: dict[str, np.ndarray] | None = None, check_split: Split | None = None, shift: bool = False
           ) -> tuple[onnx.ModelProto, list[dict[str, Any]], dict[str, np.ndarray]]:
    """Smooth ``model`` with strength ``alpha`` (each channel centred first with ``shift``);
    folds are verified on ``check_split`` (default: the first 8 samples of ``split``).
    Returns (model, records, channel ranges); pass ``stats`` back in to smooth with another
    alpha, or with or without the shift, without re-collecting."""
    check_alpha(alpha)
    groups = find_groups(model, targets, exclude_nodes)
    if not groups:
        return model, [], {}
    if stats is None or any(g.input not in stats for g in groups):   # every group's: reusable for any alpha
        stats = channel_ranges(model, groups, split, batch_size=batch_size, threads=threads)
    groups = [g for g in groups if alpha_for(alpha, g.kind) is not None]   # no Mul of ones for unsmoothed kinds
    if not groups:
        return model, [], stats
    scales = group_scales(model, groups, stats, alpha, shift)
    shifts = {g.input: channel_centres(stats[g.input]) for g in groups} if shift else None
    smoothed, records = apply_smoothing(model, groups, scales, shifts)
    check = check_split or _head(split, 8)
    if (any(g.fold != "mul" for g in groups) or shift) and not outputs_match(model, smoothed, check):
        for g in groups:
            g.fold, g.fold_nodes = "mul", []
        smoothed, records = apply_smoothing(model, groups, scales, shifts)
    for record in records:
        record["alpha"] = alpha_for(alpha, record["kind"])
    return smoothed, records, stats


def _head(split: Split, n: int) -> Split:
    return Split(split.name, {k: v[:n] for k, v in split.feeds.items()}, split.sha256)


def outputs_match(reference: onnx.ModelProto, candidate: onnx.ModelProto, split: Split,
                  rtol: float = 1e-4) -> bool:
    """The graphs agree on ``split`` up to float rounding (``rtol`` of the output's scale)."""
    from deploykit.data import iterate_batches

    sessions = [cpu_session(m) for m in (reference, candidate)]
    names = [i.name for i in sessions[0].get_inputs()]
    for feeds in iterate_batches(split.feeds, 8):
        a, b = (s.run(None, {n: feeds[n] for n in names})[0] for s in sessions)
        if not np.all(np.abs(a - b) <= rtol * max(float(np.abs(a).max()), 1e-12)):
            return False
    return True
