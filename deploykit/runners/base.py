"""What every runner is: ``infer(feeds) -> output``, with its backend name, input names and
thread count; and the feed-name check each runs before inference."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from deploykit.errors import UserError


class Runner(Protocol):
    backend: str
    input_names: list[str]
    threads: int

    def infer(self, feeds: dict[str, np.ndarray]) -> np.ndarray: ...


def check_feed_names(expected: list[str], feeds: dict[str, np.ndarray], where: str) -> None:
    missing = [n for n in expected if n not in feeds]
    if missing:
        raise UserError(f"the model expects input(s) {expected} but the data provides {sorted(feeds)}",
                        path=where, fix="use data prepared for this model (same model source / input names)")
