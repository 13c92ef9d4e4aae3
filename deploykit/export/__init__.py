"""torch -> ONNX: dynamic batch (and sequence), checker-clean, parity with torch measured."""

from __future__ import annotations

import contextlib
import io
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

import deploykit
from deploykit.errors import UserError
from deploykit.io import atomic_path
from deploykit.models.base import ModelBundle
from deploykit.onnx_utils import rename_value, set_metadata

MIN_OPSET = 17


@dataclass
class ExportResult:
    path: Path
    opset: int
    seconds: float
    parity: dict[str, Any] = field(default_factory=dict)
    node_count: int = 0

    def summary(self) -> dict[str, Any]:
        return {"path": str(self.path), "opset": self.opset, "seconds": round(self.seconds, 2),
                "nodes": self.node_count, "parity_max_abs_diff": self.parity.get("max_abs_diff"),
                "parity": self.parity}


def _dynamic_shapes(bundle: ModelBundle) -> tuple[dict[int, Any], ...]:
    dims: dict[str, Any] = {}
    shapes = []
    for name in bundle.input_names:
        axes = {}
        for axis, dim_name in bundle.dynamic_axes.get(name, {}).items():
            if dim_name not in dims:
                upper = bundle.dim_max.get(dim_name)
                dims[dim_name] = torch.export.Dim(dim_name, max=upper) if upper else torch.export.Dim(dim_name)
            axes[axis] = dims[dim_name]
        shapes.append(axes)
    return tuple(shapes)


def export_onnx(bundle: ModelBundle, out_path: str | Path, *, opset: int = 18,
                parity_feeds: list[dict[str, np.ndarray]] | None = None) -> ExportResult:
    """Export ``bundle.module`` to ``out_path`` and measure parity with torch on ``parity_feeds``.

    Inputs are passed positionally in ``bundle.input_names`` order (naming inputs while
    passing keyword arguments in another order silently swaps them).
    """
    if opset < MIN_OPSET:
        raise UserError(f"opset {opset} is below {MIN_OPSET}", fix=f"use export.opset >= {MIN_OPSET}")
    out_path = Path(out_path)
    start = time.perf_counter()
    example = bundle.example_feeds()
    args = tuple(torch.from_numpy(example[n]) for n in bundle.input_names)
    module = _for_export(bundle.module)
    log = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module, args, f=None, dynamo=True, opset_version=opset,
                input_names=list(bundle.input_names), dynamic_shapes=_dynamic_shapes(bundle),
                verbose=False, optimize=True,
            )
        except Exception as exc:
            raise RuntimeError(f"torch.onnx.export failed for {bundle.source}: {exc}\n{log.getvalue()}") from exc
    model = program.model_proto
    from deploykit.plugins import attach_functions

    custom_ops = attach_functions(model)       # deploykit nodes get their decompositions for ORT
    graph = model.graph
    if len(graph.output) != 1:
        raise RuntimeError(f"expected one output, the export has {len(graph.output)}")
    rename_value(graph, graph.output[0].name, bundle.output_name)
    model.doc_string = f"{bundle.name} exported by deploykit {deploykit.__version__}"
    set_metadata(model, {
        "version": deploykit.__version__, "source": bundle.source, "name": bundle.name, "task": bundle.task,
        "input_names": bundle.input_names, "output_name": bundle.output_name, "info": bundle.info,
        "variant": "fp32", **({"custom_ops": custom_ops} if custom_ops else {}),
        **({"options": bundle.options} if bundle.options else {}),
    })
    onnx.checker.check_model(model, full_check=True)
    with atomic_path(out_path) as tmp:
        onnx.save_model(model, str(tmp))
    result = ExportResult(path=out_path, opset=opset, seconds=time.perf_counter() - start,
                          node_count=len(graph.node))
    result.parity = check_parity(bundle, out_path, parity_feeds or [example, bundle.example_feeds(batch=5, seq=23)])
    return result


def _for_export(module: torch.nn.Module) -> torch.nn.Module:
    """The module to trace: a copy with fine-tuning gate scales folded into the output
    projections (one Mul fewer per layer), or ``module`` itself when nothing needs folding.
    Parity is still measured against the unfolded original."""
    from deploykit.recipes.attention import fold_gate_scales, needs_folding

    if not needs_folding(module):
        return module
    import copy

    folded = copy.deepcopy(module)
    fold_gate_scales(folded)
    return folded


def check_parity(bundle: ModelBundle, onnx_path: str | Path, feeds_list: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Max |ONNX Runtime - torch| over the given batches (each may have its own shape)."""
    from deploykit.runners import OrtRunner

    runner = OrtRunner(onnx_path, threads=None)
    worst, shapes = 0.0, []
    for feeds in feeds_list:
        ref = bundle.run_torch(feeds)
        out = runner.infer(feeds)
        diff = float(np.max(np.abs(out.astype(np.float64) - ref.astype(np.float64))))
        worst = max(worst, diff)
        shapes.append({"shape": list(next(iter(feeds.values())).shape), "max_abs_diff": diff})
    return {"max_abs_diff": worst, "batches": shapes, "backend": "ort-cpu"}
