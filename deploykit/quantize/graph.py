"""Graph helpers shared by calibration, SmoothQuant and the per-node error analysis."""

from __future__ import annotations

from collections import defaultdict
from typing import Iterator

import numpy as np
import onnx

from deploykit.data import Split, iterate_batches
from deploykit.errors import UserError
from deploykit.onnx_utils import graph_input_names


def value_types(model: onnx.ModelProto) -> dict[str, int]:
    types = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in model.graph.initializer:
        types[init.name] = init.data_type
    return types


def is_float(types: dict[str, int], name: str) -> bool:
    return types.get(name) in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            if name:
                users[name].append(node)
    return users


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in model.graph.initializer}


def constant_names(model: onnx.ModelProto) -> set[str]:
    names = {i.name for i in model.graph.initializer}
    names |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return names


def float_op_types(nodes: list[onnx.NodeProto], names: list[str]) -> dict[str, int]:
    """How many of ``names`` there are per op type (of the given ``nodes``; "?" for a name none has)."""
    types = {n.name: n.op_type for n in nodes}
    out: dict[str, int] = {}
    for name in names:
        op = types.get(name, "?")
        out[op] = out.get(op, 0) + 1
    return dict(sorted(out.items()))


def cpu_session(model: onnx.ModelProto, threads: int | None = None, *, optimize: bool = True,
                exact_qdq: bool = False):
    """An in-memory ONNX Runtime CPU session with explicit threads (no fusion when not
    ``optimize``; Q/DQ pairs left as ops, the graph's exact arithmetic, with ``exact_qdq``)."""
    import onnxruntime as ort

    from deploykit.presets import EXACT_QDQ_SESSION_CONFIG
    from deploykit.threads import default_threads

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for key, value in (EXACT_QDQ_SESSION_CONFIG if exact_qdq else {}).items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def augmented_session(model: onnx.ModelProto, tensors: list[str], threads: int | None = None):
    """A CPU session of ``model`` that also returns ``tensors`` (no graph fusion, so every
    tensor exists as computed)."""
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    existing = {o.name for o in augmented.graph.output}
    inputs = set(graph_input_names(augmented))
    types = value_types(model)
    if any(t not in types for t in tensors):          # e.g. a model loaded without shape inference
        augmented = onnx.shape_inference.infer_shapes(augmented)
        types = value_types(augmented)
        unknown = [t for t in tensors if t not in types]
        if unknown:
            raise ValueError(f"no type known for tensors {unknown[:5]} (not in the graph?)")
    for name in tensors:
        if name not in existing and name not in inputs:
            augmented.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
    return cpu_session(augmented, threads, optimize=False)


def iterate_activations(model: onnx.ModelProto, tensors: list[str], split: Split, batch_size: int,
                        threads: int | None = None, description: str = "") -> Iterator[dict[str, np.ndarray]]:
    """For each batch of ``split``: ``{tensor: value}`` for the requested tensors (inputs included)."""
    from deploykit.progress import track

    session = augmented_session(model, tensors, threads)
    input_names = [i.name for i in session.get_inputs()]
    missing = [n for n in input_names if n not in split.feeds]
    if missing:
        raise UserError(f"the data lacks model input(s) {missing}; it has {sorted(split.feeds)}",
                        fix="use data prepared for this model")
    out_names = [o.name for o in session.get_outputs()]
    n_batches = -(-split.count // batch_size)
    for feeds in track(iterate_batches(split.feeds, batch_size), total=n_batches, description=description):
        outputs = dict(zip(out_names, session.run(out_names, {n: feeds[n] for n in input_names})))
        yield {t: outputs[t] if t in outputs else feeds[t] for t in tensors if t in outputs or t in feeds}
