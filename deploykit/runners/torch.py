"""The ``torch`` runner: eager FP32 on the CPU, the baseline every variant is compared against."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deploykit.errors import UserError
from deploykit.runners.base import check_feed_names
from deploykit.threads import default_threads


class TorchRunner:
    """Eager torch FP32 on the CPU: the baseline every variant is compared against."""

    def __init__(self, bundle, *, threads: int | None = None):
        self.bundle = bundle
        self.backend = "torch"
        self.threads = threads or default_threads()
        self.input_names = list(bundle.input_names)

    @classmethod
    def for_backend(cls, backend: str, *, model_path: str | Path | None = None, bundle=None,
                    threads: int | None = None, for_latency: bool = False) -> TorchRunner:
        """The model source ``bundle`` in eager torch."""
        if bundle is None:
            raise UserError("the torch backend needs the model source", fix="pass --model")
        return cls(bundle, threads=threads)

    def infer(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        check_feed_names(self.input_names, feeds, self.bundle.source)
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self.bundle.run_torch(feeds)
        finally:
            torch.set_num_threads(previous)
