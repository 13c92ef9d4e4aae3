"""Accuracy figures of an output against its reference: per-row cosine, nearest-neighbour
agreement, top-1 agreement / accuracy, max abs difference and SNR in dB (a leaf: numpy only)."""

from __future__ import annotations

from typing import Any

import numpy as np


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


def snr_db(reference: np.ndarray, output: np.ndarray) -> float | None:
    """Signal-to-noise ratio of ``output`` against ``reference`` over all elements (None: identical)."""
    ref = reference.astype(np.float64)
    noise = float(np.sum((ref - output.astype(np.float64)) ** 2))
    if noise == 0.0:
        return None
    return float(10.0 * np.log10(max(float(np.sum(ref ** 2)), 1e-300) / noise))


def embedding_metrics(reference: np.ndarray, output: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
    cos = _rows_cosine(reference, output)
    nn_ref, nn_out = nearest_neighbours(reference), nearest_neighbours(output)
    metrics = {
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "cosine_p01": float(np.percentile(cos, 1)),
        "nn_agreement": float(np.mean(nn_ref == nn_out)),
        "max_abs_diff": float(np.max(np.abs(reference.astype(np.float64) - output.astype(np.float64)))),
        "snr_db": snr_db(reference, output),
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
        "snr_db": snr_db(reference, output),
    }
    if labels is not None:
        metrics["top1"] = float(np.mean(output.argmax(1) == labels))
    return metrics, cos


def parity_entry(task: str, reference: np.ndarray, output: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
    metrics = embedding_metrics(reference, output)[0] if task == "text-embedding" else \
        classification_metrics(reference, output, labels)[0]
    return {**metrics, "samples": int(output.shape[0])}
