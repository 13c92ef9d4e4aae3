"""Accuracy of each variant against the torch FP32 reference, on the evaluation split.

Text embeddings: per-sentence cosine to the reference embedding (mean, min, 1st percentile)
and nearest-neighbour agreement: for each sentence, is its nearest other sentence (by cosine)
the same under the variant as under the reference? Classification: top-1 agreement with the
reference, top-1 accuracy against labels when the data has them, and logit cosine.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deploykit.data import Split, iterate_batches
from deploykit.progress import track


_RULE = re.compile(r"^\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*$")


def parse_rule(rule: str) -> tuple[str, float] | None:
    """``'>= 0.995'`` -> (">=", 0.995); None if malformed."""
    match = _RULE.match(str(rule))
    if not match:
        return None
    try:
        return match.group(1), float(match.group(2))
    except ValueError:
        return None


def passes(value: float | None, rule: str) -> bool:
    op, number = parse_rule(rule)
    if value is None:
        return False
    return {">=": value >= number, "<=": value <= number, ">": value > number, "<": value < number}[op]


def task_metrics(task: str, reference: np.ndarray, output: np.ndarray,
                 labels: np.ndarray | None = None) -> dict[str, float]:
    if task == "text-embedding":
        return embedding_metrics(reference, output)[0]
    return classification_metrics(reference, output, labels)[0]


def _rows_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    num = np.sum(a * b, axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return num / np.maximum(den, 1e-12)


def nearest_neighbours(emb: np.ndarray) -> np.ndarray:
    """Index of each row's most cosine-similar other row."""
    x = emb.astype(np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    return np.argmax(sim, axis=1)


def embedding_metrics(reference: np.ndarray, output: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
    cos = _rows_cosine(reference, output)
    nn_ref, nn_out = nearest_neighbours(reference), nearest_neighbours(output)
    metrics = {
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "cosine_p01": float(np.percentile(cos, 1)),
        "nn_agreement": float(np.mean(nn_ref == nn_out)),
        "max_abs_diff": float(np.max(np.abs(reference.astype(np.float64) - output.astype(np.float64)))),
    }
    return metrics, cos


def classification_metrics(reference: np.ndarray, output: np.ndarray,
                           labels: np.ndarray | None) -> tuple[dict[str, float], np.ndarray]:
    cos = _rows_cosine(reference, output)
    metrics = {
        "top1_agreement": float(np.mean(reference.argmax(1) == output.argmax(1))),
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "max_abs_diff": float(np.max(np.abs(reference.astype(np.float64) - output.astype(np.float64)))),
    }
    if labels is not None:
        metrics["top1"] = float(np.mean(output.argmax(1) == labels))
    return metrics, cos


def run_split(runner, split: Split, *, batch_size: int = 32, description: str = "") -> np.ndarray:
    n_batches = -(-split.count // batch_size)
    outs = [runner.infer(feeds) for feeds in track(iterate_batches(split.feeds, batch_size), total=n_batches,
                                                    description=description or f"verify {runner.backend}")]
    return np.concatenate(outs, axis=0)


@dataclass
class VerifyResult:
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    distributions: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def report_part(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "distributions": self.distributions}


def verify(variants: dict[str, Any], reference: np.ndarray, split: Split, task: str, *,
           batch_size: int = 32, reference_name: str = "torch-fp32") -> VerifyResult:
    """Run each ``{variant: runner}`` on ``split`` and compare with ``reference`` outputs."""
    result = VerifyResult()
    if task == "image-classification" and split.labels is not None:
        result.accuracy[reference_name] = {"top1": float(np.mean(reference.argmax(1) == split.labels))}
    for name, runner in variants.items():
        start = time.perf_counter()
        output = run_split(runner, split, batch_size=batch_size, description=f"verify {name}@{runner.backend}")
        if task == "text-embedding":
            metrics, cos = embedding_metrics(reference, output)
        else:
            metrics, cos = classification_metrics(reference, output, split.labels)
        result.accuracy[name] = metrics
        # Full precision: FP32 gaps (1 - cosine) are ~1e-13 and rounding would erase them.
        result.distributions[name] = {"cosine": [float(c) for c in cos]}
        result.seconds[name] = time.perf_counter() - start
    return result
