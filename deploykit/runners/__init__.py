"""Runners: one ``infer(feeds) -> output`` API per backend.

Backends: ``ort-cpu``, ``ort-cuda`` (ONNX Runtime execution providers, :mod:`.ort`), ``torch``
(eager FP32 baseline, :mod:`.torch`) and ``tensorrt`` (an engine from ``deploykit build``,
:mod:`.tensorrt`). Each runner class makes itself from a backend name
(``for_backend(backend, model_path=, bundle=, threads=, for_latency=)``); :data:`RUNNERS` maps the names to
the classes. Thread counts are always set explicitly so latency figures are comparable.
"""

from __future__ import annotations

from pathlib import Path

from deploykit.errors import UserError
from deploykit.runners.base import Runner, check_feed_names
from deploykit.runners.ort import ORT_EXACT_SESSION_CONFIG, OrtRunner, scores_exact
from deploykit.runners.tensorrt import TrtRunner
from deploykit.runners.torch import TorchRunner
from deploykit.threads import default_threads

RUNNERS: dict[str, type] = {"ort-cpu": OrtRunner, "ort-cuda": OrtRunner, "torch": TorchRunner,
                            "tensorrt": TrtRunner}
BACKENDS = tuple(RUNNERS)


def make_runner(backend: str, *, model_path: str | Path | None = None, bundle=None,
                threads: int | None = None, for_latency: bool = False) -> Runner:
    """The runner of ``backend``; ``for_latency``: set up to run fast rather than to score
    (ONNX Runtime then fuses Q/DQ into its integer kernels, ``OrtRunner.exact_qdq``)."""
    runner = RUNNERS.get(backend)
    if runner is None:
        raise UserError(f"unknown backend '{backend}'", fix=f"use one of {', '.join(BACKENDS)}")
    return runner.for_backend(backend, model_path=model_path, bundle=bundle, threads=threads,
                              for_latency=for_latency)


__all__ = ["BACKENDS", "ORT_EXACT_SESSION_CONFIG", "RUNNERS", "OrtRunner", "Runner", "TorchRunner", "TrtRunner",
           "check_feed_names", "default_threads", "make_runner", "scores_exact"]
