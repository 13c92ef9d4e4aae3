"""A stand-in for TensorRT where it is not installed, to test the code around it: the
environment require_tensorrt reports, build_engine recording its calls and writing a
placeholder, and a TrtRunner that runs the engine's ONNX model on ONNX Runtime."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable


def stand_in_tensorrt(monkeypatch, *, gpu: str, compute_capability: str, version: str = "10.15.1",
                      onnx_of: Callable[[Path], Path]) -> list[dict]:
    """Patch deploykit.engine (and make ``tensorrt`` findable); ``onnx_of(engine)`` names the ONNX model of an engine this stand-in
    did not build (e.g. one bundled). Returns the build calls (onnx, engine, and build_engine's
    keyword arguments), in order."""
    import deploykit.engine as engine
    import deploykit.runners.tensorrt as trt_runner
    from deploykit.engine import TrtEnvironment
    from deploykit.runners import OrtRunner

    calls: list[dict] = []
    built: dict[Path, Path] = {}

    def build(onnx_path, out, **kw):
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"stand-in engine")
        built[out] = Path(onnx_path)
        calls.append({"onnx": Path(onnx_path), "engine": out, **kw})

    class Runner:
        def __init__(self, path):
            path = Path(path)
            self._ort = OrtRunner(built.get(path) or onnx_of(path), threads=1)
            self.backend, self.threads, self.input_names = "tensorrt", 1, self._ort.input_names

        def infer(self, feeds):
            return self._ort.infer(feeds)

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "tensorrt" else real_find_spec(name, *a))
    monkeypatch.setattr(engine, "require_tensorrt", lambda where=None, plugins=True: TrtEnvironment(
        version=version, gpu=gpu, compute_capability=compute_capability))
    monkeypatch.setattr(engine, "build_engine", build)
    monkeypatch.setattr(trt_runner, "TrtRunner", Runner)
    return calls
