"""A user's FP32 ONNX file -> the graph deploykit quantizes, written into the run/output folder.

The user's file is read, never written. The prepared graph keeps only the embedding output
(token embeddings get mean pooling over the attention mask appended), goes through the same
optimizer deploykit's own exports do (``onnxscript``'s constant folding and dead-code removal,
what ``torch.onnx.export(optimize=True)`` runs), so MatMuls read their weights as 2-D
initializers whether the file came from the TorchScript exporter (``Constant`` nodes,
``Identity`` and ``Shape`` chains) or the dynamo one, and is shape-inferred and checked. Its
parity against the user's file on ONNX Runtime is measured on real batches, like an export's
against torch.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

import deploykit
from deploykit.errors import UserError
from deploykit.export import ExportResult
from deploykit.io import atomic_path, sha256_file
from deploykit.onnx_utils import rename_value, set_metadata, unique_name


def _keep_output(model: onnx.ModelProto, name: str) -> None:
    """Only ``name`` stays a graph output; what no longer reaches it is removed."""
    keep = [o for o in model.graph.output if o.name == name]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    needed = {name}
    nodes = []
    for node in reversed(list(model.graph.node)):
        if needed.intersection(node.output):
            nodes.append(node)
            needed.update(i for i in node.input if i)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    used_inits = [t for t in model.graph.initializer if t.name in needed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(used_inits)


def _append_mean_pool(model: onnx.ModelProto, tokens: str) -> str:
    """sum(tokens * mask, axis=1) / max(sum(mask), 1e-9): the sentence embedding ``[batch, hidden]``."""
    g = model.graph
    n = {k: unique_name(model, f"deploykit_pool_{k}") for k in
         ("mask_f", "mask3", "axis1", "axis2", "masked", "summed", "count", "eps", "count_c", "pooled")}
    g.initializer.extend([
        onnx.numpy_helper.from_array(np.array([2], dtype=np.int64), n["axis2"]),
        onnx.numpy_helper.from_array(np.array([1], dtype=np.int64), n["axis1"]),
        onnx.numpy_helper.from_array(np.array(1e-9, dtype=np.float32), n["eps"]),
    ])
    g.node.extend([
        helper.make_node("Cast", ["attention_mask"], [n["mask_f"]], to=TensorProto.FLOAT, name="deploykit_pool_cast"),
        helper.make_node("Unsqueeze", [n["mask_f"], n["axis2"]], [n["mask3"]], name="deploykit_pool_unsqueeze"),
        helper.make_node("Mul", [tokens, n["mask3"]], [n["masked"]], name="deploykit_pool_mul"),
        helper.make_node("ReduceSum", [n["masked"], n["axis1"]], [n["summed"]], keepdims=0,
                         name="deploykit_pool_sum"),
        helper.make_node("ReduceSum", [n["mask3"], n["axis1"]], [n["count"]], keepdims=0,
                         name="deploykit_pool_count"),
        helper.make_node("Max", [n["count"], n["eps"]], [n["count_c"]], name="deploykit_pool_clamp"),
        helper.make_node("Div", [n["summed"], n["count_c"]], [n["pooled"]], name="deploykit_pool_div"),
    ])
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(n["pooled"], TensorProto.FLOAT, ["batch", None]))
    return n["pooled"]


def _optimized(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    import onnxscript.optimizer

    try:
        optimized = onnxscript.optimizer.optimize(model)
    except Exception as exc:  # noqa: BLE001 - a graph the optimizer cannot read is the user's file
        raise UserError(f"the graph cannot be optimized ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})",
                        path=path, fix="check the file with onnx.checker.check_model") from None
    return onnx.shape_inference.infer_shapes(optimized, data_prop=True)


def prepare_onnx(bundle, out_path: str | Path, *,
                 parity_feeds: list[dict[str, np.ndarray]] | None = None) -> ExportResult:
    """Write the prepared FP32 graph of an ONNX model source to ``out_path`` (never the user's file)."""
    src = Path(bundle.info["onnx_file"])
    out_path = Path(out_path)
    if out_path.resolve() == src.resolve():
        raise UserError("the prepared graph would overwrite the input model", path=out_path,
                        fix="write it into another folder (-o)")
    start = time.perf_counter()
    try:
        model = onnx.load(str(src), load_external_data=True)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot read the model's weights ({type(exc).__name__})", path=src,
                        fix="keep the external data files next to the model") from None
    _keep_output(model, bundle.info["onnx_output"])
    out = bundle.info["onnx_output"]
    if bundle.info["pooling"] == "mean":
        out = _append_mean_pool(model, out)
    model = _optimized(model, src)
    rename_value(model.graph, model.graph.output[0].name, bundle.output_name)
    del model.metadata_props[:]
    model.doc_string = f"{bundle.name} prepared by deploykit {deploykit.__version__} from {src.name}"
    set_metadata(model, {
        "version": deploykit.__version__, "source": bundle.source, "name": bundle.name, "task": bundle.task,
        "input_names": bundle.input_names, "output_name": bundle.output_name, "info": bundle.info,
        "variant": "fp32", "reference": bundle.reference_name, "prepared_from": str(src),
        "prepared_from_sha256": sha256_file(src), **({"options": bundle.options} if bundle.options else {}),
    })
    onnx.checker.check_model(model, full_check=True)
    with atomic_path(out_path, inputs=(src,)) as tmp:
        if model.ByteSize() < 2**31 - 1:
            onnx.save_model(model, str(tmp))
        else:
            onnx.save_model(model, str(tmp), save_as_external_data=True, location=f"{out_path.name}.data")
    result = ExportResult(path=out_path, opset=bundle.info["opset"], seconds=time.perf_counter() - start,
                          node_count=len(model.graph.node))
    result.parity = _parity(bundle, out_path, parity_feeds or [bundle.example_feeds(),
                                                               bundle.example_feeds(batch=5, seq=23)])
    return result


def _parity(bundle, onnx_path: Path, feeds_list: list[dict[str, np.ndarray]]) -> dict:
    from deploykit.runners import OrtRunner

    runner = OrtRunner(onnx_path, threads=None)
    worst, shapes = 0.0, []
    for feeds in feeds_list:
        ref = bundle.run_torch(feeds)
        diff = float(np.max(np.abs(runner.infer(feeds).astype(np.float64) - ref.astype(np.float64))))
        worst = max(worst, diff)
        shapes.append({"shape": list(next(iter(feeds.values())).shape), "max_abs_diff": diff})
    return {"max_abs_diff": worst, "batches": shapes, "backend": "ort-cpu", "against": bundle.reference_name}
