"""Weight rounding that minds the activations (GPTQ; Frantar et al., 2023) for a Q/DQ model.

Rounding each int8 weight to its nearest grid point minimises the error of the weights, not of
the Linear's output. For ``y = x W`` with ``W`` of shape ``[in, out]``, the output error of a
rounding ``Q`` over the data is ``||X (W - Q)||²`` = ``tr((W - Q)ᵀ H (W - Q))`` with ``H = XᵀX``,
which depends on how the input channels co-vary. GPTQ rounds one input row at a time and moves
the rows not yet rounded to absorb that row's rounding error (the optimal update of a
quadratic, through the Cholesky factor of ``H⁻¹``), so the errors of the rows cancel in the
output instead of adding up.

That matters most after SmoothQuant with a strong alpha: the weight rows of outlier channels
are scaled up, the per-output-channel scale follows them, and the other rows are left with few
grid steps. Nothing changes in the graph: the scales ORT chose (``max|column| / 127``) and the
int8 initializers' shapes stay; only their values are rounded differently, so every runtime
and TensorRT read the same form as before.

``H`` comes from the float graph the Q/DQ model was made from, on the calibration data, from
the tokens the attention mask marks as real (padding does not reach the outputs). The input
rows are processed by decreasing ``diag(H)`` (act-order) with the usual dampening of
``H``'s diagonal by 1 % of its mean.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from deploykit.data import Split
from deploykit.quantize.graph import initializers, iterate_activations, producers
from deploykit.quantize.shift import centre

DAMPING = 0.01      # of mean(diag(H)), added to the diagonal: H is singular for dead or collinear inputs
BLOCK = 128         # rows updated together (the lazy batch update; the result does not depend on it)
MASK_INPUT = "attention_mask"


def gptq_round(weight: np.ndarray, scale: np.ndarray, gram: np.ndarray, *, qmin: int = -127, qmax: int = 127,
               damping: float = DAMPING, block: int = BLOCK) -> np.ndarray:
    """int8 rounding ``Q`` of ``weight`` (``[in, out]``) on the grid ``Q * scale`` (``scale`` per
    output column, or one number) that keeps ``x Q·scale`` close to ``x weight`` for inputs with
    second moment ``gram`` (``[in, in]``, ``E[xᵀx]`` up to a factor)."""
    w = np.array(weight, dtype=np.float64)
    n = w.shape[0]
    s = np.broadcast_to(np.asarray(scale, dtype=np.float64), (w.shape[1],)).copy()
    h = np.array(gram, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    w[dead, :] = 0.0
    h[np.diag_indices(n)] += damping * float(np.mean(np.diag(h)))
    order = np.argsort(-np.diag(h), kind="stable")
    w, h = w[order], h[np.ix_(order, order)]
    # Upper Cholesky factor of H^-1: row i holds how rounding row i moves the rows after it.
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    q = np.zeros_like(w)
    for start in range(0, n, block):
        stop = min(start + block, n)
        errors = np.zeros((stop - start, w.shape[1]))
        for i in range(start, stop):
            q[i] = np.clip(np.rint(w[i] / s), qmin, qmax)
            err = (w[i] - q[i] * s) / u[i, i]
            w[i + 1:stop] -= np.outer(u[i, i + 1:stop], err)
            errors[i - start] = err
        w[stop:] -= u[start:stop, stop:].T @ errors
    out = np.empty_like(q)
    out[order] = q
    return out.astype(np.int8)


def _weight_dq(node: onnx.NodeProto, prod: dict[str, onnx.NodeProto], inits: dict[str, onnx.TensorProto]):
    """The DequantizeLinear of ``node``'s int8 weight (a 2-D initializer, zero points 0), or None."""
    if node.op_type != "MatMul" or len(node.input) != 2:
        return None
    dq = prod.get(node.input[1])
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or dq.input[1] not in inits:
        return None
    q = inits[dq.input[0]]
    if q.data_type != onnx.TensorProto.INT8 or len(q.dims) != 2:
        return None
    if len(dq.input) > 2 and dq.input[2] and (dq.input[2] not in inits or
                                              np.any(numpy_helper.to_array(inits[dq.input[2]]) != 0)):
        return None
    return dq


def weight_matmuls(qdq: onnx.ModelProto, reference: onnx.ModelProto) -> list[dict[str, Any]]:
    """The MatMuls of ``qdq`` with an int8 weight whose float weight is an initializer of the same
    node in ``reference``: node, weight DQ, the float input tensor (in ``reference``), float weight."""
    prod, inits = producers(qdq), initializers(qdq)
    ref_nodes = {n.name: n for n in reference.graph.node}
    ref_inits = initializers(reference)
    out = []
    for node in qdq.graph.node:
        dq = _weight_dq(node, prod, inits)
        ref = ref_nodes.get(node.name)
        if dq is None or ref is None or ref.op_type != "MatMul" or ref.input[1] not in ref_inits:
            continue
        weight = numpy_helper.to_array(ref_inits[ref.input[1]])
        if list(weight.shape) != list(inits[dq.input[0]].dims):
            continue
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        scale = numpy_helper.to_array(inits[dq.input[1]])
        if scale.ndim == 1 and scale.size > 1 and axis not in (1, -1):
            continue                                   # only per-output-column (or per-tensor) scales
        out.append({"node": node.name, "dq": dq, "tensor": ref.input[0], "weight": weight, "scale": scale})
    return out


def input_grams(reference: onnx.ModelProto, tensors: list[str], split: Split, *, batch_size: int = 16,
                threads: int | None = None) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """``(Σ xᵀx, Σ x, rows)`` over the real tokens of ``split`` for each float tensor in
    ``tensors`` (last axis = channels). With an ``attention_mask`` input of the tensor's
    leading shape, padded positions are left out."""
    wanted = list(tensors) + ([MASK_INPUT] if MASK_INPUT in split.feeds else [])
    grams: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}
    for values in iterate_activations(reference, wanted, split, batch_size, threads,
                                      description="weight rounding: input statistics"):
        mask = values.get(MASK_INPUT)
        for name in tensors:
            value = values.get(name)
            if value is None:
                continue
            if mask is not None and value.ndim >= 3 and value.shape[:2] == mask.shape:
                rows = value[mask.astype(bool)]
            else:
                rows = value.reshape(-1, value.shape[-1])
            rows = rows.reshape(-1, value.shape[-1]).astype(np.float32)
            gram, total, count = grams.get(name, (0.0, 0.0, 0))
            grams[name] = (gram + (rows.T @ rows).astype(np.float64), total + rows.sum(axis=0, dtype=np.float64),
                           count + rows.shape[0])
    return grams


def centred_gram(stats: tuple[np.ndarray, np.ndarray, int], offset: np.ndarray | None) -> np.ndarray:
    """``Σ (x + o)ᵀ(x + o)`` from ``(Σ xᵀx, Σ x, rows)``: the second moment of what the int8
    weight meets when the graph adds ``o`` to the input through the bias."""
    gram, total, count = stats
    if offset is None:
        return gram
    o = np.asarray(offset, dtype=np.float64)
    return gram + np.outer(total, o) + np.outer(o, total) + count * np.outer(o, o)


def bias_offsets(records: list[dict[str, Any]] | None) -> dict[str, np.ndarray]:
    """Node -> the constant its int8 weight meets beside the input: with SmoothQuant's channel
    shift and :func:`deploykit.quantize.shift.compensate_weights`, ``Q(x') Wq + (c/s) Wq``, so
    the weight error meets ``x' + c/s`` (the uncentred input), not ``x'``."""
    return {member: centre(record) for record in records or [] if record.get("shift") for member in record["nodes"]}


def round_weights(qdq: onnx.ModelProto, reference: onnx.ModelProto, split: Split, *,
                  records: list[dict[str, Any]] | None = None, grams: dict[str, np.ndarray] | None = None,
                  batch_size: int = 16, threads: int | None = None) -> list[str]:
    """Re-round, in place, every int8 MatMul weight of ``qdq`` by :func:`gptq_round` on the inputs
    ``reference`` (the float graph ``qdq`` was quantized from, same node names) sees on
    ``split``; ``records`` are the smoothing records of ``reference`` (a shifted group's weights
    meet the uncentred input, :func:`bias_offsets`). Returns the nodes whose weights it re-rounded.

    ``grams`` (tensor -> second moment of what its MatMuls' weights meet), when given, is used
    and filled, so the builds of one prepared graph gather the statistics once. The moment of
    the uncentred input is the same whatever grid the shift offsets were snapped to, so it
    serves every range choice."""
    matmuls = weight_matmuls(qdq, reference)
    if not matmuls:
        return []
    grams = grams if grams is not None else {}
    offsets = bias_offsets(records)
    missing = sorted({m["tensor"] for m in matmuls} - set(grams))
    if missing:
        stats = input_grams(reference, missing, split, batch_size=batch_size, threads=threads)
        for m in matmuls:
            if m["tensor"] in stats and m["tensor"] not in grams:
                grams[m["tensor"]] = centred_gram(stats[m["tensor"]], offsets.get(m["node"]))
    inits = initializers(qdq)
    rounded = []
    for m in matmuls:
        gram = grams.get(m["tensor"])
        if gram is None or gram.shape[0] != m["weight"].shape[0]:
            continue
        target = inits[m["dq"].input[0]]
        target.CopyFrom(numpy_helper.from_array(gptq_round(m["weight"], m["scale"], gram), target.name))
        rounded.append(m["node"])
    return rounded
