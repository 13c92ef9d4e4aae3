"""Data checked against the ONNX model it is about to be fed to, before ONNX Runtime (or the
torch reference) runs it.

ONNX Runtime reports a wrong feed deep inside a kernel (``indices element out of data
bounds``, a broadcast failure in an Add, ``Unexpected input data type``), torch with an
``IndexError``. :func:`check_feeds` finds the same problems first and raises a one-line
:class:`~deploykit.errors.UserError` naming the data and the model file:

- input names: a required model input missing from the data, or a name the model does not take;
- rank, fixed sizes and dtype (a dtype is cast when no value changes: int32 -> int64, bool -> int64,
  float64 -> float32; float -> int is refused);
- inputs that disagree on a shared dimension (``input_ids`` vs ``attention_mask`` vs
  ``token_type_ids`` sequence length, or the batch);
- ids outside ``[0, rows)`` of the embedding table an integer input indexes (the vocabulary
  of ``input_ids``: the first dim of the word-embedding Gather initializer);
- sequences longer than the position-embedding table, when the model has one.

Only :mod:`deploykit.errors`, :mod:`deploykit.io`, :mod:`deploykit.onnx_utils`, ``onnx`` and ``numpy``
are imported (no cycle: they import nothing of deploykit above them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from deploykit.errors import UserError

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Ops that pass an index tensor on unchanged in value (the path from a graph input to a Gather).
_PASS_INDICES = {"Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten"}
# Ops that pass a table on (a Q/DQ model dequantizes its embedding table).
_PASS_TABLE = {"DequantizeLinear", "Identity", "Cast"}


@dataclass
class InputSpec:
    name: str
    dtype: np.dtype | None           # None: a type numpy has no name for (left to the runtime)
    dims: list[int | str | None]     # int: fixed size, str: a named dimension, None: free


@dataclass
class FeedSpec:
    """What an ONNX model takes: its inputs, the tables its integer inputs index, its position table."""
    model: str
    inputs: list[InputSpec]
    optional: list[str] = field(default_factory=list)          # inputs with an initializer default
    tables: dict[str, tuple[str, int]] = field(default_factory=dict)   # input -> (table, rows)
    positions: tuple[str, int] | None = None                   # (table, rows)


def _np_dtype(elem_type: int) -> np.dtype | None:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except Exception:  # noqa: BLE001 - undefined / bfloat16 / float8 and similar
        return None


def feed_spec(model: onnx.ModelProto, name: str = "the model") -> FeedSpec:
    """Read :class:`FeedSpec` from ``model`` (weights need not be loaded: only initializer dims are read)."""
    graph = model.graph
    dims = {i.name: list(i.dims) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    dims[node.output[0]] = list(attr.t.dims)
    producer = {out: node for node in graph.node for out in node.output}
    inputs, optional = [], []
    for value in graph.input:
        if value.name in dims:
            optional.append(value.name)
            continue
        tensor = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]
        inputs.append(InputSpec(value.name, _np_dtype(tensor.elem_type), shape))
    graph_inputs = {i.name for i in inputs}

    def table(value: str) -> tuple[str, int] | None:
        for _ in range(8):
            if value in dims:
                shape = dims[value]
                return (value, int(shape[0])) if len(shape) == 2 else None
            node = producer.get(value)
            if node is None or node.op_type not in _PASS_TABLE:
                return None
            value = node.input[0]
        return None

    def source(value: str) -> str | None:
        for _ in range(8):
            if value in graph_inputs:
                return value
            node = producer.get(value)
            if node is None or node.op_type not in _PASS_INDICES:
                return None
            value = node.input[0]
        return None

    spec = FeedSpec(name, inputs, optional)
    for node in graph.node:
        if node.op_type != "Gather" or len(node.input) < 2:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        found = table(node.input[0]) if axis == 0 else None
        if found is None:
            continue
        fed_by = source(node.input[1])
        if fed_by is not None:
            if fed_by not in spec.tables or found[1] < spec.tables[fed_by][1]:
                spec.tables[fed_by] = found
        elif "position" in found[0].lower() and (spec.positions is None or found[1] < spec.positions[1]):
            spec.positions = found
    return spec


_SPECS: dict[tuple[str, int, int], FeedSpec] = {}


def model_feed_spec(path: str | Path) -> FeedSpec:
    """:func:`feed_spec` of the ONNX file at ``path`` (cached while the file is unchanged)."""
    from deploykit.onnx_utils import load_onnx

    path = Path(path)
    stat = path.stat() if path.is_file() else None
    key = (str(path.resolve()), stat.st_mtime_ns if stat else 0, stat.st_size if stat else 0)
    if key not in _SPECS:
        _SPECS[key] = feed_spec(load_onnx(path, load_weights=False), str(path))
    return _SPECS[key]


def castable(values: np.ndarray, dtype: np.dtype) -> bool:
    """Whether ``values`` can be cast to ``dtype`` without changing any value's meaning."""
    src = values.dtype
    if src == dtype or np.can_cast(src, dtype, casting="safe"):
        return True
    if src.kind in "iu" and dtype.kind in "iu":
        if values.size == 0:
            return True
        info = np.iinfo(dtype)
        return bool(values.min() >= info.min and values.max() <= info.max)
    return src.kind == "f" and dtype.kind == "f"     # float64 -> float32: the usual numpy default


def _used_length(feeds: dict[str, np.ndarray], width: int) -> int:
    """Columns the model runs after :func:`deploykit.data.iterate_batches` drops all-padding ones."""
    mask = feeds.get("attention_mask")
    if mask is None or mask.ndim != 2 or mask.shape[1] != width:
        return width
    used = np.flatnonzero(mask.any(axis=0))
    return int(used[-1]) + 1 if used.size else 1


def check_feeds(feeds: dict[str, np.ndarray], model: str | Path | FeedSpec, *, data: str | Path,
                trimmed: bool = True, length_fix: str | None = None) -> dict[str, np.ndarray]:
    """Check ``feeds`` (from ``data``: a file or a source name) against the ONNX ``model``; return them
    with dtypes cast to the model's where no value changes. Raises a one-line :class:`UserError`
    naming both ``data`` and the model file. ``trimmed``: the consumer drops all-padding columns
    (:func:`deploykit.data.iterate_batches`), so only the used length must fit the position table;
    ``length_fix`` is the fix to give for a sequence that is too long."""
    spec = model if isinstance(model, FeedSpec) else model_feed_spec(model)
    data = str(data)
    where = data if Path(data).suffix in (".npz", ".txt") else spec.model

    def fail(message: str, fix: str) -> None:
        if where == spec.model:
            message += f" (data: {data})"
        raise UserError(message, path=where, fix=fix)

    _check_names(feeds, spec, data, fail)
    out, named = _check_shapes_and_types(feeds, spec, fail)
    text = [n for n in TEXT_INPUTS if n in out and out[n].ndim == 2]
    _check_agreement(out, spec, named, text, fail)
    _check_ids(out, spec, fail)
    _check_positions(out, spec, text, trimmed, length_fix, fail)
    return out


def _check_names(feeds, spec: FeedSpec, data: str, fail) -> None:
    takes = [i.name for i in spec.inputs]
    missing = [n for n in takes if n not in feeds]
    unknown = [n for n in feeds if n not in takes and n not in spec.optional]
    if missing or unknown:
        parts = ([f"lacks {missing}"] if missing else []) + ([f"has {unknown}, which it does not take"]
                                                            if unknown else [])
        fail(f"the data does not fit the inputs of the model {spec.model} ({takes}): it "
             + " and ".join(parts),
             f"save arrays named {takes} for {spec.model}, or pass the model {Path(data).name} was made for")


def _check_shapes_and_types(feeds, spec: FeedSpec, fail):
    """Rank, fixed dimensions and dtype per input; returns the (cast) feeds and, per named
    dimension, the ``(input, axis, size)`` that carry it."""
    out = dict(feeds)
    named: dict[str, list[tuple[str, int, int]]] = {}
    for inp in spec.inputs:
        arr = out[inp.name]
        if arr.ndim != len(inp.dims) or any(isinstance(d, int) and d > 0 and arr.shape[a] != d
                                            for a, d in enumerate(inp.dims)):
            shape = ", ".join(str(d) if isinstance(d, int) and d > 0 else "N" if a == 0 else (d or "?")
                              for a, d in enumerate(inp.dims))
            fail(f"input '{inp.name}' has shape {tuple(arr.shape)}, the model takes ({shape}) (model {spec.model})",
                 f"save '{inp.name}' with rank {len(inp.dims)} as {spec.model} takes it "
                 "(e.g. a run's data/evaluation.npz)")
        if inp.dtype is not None and arr.dtype != inp.dtype:
            if not castable(arr, inp.dtype):
                fail(f"input '{inp.name}' is {arr.dtype}, the model takes {inp.dtype} (model {spec.model}; "
                     "a cast would change its values)", f"save '{inp.name}' as {inp.dtype}")
            out[inp.name] = arr.astype(inp.dtype)
        for axis, dim in enumerate(inp.dims):
            if isinstance(dim, str):
                named.setdefault(dim, []).append((inp.name, axis, int(arr.shape[axis])))
    return out, named


def _check_agreement(out, spec: FeedSpec, named, text: list[str], fail) -> None:
    groups = list(named.items())
    if len(text) > 1:                  # whatever the exporter named their dimensions
        groups.append(("sequence", [(n, 1, int(out[n].shape[1])) for n in text]))
    for dim, sizes in groups:
        if len({s for _, _, s in sizes}) > 1:
            listed = ", ".join(f"'{n}' {s}" for n, _, s in sizes)
            label = ("sequence length" if all(n in TEXT_INPUTS and a == 1 for n, a, _ in sizes)
                     else "number of samples" if all(a == 0 for _, a, _ in sizes) else f"dimension '{dim}'")
            fail(f"the inputs disagree on the {label} the model {spec.model} takes: {listed}",
                 "save every input with the same shape (as one tokenizer call gives them)")


def _check_ids(out, spec: FeedSpec, fail) -> None:
    for name, (table, rows) in spec.tables.items():
        arr = out[name]
        if arr.size and arr.dtype.kind in "iu" and (arr.min() < 0 or arr.max() >= rows):
            bad = int(arr.max()) if arr.max() >= rows else int(arr.min())
            kind = "token ids" if name == "input_ids" or "word" in table.lower() else "ids"
            fail(f"input '{name}' holds {kind} outside [0, {rows}) (e.g. {bad}): the model {spec.model} "
                 f"has {rows} rows in its embedding table '{table}'",
                 f"use the tokenizer {spec.model} was trained with (vocabulary {rows}), or a model whose "
                 "vocabulary covers the tokenizer's" if kind == "token ids"
                 else f"keep '{name}' within [0, {rows})")


def _check_positions(out, spec: FeedSpec, text: list[str], trimmed: bool, length_fix: str | None, fail) -> None:
    if spec.positions is None:
        return
    table, rows = spec.positions
    seq = [n for n in (*spec.tables, *text) if out[n].ndim == 2]
    if seq:
        width = int(out[seq[0]].shape[1])
        length = _used_length(out, width) if trimmed else width
        if length > rows:
            fail(f"the sequences are {length} tokens long, longer than the {rows} positions of the model "
                 f"{spec.model} (its table '{table}')",
                 length_fix or f"truncate the sequences to at most {rows} tokens (max_length <= {rows})")


def check_feeds_file(path: str | Path, models: list[str | Path]) -> None:
    """:func:`check_feeds` of a saved ``.npz`` of feeds (its ``labels`` aside) against each model."""
    from deploykit.io import read_npz

    arrays = read_npz(path, what="feeds file")
    arrays.pop("labels", None)
    for model in models:
        check_feeds(arrays, model, data=path)


__all__ = ["FeedSpec", "InputSpec", "feed_spec", "model_feed_spec", "check_feeds", "check_feeds_file", "castable"]

