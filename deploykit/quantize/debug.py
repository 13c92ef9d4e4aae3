"""Per-node quantization error: which ONNX nodes hurt, by how much, and which torch module
they came from.

For every node of the Q/DQ model that reads a dequantized tensor:

* **added** error: the node alone, quantized as in the Q/DQ model (its input Q/DQ pairs and
  quantized weights), fed the *float* model's activations and compared with the float
  model's output of that node. This isolates what quantizing this node costs; it is the
  order in which the accuracy-driven search falls nodes back to float.
* **accumulated** error: the node's output in the full Q/DQ model against the float model:
  what the network has lost up to that point.

Both as SNR in dB (``10 log10(sum y^2 / sum (y - y_q)^2)``, higher is better) and cosine,
over all elements of all batches. The float counterpart of a smoothed Q/DQ model is rebuilt
from the FP32 model and the smoothing record saved next to the INT8 model.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from deploykit.data import Split, iterate_batches
from deploykit.errors import UserError
from deploykit.progress import track
from deploykit.quantize.graph import augmented_session, consumers, cpu_session, producers


@dataclass
class NodeError:
    node: str
    op_type: str
    module: str | None                # torch module path (from the exporter's name scopes)
    added_snr_db: float
    added_cosine: float
    accumulated_snr_db: float
    accumulated_cosine: float
    added_mse: float = 0.0            # the added error's mean square (absolute, not relative)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def torch_module(node: onnx.NodeProto) -> str | None:
    """The torch module a node came from, from the dynamo exporter's name-scope metadata."""
    meta = {p.key: p.value for p in node.metadata_props}
    scopes = meta.get("pkg.torch.onnx.name_scopes")
    if not scopes:
        return None
    try:
        parts = json.loads(scopes.replace("'", '"'))
    except json.JSONDecodeError:
        return None
    modules = [p for p in parts[:-1] if p]
    op = parts[-1] if parts else ""
    if not modules:
        return op or None
    return modules[-1] if op.startswith(("linear", "conv")) else f"{modules[-1]} ({op})"


def quantized_nodes(qdq: onnx.ModelProto) -> list[tuple[onnx.NodeProto, dict[str, str], str]]:
    """(node, {dequantized input -> the float tensor its QuantizeLinear reads}, float output)
    for every non-Q/DQ node that reads a DequantizeLinear output (a Linear's output taken after
    its bias), and for every attention op
    in its INT8 form (int8 inputs straight from QuantizeLinear; its float output is the
    DequantizeLinear after it, named as the FP32 graph names the op's output)."""
    from deploykit.plugins import DOMAIN, INT8_FORMS

    prod = producers(qdq)
    users = consumers(qdq)
    inits = {i.name for i in qdq.graph.initializer}
    outputs = {o.name for o in qdq.graph.output}
    int8_forms = set(INT8_FORMS.values())
    out = []
    for node in qdq.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if node.domain == DOMAIN and node.op_type in int8_forms:
            after = users.get(node.output[0], [])
            if len(after) != 1 or after[0].op_type != "DequantizeLinear":
                continue
            mapping = {name: prod[name].input[0] for name in node.input[:3]}
            mapping.update({name: name for name in node.input[3:] if name and name not in inits})
            out.append((node, mapping, after[0].output[0]))
            continue
        mapping = {}
        plain = []
        for name in node.input:
            dq = prod.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                if name and name not in inits:
                    plain.append(name)       # a float activation input: fed as is
                continue
            q = prod.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                mapping[name] = q.input[0]
            elif dq.input[0] in inits:
                mapping[name] = ""           # a weight: stays inside the extracted subgraph
            else:
                mapping = {}                 # reads an int8 op's output: that op is the unit
                break
        if mapping:
            mapping.update({name: name for name in plain})
            out.append((node, mapping, _linear_output(node, users, inits, outputs)))
    return out


def _linear_output(node: onnx.NodeProto, users, inits: set[str], outputs: set[str]) -> str:
    """Where a quantized Linear's output is compared: after its bias ``Add`` when it has one
    (the only reader, one constant input), since bias correction and SmoothQuant's channel
    shift compensate there what the int8 MatMul alone gets wrong on purpose."""
    out = node.output[0]
    readers = users.get(out, [])
    if (node.op_type in ("MatMul", "Gemm") and out not in outputs and len(readers) == 1
            and readers[0].op_type == "Add" and sum(1 for i in readers[0].input if i in inits) == 1):
        return readers[0].output[0]
    return out


class _Acc:
    __slots__ = ("ref2", "out2", "dot", "err2", "count")

    def __init__(self):
        self.ref2 = self.out2 = self.dot = self.err2 = 0.0
        self.count = 0

    def add(self, ref: np.ndarray, out: np.ndarray) -> None:
        r, o = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
        self.ref2 += float(r @ r)
        self.out2 += float(o @ o)
        self.dot += float(r @ o)
        self.err2 += float((r - o) @ (r - o))
        self.count += r.size

    def snr_db(self) -> float:
        if self.err2 == 0.0:
            return 200.0                     # exact: report a finite ceiling, not inf
        return 10.0 * math.log10(max(self.ref2, 1e-300) / self.err2)

    def cosine(self) -> float:
        den = math.sqrt(self.ref2 * self.out2)
        return self.dot / den if den > 0 else 1.0


def node_errors(float_model: onnx.ModelProto, qdq_model: onnx.ModelProto, split: Split, *,
                batch_size: int = 16, threads: int | None = None) -> list[NodeError]:
    """Per-node added and accumulated error on ``split``, worst added SNR first."""
    from onnx.utils import Extractor

    qnodes = quantized_nodes(qdq_model)
    if not qnodes:
        raise UserError("the quantized model has no quantized node (no DequantizeLinear feeds any node)",
                        fix="pass the INT8 Q/DQ model written by deploykit calibrate")
    float_names = {n for out in float_model.graph.node for n in out.output}
    needed_float: dict[str, None] = {}
    for node, mapping, output in qnodes:
        for src in mapping.values():
            if src:
                needed_float.setdefault(src, None)
        needed_float.setdefault(output, None)
    missing = [n for n in needed_float if n not in float_names and n not in {i.name for i in float_model.graph.input}]
    if missing:
        raise UserError(f"the float model lacks tensors the quantized model reads ({missing[:3]}...)",
                        fix="give the FP32 model this INT8 model was calibrated from "
                            "(with its .ranges.json next to the INT8 model if it was smoothed)")
    extractor = Extractor(qdq_model)
    singles = []
    for node, mapping, output in qnodes:
        inputs = sorted({src for src in mapping.values() if src})
        # unoptimized: ORT would otherwise fuse the Q/DQ away into integer kernels
        singles.append(cpu_session(extractor.extract_model(inputs, [output]), threads, optimize=False))
    float_session = augmented_session(float_model, list(needed_float), threads)
    qdq_session = augmented_session(qdq_model, [output for _, _, output in qnodes], threads)
    f_outs = [o.name for o in float_session.get_outputs()]
    q_outs = [o.name for o in qdq_session.get_outputs()]
    f_inputs = [i.name for i in float_session.get_inputs()]
    added = [_Acc() for _ in qnodes]
    accumulated = [_Acc() for _ in qnodes]
    n_batches = -(-split.count // batch_size)
    for feeds in track(iterate_batches(split.feeds, batch_size), total=n_batches, description="per-node error"):
        run_feeds = {n: feeds[n] for n in f_inputs}
        fvals = dict(zip(f_outs, float_session.run(f_outs, run_feeds)))
        fvals.update(run_feeds)
        qvals = dict(zip(q_outs, qdq_session.run(q_outs, run_feeds)))
        for k, ((_, _, output), sess) in enumerate(zip(qnodes, singles)):
            ref = fvals[output]
            single = sess.run(None, {i.name: fvals[i.name] for i in sess.get_inputs()})[0]
            added[k].add(ref, single)
            accumulated[k].add(ref, qvals[output])
    errors = [NodeError(node.name, node.op_type, torch_module(node), a.snr_db(), a.cosine(), c.snr_db(), c.cosine(),
                        a.err2 / max(a.count, 1))
              for (node, _, _), a, c in zip(qnodes, added, accumulated)]
    return sorted(errors, key=lambda e: (e.added_snr_db, e.node))


def float_counterpart(fp32_model: onnx.ModelProto, ranges_json: Path | None, *,
                      quantized: Path | None = None, fp32: Path | None = None) -> onnx.ModelProto:
    """The float graph an INT8 model was quantized from: ``fp32_model``, smoothed again
    from the record in its ``.ranges.json`` when there is one, and with its softmax · V
    products offset again when the calibration offset them (the same rewrite, in the same
    order as calibration: smoothing first). ``quantized`` and ``fp32`` are the files the
    record must belong to (checked by hash)."""
    if ranges_json is None or not Path(ranges_json).is_file():
        return fp32_model
    from deploykit.quantize.record import read_ranges
    from deploykit.quantize.smoothquant import reapply

    record = read_ranges(ranges_json, quantized=quantized, fp32=fp32)
    smoothing = record.get("smoothing") or []
    model = reapply(fp32_model, smoothing) if smoothing else fp32_model
    if (record.get("config") or {}).get("probability_offset"):
        from deploykit.quantize.probabilities import offset_probabilities

        model, _ = offset_probabilities(onnx.shape_inference.infer_shapes(model))
    return model


def plot_node_errors(errors: list[NodeError], dest: Path, top: int = 30) -> Path:
    """Horizontal bars of the worst ``top`` nodes' added SNR, with the accumulated SNR marked."""
    from matplotlib.figure import Figure

    from deploykit.io import atomic_path

    worst = errors[:top][::-1]
    fig = Figure(figsize=(9.0, 0.28 * len(worst) + 1.4), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    labels = [f"{e.module or e.node} [{e.op_type}]" for e in worst]
    y = np.arange(len(worst))
    ax.barh(y, [e.added_snr_db for e in worst], color="C3", alpha=0.8, label="added by this node alone")
    ax.plot([e.accumulated_snr_db for e in worst], y, "o", color="C0", markersize=4,
            label="accumulated at its output")
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xlabel("SNR of the node's output vs float (dB, higher is better)")
    ax.set_title(f"Quantization error per node (worst {len(worst)} by added SNR)", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08 - 0.9 / max(len(worst), 1)), ncol=2)
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    return dest
