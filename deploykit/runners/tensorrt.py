"""The ``tensorrt`` runner: an engine from ``deploykit build`` (:mod:`deploykit.engine`) behind
the runners' ``infer(feeds) -> output`` API, on CUDA via torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deploykit.engine import PLUGIN_MODULES, engine_info, require_tensorrt
from deploykit.errors import UserError
from deploykit.runners.base import check_feed_names


class TrtRunner:
    """A TensorRT engine behind the runners' ``infer(feeds) -> output`` API (CUDA via torch)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.suffix == ".onnx":          # verify / bench pass the ONNX model: its engine sits next to it
            if not self.path.with_suffix(".engine").is_file():
                raise UserError("no TensorRT engine next to this model", path=self.path,
                                fix=f"build it first: deploykit build {self.path}")
            self.path = self.path.with_suffix(".engine")
        if not self.path.is_file():
            raise UserError("engine file not found", path=self.path, fix="build one with deploykit build")
        plugins = engine_info(self.path).get("plugins")      # None: built elsewhere, not recorded
        require_tensorrt(self.path, plugins=bool(plugins))
        import importlib

        import tensorrt as trt
        import torch

        for module in PLUGIN_MODULES if plugins is None or plugins else []:
            try:                         # engines built without AOT need the Python definitions
                importlib.import_module(module)
            except ImportError:
                if plugins:              # recorded as using deploykit ops: they must load
                    raise
        self._trt, self._torch = trt, torch
        self.backend = "tensorrt"
        self.threads = 1
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise UserError("TensorRT cannot load this engine (built by another TensorRT version or GPU?)",
                            path=self.path, fix="rebuild it here with deploykit build; see its .json for where "
                                                "it was built")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self.stream = torch.cuda.Stream()

    @classmethod
    def for_backend(cls, backend: str, *, model_path: str | Path | None = None, bundle=None,
                    threads: int | None = None, for_latency: bool = False) -> TrtRunner:
        """The engine of ``model_path`` (TensorRT picks its own threads)."""
        return cls(model_path)

    def _torch_dtype(self, name: str):
        trt, torch = self._trt, self._torch
        table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
                 trt.int64: torch.int64, trt.int8: torch.int8, trt.bool: torch.bool}
        if hasattr(trt, "bfloat16"):
            table[trt.bfloat16] = torch.bfloat16
        return table[self.engine.get_tensor_dtype(name)]

    def infer(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        torch = self._torch
        check_feed_names(self.input_names, feeds, str(self.path))
        keep = []
        for name in self.input_names:
            tensor = torch.from_numpy(np.ascontiguousarray(feeds[name])).to("cuda").to(self._torch_dtype(name))
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
            keep.append(tensor)
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=self._torch_dtype(name), device="cuda")
            self.context.set_tensor_address(name, out.data_ptr())
            outputs[name] = out
        with torch.cuda.stream(self.stream):
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise UserError("TensorRT execution failed", path=self.path, fix="see TensorRT's log above")
        self.stream.synchronize()
        return outputs[self.output_names[0]].float().cpu().numpy()
