"""ONNX Runtime runners: ``ort-cpu`` and ``ort-cuda`` (execution providers), explicit threads."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deploykit.errors import UserError
from deploykit.presets import EXACT_QDQ_PRESETS, EXACT_QDQ_SESSION_CONFIG
from deploykit.runners.base import check_feed_names
from deploykit.threads import default_threads

# ONNX Runtime fuses a weight-only DequantizeLinear -> MatMul into MatMulNBits, by default
# computed on int8-quantized activations (an approximation); level 1 computes in fp32.
ORT_EXACT_SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "1"}


def scores_exact(model_path: str | Path) -> bool:
    """Whether ``model_path`` is a deploykit Q/DQ model whose target is not ORT's CPU
    kernels (its recorded preset is in :data:`~deploykit.presets.EXACT_QDQ_PRESETS`)."""
    from deploykit.onnx_utils import get_metadata, load_onnx

    calibration = get_metadata(load_onnx(Path(model_path), load_weights=False)).get("calibration")
    return isinstance(calibration, dict) and calibration.get("preset") in EXACT_QDQ_PRESETS


class OrtRunner:
    """ONNX Runtime session with explicit threads; provider ``cpu`` or ``cuda``.

    ``exact_qdq``: keep Q/DQ pairs as ops instead of fusing them into ORT's integer kernels
    (:data:`EXACT_QDQ_SESSION_CONFIG`). ``None``: exact for a model whose recorded preset
    targets another runtime (:func:`scores_exact`), for accuracy; latency callers pass
    ``False``, since ORT's fused kernels are what ORT runs fast."""

    def __init__(self, path: str | Path, *, provider: str = "cpu", threads: int | None = None,
                 exact_qdq: bool | None = None):
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
            self.exact_qdq = scores_exact(self.path) if exact_qdq is None else exact_qdq
        except Exception:  # noqa: BLE001 - an unreadable file is reported by the session below
            self.exact_qdq = False
        for key, value in (EXACT_QDQ_SESSION_CONFIG if self.exact_qdq else {}).items():
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

    @classmethod
    def for_backend(cls, backend: str, *, model_path: str | Path | None = None, bundle=None,
                    threads: int | None = None, for_latency: bool = False) -> OrtRunner:
        """``ort-cpu`` / ``ort-cuda`` on ``model_path``; fused Q/DQ ``for_latency``, else by its preset."""
        return cls(model_path, provider=backend.split("-", 1)[1], threads=threads,
                   exact_qdq=False if for_latency else None)

    def infer(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        check_feed_names(self.input_names, feeds, str(self.path))
        return self.session.run(self.output_names[:1], {n: feeds[n] for n in self.input_names})[0]
