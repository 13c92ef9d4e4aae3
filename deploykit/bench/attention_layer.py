"""One attention layer on ONNX Runtime CPU: dense softmax vs deploykit's ops, by sequence length.

The layer takes q, k, v (1, H, N, D) as inputs (no projections), is exported once with a
dynamic N, and timed at each N (warm-up runs, then the median and tail of timed runs). The
op's settings come from a study variant's transforms (``neighborhood-attention``,
``linear-attention``; none = dense), so a study reports what its own swap costs. A 2-D
neighborhood window runs over a square grid of side round(sqrt(N)) (the N recorded is s²).
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from typing import Any

import numpy as np

SWAPS = ("neighborhood-attention", "linear-attention")


def layer_op(transforms: list[dict[str, Any]] | None, ndim: int = 1) -> dict[str, Any]:
    """The attention a variant's transforms leave: {"kind": dense | neighborhood | linear, ...};
    ``ndim`` 2 for models whose neighborhood swap runs over a 2-D grid (ViTs)."""
    for t in transforms or []:
        if t.get("name") == "neighborhood-attention":
            return {"kind": "neighborhood", "kernel_size": t.get("kernel_size", 7), "dilation": t.get("dilation", 1),
                    "causal": t.get("causal", False), "ndim": ndim}
        if t.get("name") == "linear-attention":
            return {"kind": "linear", "feature": t.get("feature", "elu1"), "causal": bool(t.get("causal", False)),
                    "decay": t.get("decay")}
    return {"kind": "dense"}


def _spatial(op: dict[str, Any], n: int) -> tuple[int, ...]:
    if op["kind"] == "neighborhood" and op.get("ndim", 1) == 2:
        side = max(int(round(math.sqrt(n))), 1)
        return side, side
    return (n,)


def build_layer(op: dict[str, Any], heads: int, dim: int):
    """The layer as an ONNX model (inputs q, k, v with a dynamic sequence axis or grid)."""
    import torch

    from deploykit.plugins import attach_functions
    from deploykit.plugins.linear_attention.onnx_function import linear_attention_op
    from deploykit.plugins.neighborhood_attention.onnx_function import na_op

    class Layer(torch.nn.Module):
        def forward(self, q, k, v):
            if op["kind"] == "dense":
                return torch.softmax(q @ k.transpose(-1, -2) * dim ** -0.5, dim=-1) @ v
            if op["kind"] == "neighborhood":
                return na_op(q, k, v, op["kernel_size"], op.get("dilation", 1), op.get("causal", False))
            return linear_attention_op(q, k, v, feature=op.get("feature", "elu1"), causal=op.get("causal", False),
                                       decay=op.get("decay"))

    spatial = _spatial(op, 256)
    # Three distinct tensors: passing one tensor three times lets the exporter alias the inputs.
    example = tuple(torch.randn(1, heads, *spatial, dim) for _ in range(3))
    dynamic = {2 + i: f"s{i}" for i in range(len(spatial))}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(Layer(), example, dynamo=True, input_names=["q", "k", "v"],
                                    dynamic_shapes=(dynamic,) * 3, opset_version=18)
    model = program.model_proto
    attach_functions(model)
    return model


def layer_feeds(op: dict[str, Any], n: int, heads: int, dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (1, heads, *_spatial(op, n), dim)
    return {name: rng.standard_normal(shape, dtype=np.float32) for name in ("q", "k", "v")}


def time_layer(model, op: dict[str, Any], lengths: list[int], heads: int, dim: int, *, threads: int | None = None,
               iterations: int = 10, warmup: int = 2) -> dict[int, dict[str, float]]:
    """{N: {"seq_len", "p50_ms", "p90_ms", "p99_ms", ...}} for each N in ``lengths``
    (deploykit.bench's timing loop on the layer's ORT session)."""
    from deploykit.bench import BenchConfig, time_runner
    from deploykit.quantize.graph import cpu_session
    from deploykit.runners import default_threads

    class LayerRunner:
        def __init__(self):
            self.session = cpu_session(model, threads)
            self.threads = threads or default_threads()

        def infer(self, feeds):
            return self.session.run(None, feeds)

    runner = LayerRunner()
    config = BenchConfig(batches=[1], warmup=warmup, iterations=iterations, min_seconds=0.0, max_seconds=1e9)
    out = {}
    for n in lengths:
        feeds = layer_feeds(op, n, heads, dim)
        timed = time_runner(runner, feeds, config)
        seq = int(np.prod(feeds["q"].shape[2:-1]))
        p50 = timed["p50_ms"]
        out[n] = {"seq_len": seq, "batch": 1, "p50_ms": round(p50, 3), "p90_ms": round(timed["p90_ms"], 3),
                  "p99_ms": round(timed["p99_ms"], 3), "throughput_per_s": round(1000.0 / p50, 2),
                  "tokens_per_s": round(seq * 1000.0 / p50, 1)}
    return out
