"""Reading ONNX files as user input, and the provenance deploykit stores inside them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx

from deploykit.errors import UserError

META_PREFIX = "deploykit."


def load_onnx(path: str | Path, *, load_weights: bool = True, fix: str = "re-export it with deploykit export",
              missing_fix: str = "check the path, or create it with deploykit export") -> onnx.ModelProto:
    """The model at ``path``; a missing, unreadable or empty file is one line naming ``fix``."""
    path = Path(path)
    if not path.is_file():
        raise UserError("ONNX file not found", path=path, fix=missing_fix)
    try:
        model = onnx.load(str(path), load_external_data=load_weights)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types for garbage
        raise UserError(f"not a readable ONNX model ({type(exc).__name__})", path=path, fix=fix) from None
    if not model.graph.node or not model.graph.output:
        raise UserError("the ONNX file has an empty graph", path=path, fix=fix)
    return model


def opset_of(model: onnx.ModelProto) -> int:
    """The default-domain opset the model imports (0 when none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def external_data_files(model: onnx.ModelProto) -> list[str]:
    """The external-data file names the model's initializers point to (relative to the model)."""
    return sorted({e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"})


def name_allocator(model: onnx.ModelProto):
    """``fresh(base)``: ``base``, or ``base_1``, ``base_2`` ..., a name no value, initializer,
    graph input/output or node of ``model`` had when this was called, nor any name ``fresh``
    gave before (for rewrites that build their nodes before putting them in the graph)."""
    graph = model.graph
    taken = {n for node in graph.node for n in list(node.input) + list(node.output)}
    taken |= {i.name for i in graph.initializer} | {n.name for n in graph.node}
    taken |= {v.name for v in list(graph.input) + list(graph.output)}

    def fresh(base: str) -> str:
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        return name
    return fresh


def unique_name(model: onnx.ModelProto, base: str) -> str:
    """``base``, or ``base_1``, ``base_2`` ...: a name no value, initializer, graph input/output or
    node of ``model`` has yet."""
    return name_allocator(model)(base)


def get_metadata(model: onnx.ModelProto) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for prop in model.metadata_props:
        if prop.key.startswith(META_PREFIX):
            try:
                out[prop.key[len(META_PREFIX):]] = json.loads(prop.value)
            except json.JSONDecodeError:
                out[prop.key[len(META_PREFIX):]] = prop.value
    return out


def set_metadata(model: onnx.ModelProto, values: dict[str, Any]) -> None:
    existing = {p.key: p for p in model.metadata_props}
    for key, value in values.items():
        full = META_PREFIX + key
        text = json.dumps(value)
        if full in existing:
            existing[full].value = text
        else:
            model.metadata_props.add(key=full, value=text)


def graph_input_names(model: onnx.ModelProto) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def rename_value(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename a value everywhere in ``graph``; a different value already called ``new`` is moved aside."""
    if old == new:
        return
    names = {n for node in graph.node for n in list(node.input) + list(node.output)}
    names |= {v.name for v in list(graph.input) + list(graph.output) + list(graph.value_info)}
    names |= {i.name for i in graph.initializer}
    if new in names:
        spare, k = f"{new}__0", 0
        while spare in names:
            k += 1
            spare = f"{new}__{k}"
        rename_value(graph, new, spare)
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.name == old:
            value.name = new
    for init in graph.initializer:
        if init.name == old:
            init.name = new


def model_bytes(path: str | Path) -> int:
    """Bytes of an ONNX file on disk with the external-data files its initializers name."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    return path.stat().st_size + sum((path.parent / n).stat().st_size for n in external_data_files(model)
                                     if (path.parent / n).is_file())
