"""INT8 embedding tables: each Gather-fed table stored as int8 with one symmetric scale per row.

A transformer's word-embedding table is most of an INT8 file once the MatMul weights are int8
(MiniLM: 30522 x 384 floats, 47 MB of 91 MB). Each row (one token's vector) gets its own
scale ``max|row| / 127`` and is rounded to int8 (zero point 0), so a rare token with small
entries keeps its resolution. Three graph forms, by runtime:

``dq-gather``     int8 initializer -> ``DequantizeLinear(axis=0)`` -> ``Gather``. Standard ONNX;
                  the form TensorRT takes: pre-quantized INT8 weights behind a
                  DequantizeLinear with a per-channel (1-D) scale, zero points 0, every scale
                  strictly positive. The gpu-trt preset's form.
``gather-mul``    ``Gather`` of the int8 rows, ``Cast`` to float, ``Mul`` by the ``Gather`` of their
                  scales: standard ONNX that only ever dequantizes the rows it reads.
``gather-block``  ONNX Runtime's ``com.microsoft.GatherBlockQuantized`` (uint8 data, bits 8, zero
                  point 128, one block spanning the row, so still one scale per row). ONNX
                  Runtime only: TensorRT targets refuse com.microsoft ops
                  (:func:`deploykit.targets.check_model`).

Only tables read solely by ``Gather`` on axis 0, as its data, with at least :data:`MIN_ROWS`
rows are quantized: a table that is also a MatMul weight (tied input/output embeddings) stays
as it is, and tables of a few rows (token types) are a negligible part of the file.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from deploykit.onnx_utils import unique_name
from deploykit.quantize.graph import consumers

FORMS = ("dq-gather", "gather-mul", "gather-block")
VENDOR_DOMAIN = "com.microsoft"
MIN_ROWS = 256


def quantize_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric int8: ``(q, scale)`` with ``q * scale[:, None]`` the dequantized table.

    ``scale = max|row| / 127``; an all-zero row gets scale 1 (its values are 0 whatever the
    scale, and TensorRT needs every scale strictly positive). Rounding is half to even, as
    ONNX QuantizeLinear rounds."""
    table = np.asarray(table, dtype=np.float32)
    peak = np.abs(table).max(axis=1)
    scale = np.where(peak > 0, peak / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    q = np.clip(np.rint(table / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def embedding_tables(model: onnx.ModelProto, min_rows: int = MIN_ROWS) -> list[str]:
    """Float initializers of rank 2 and ``min_rows`` rows or more read only as Gather data on axis 0."""
    users = consumers(model)
    graph_inputs = {i.name for i in model.graph.input}
    out = []
    for init in model.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or len(init.dims) != 2 or init.dims[0] < min_rows:
            continue
        if init.name in graph_inputs:            # an overridable input, not a constant
            continue
        readers = users.get(init.name, [])
        if readers and all(_gathers_rows(node, init.name) for node in readers):
            out.append(init.name)
    return out


def _gathers_rows(node: onnx.NodeProto, name: str) -> bool:
    if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or node.input[0] != name:
        return False
    if name in list(node.input)[1:]:
        return False
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    return axis == 0


def quantize_embeddings(model: onnx.ModelProto, form: str = "dq-gather",
                        min_rows: int = MIN_ROWS) -> list[dict[str, Any]]:
    """Rewrite ``model`` in place: every embedding table (:func:`embedding_tables`) as int8 in ``form``.

    Returns one record per table: name, shape, the bytes before and after."""
    if form not in FORMS:
        raise ValueError(f"unknown embedding form '{form}' (use one of {', '.join(FORMS)})")
    names = embedding_tables(model, min_rows)
    if not names:
        return []
    inits = {i.name: i for i in model.graph.initializer}
    records = []
    for name in names:
        table = numpy_helper.to_array(inits[name])
        q, scale = quantize_rows(table)
        readers = consumers(model)[name]       # afresh: an earlier table's rewrite rebuilt the node list
        new_inits, before_nodes, _ = _rewrite(model, name, q, scale, readers, form)
        model.graph.initializer.remove(inits[name])
        model.graph.initializer.extend(new_inits)
        # Insert the new nodes before the first reader (keeps the node list topologically sorted).
        nodes = list(model.graph.node)
        if before_nodes:
            first = min(nodes.index(r) for r in readers)
            nodes[first:first] = before_nodes
            del model.graph.node[:]
            model.graph.node.extend(nodes)
        records.append({"name": name, "shape": list(table.shape), "form": form,
                        "bytes_fp32": int(table.nbytes), "bytes_int8": int(sum(_nbytes(t) for t in new_inits))})
        for vi in list(model.graph.value_info):
            if vi.name == name:
                model.graph.value_info.remove(vi)
    if form == "gather-block" and not any(o.domain == VENDOR_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(VENDOR_DOMAIN, 1))
    return records


def _nbytes(tensor: onnx.TensorProto) -> int:
    return numpy_helper.to_array(tensor).nbytes


def _rewrite(model: onnx.ModelProto, name: str, q: np.ndarray, scale: np.ndarray,
             readers: list[onnx.NodeProto], form: str):
    """(initializers, nodes to insert before the readers, readers rewired) for one table."""
    fresh = lambda base: unique_name(model, base)  # noqa: E731
    if form == "dq-gather":
        q_name, s_name = fresh(f"{name}_int8"), fresh(f"{name}_row_scales")
        out = fresh(f"{name}_dequantized")
        dq = helper.make_node("DequantizeLinear", [q_name, s_name], [out], axis=0,
                              name=fresh(f"{name}_DequantizeLinear"))
        for node in readers:
            node.input[0] = out
        return [numpy_helper.from_array(q, q_name), numpy_helper.from_array(scale, s_name)], [dq], readers
    if form == "gather-mul":
        q_name, s_name = fresh(f"{name}_int8"), fresh(f"{name}_row_scales")
        inits = [numpy_helper.from_array(q, q_name), numpy_helper.from_array(scale[:, None], s_name)]
        after: dict[int, list[onnx.NodeProto]] = {}
        for node in readers:
            ids, out = node.input[1], node.output[0]
            rows, rows_f, scales = fresh(f"{out}_rows_int8"), fresh(f"{out}_rows"), fresh(f"{out}_row_scales")
            node.input[0], node.output[0] = q_name, rows
            # The reader now gathers int8 rows; its float output comes from the Mul below.
            after[rows] = [
                helper.make_node("Gather", [s_name, ids], [scales], axis=0, name=fresh(f"{node.name}_scales")),
                helper.make_node("Cast", [rows], [rows_f], to=onnx.TensorProto.FLOAT, name=fresh(f"{node.name}_cast")),
                helper.make_node("Mul", [rows_f, scales], [out], name=fresh(f"{node.name}_dequantize"))]
        nodes = []
        for node in model.graph.node:            # each reader's dequantization right after it
            nodes.append(node)
            nodes.extend(after.get(node.output[0], []) if node.op_type == "Gather" else [])
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        return inits, [], readers
    # gather-block: uint8 = int8 + 128 (the op's default zero point for uint8 data), one block
    # per row: block_size is the smallest power of two >= 16 covering the row.
    q_name, s_name = fresh(f"{name}_int8"), fresh(f"{name}_row_scales")
    dim = q.shape[1]
    block = max(16, 1 << (dim - 1).bit_length())
    data = (q.astype(np.int16) + 128).astype(np.uint8)
    inits = [numpy_helper.from_array(data, q_name), numpy_helper.from_array(scale[:, None], s_name)]
    new_nodes = []
    for node in readers:
        new = helper.make_node("GatherBlockQuantized", [q_name, node.input[1], s_name], list(node.output),
                               name=node.name or fresh(f"{name}_GatherBlockQuantized"), domain=VENDOR_DOMAIN,
                               gather_axis=0, quantize_axis=1, block_size=block, bits=8)
        new_nodes.append((node, new))
    for old, new in new_nodes:
        old.CopyFrom(new)
    return inits, [], readers


def embedding_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    return {"tables": [r["name"] for r in records], "form": records[0]["form"] if records else None,
            "bytes_fp32": sum(r["bytes_fp32"] for r in records), "bytes_int8": sum(r["bytes_int8"] for r in records)}
