"""Runners: one ``infer(feeds) -> output`` API per backend.

Backends: ``ort-cpu``, ``ort-cuda`` (ONNX Runtime execution providers), ``torch`` (eager
FP32 baseline) and ``tensorrt`` (an engine from ``deploykit build``; ``deploykit.engine``). Thread counts are always set explicitly so latency figures are comparable.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np

from deploykit.errors import UserError

BACKENDS = ("ort-cpu", "ort-cuda", "torch", "tensorrt")
# ONNX Runtime fuses a weight-only DequantizeLinear -> MatMul into MatMulNBits, by default
# computed on int8-quantized activations (an approximation); level 1 computes in fp32.
ORT_EXACT_SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "1"}


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Runner(Protocol):
    backend: str
    input_names: list[str]
    threads: int

    def infer(self, feeds: dict[str, np.ndarray]) -> np.ndarray: ...


def _check_feed_names(expected: list[str], feeds: dict[str, np.ndarray], where: str) -> None:
    missing = [n for n in expected if n not in feeds]
    if missing:
        raise UserError(f"the model expects input(s) {expected} but the data provides {sorted(feeds)}",
                        path=where, fix="use data prepared for this model (same model source / input names)")


class OrtRunner:
    """ONNX Runtime session with explicit threads; provider ``cpu`` or ``cuda``."""

    def __init__(self, path: str | Path, *, provider: str = "cpu", threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise UserError("ONNX file not found", path=self.path, fix="check the path")
        self.backend = f"ort-{provider}"
        self.threads = threads or default_threads()
        providers = {"cpu": ["CPUExecutionProvider"],
                     "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}.get(provider)
        if providers is None:
            raise UserError(f"unknown ONNX Runtime provider '{provider}'", fix="use cpu or cuda")
        if providers[0] not in ort.get_available_providers():
            raise UserError(f"backend {self.backend} is not usable here ({providers[0]} is not in this "
                            f"onnxruntime build)", fix="run deploykit doctor; use ort-cpu or install onnxruntime-gpu")
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # Weight-only int8 (binary weights as int8 +-1 + scales) computes in fp32, not on
        # int8-quantized activations: the graph's own semantics (ORT's default for its fused
        # MatMulNBits is an approximation). Models with activation Q/DQ are not affected.
        for key, value in ORT_EXACT_SESSION_CONFIG.items():
            options.add_session_config_entry(key, value)
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types for bad files
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"ONNX Runtime cannot load the model ({first})", path=self.path,
                            fix="re-export it with deploykit export") from None
        if provider == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise UserError("the CUDA execution provider could not start (no usable GPU)", path=self.path,
                            fix="run deploykit doctor; use ort-cpu")
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        _check_feed_names(self.input_names, feeds, str(self.path))
        return self.session.run(self.output_names[:1], {n: feeds[n] for n in self.input_names})[0]


class TorchRunner:
    """Eager torch FP32 on the CPU: the baseline every variant is compared against."""

    def __init__(self, bundle, *, threads: int | None = None):
        self.bundle = bundle
        self.backend = "torch"
        self.threads = threads or default_threads()
        self.input_names = list(bundle.input_names)

    def infer(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        _check_feed_names(self.input_names, feeds, self.bundle.source)
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self.bundle.run_torch(feeds)
        finally:
            torch.set_num_threads(previous)


def make_runner(backend: str, *, model_path: str | Path | None = None, bundle=None,
                threads: int | None = None) -> Runner:
    if backend == "torch":
        if bundle is None:
            raise UserError("the torch backend needs the model source", fix="pass --model")
        return TorchRunner(bundle, threads=threads)
    if backend in ("ort-cpu", "ort-cuda"):
        return OrtRunner(model_path, provider=backend.split("-", 1)[1], threads=threads)
    if backend == "tensorrt":
        from deploykit.engine import TrtRunner

        return TrtRunner(model_path)
    raise UserError(f"unknown backend '{backend}'", fix=f"use one of {', '.join(BACKENDS)}")
