"""Accuracy of each variant against the torch FP32 reference, on the evaluation split.

Text embeddings: per-sentence cosine to the reference embedding (mean, min, 1st percentile)
and nearest-neighbour agreement: for each sentence, is its nearest other sentence (by cosine)
the same under the variant as under the reference? Classification: top-1 agreement with the
reference, top-1 accuracy against labels when the data has them, and logit cosine.
Causal language models (``text-generation``): perplexity of each on the evaluation text and its
ratio to the reference's, top-1 next-token agreement, and the cosine of the logits over the
reference's top-k tokens, from per-batch records (:func:`deploykit.metrics.lm_record`).
All also carry the parity figures: max abs difference and SNR in dB over all elements
(``10 log10(sum ref^2 / sum (ref - out)^2)``; null when the outputs are identical).

Cross-backend verification (:func:`cross_verify`) runs each variant (fp32, int8, ...) on
each backend usable here (torch, ort-cpu, ort-cuda, tensorrt) on the same saved inputs and
keys the figures ``<variant>@<backend>``; :func:`evaluate_checks` applies the recipe's
thresholds to them, and :func:`localize` names the nodes of a Q/DQ model that cost the most.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deploykit.acceptance import evaluate_checks, parse_rule, passes
from deploykit.data import Split, iterate_batches, map_batches
from deploykit.metrics import (LM_TASK, classification_metrics, embedding_metrics, lm_metrics, nearest_neighbours,
                               output_reducer, parity_entry, snr_db, task_metrics)
from deploykit.progress import track


def run_split(runner, split: Split, *, batch_size: int = 32, description: str = "", reduce=None) -> np.ndarray:
    """``runner``'s outputs on ``split`` in batches; ``reduce(feeds, output, start)`` (e.g. a causal
    LM's per-position record, :func:`deploykit.metrics.output_reducer`) shrinks each batch's
    output before the next batch runs."""
    if batch_size < 1:
        from deploykit.errors import UserError

        raise UserError(f"batch size must be at least 1, not {batch_size}", fix="e.g. verify.batch_size: 32")
    n_batches = -(-split.count // batch_size)
    batches = track(iterate_batches(split.feeds, batch_size), total=n_batches,
                    description=description or f"verify {runner.backend}")
    return map_batches(runner.infer, batches, batch_size, reduce)


@dataclass
class VerifyResult:
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    distributions: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)     # each variant's outputs, in split order

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
        output = run_split(runner, split, batch_size=batch_size, description=f"verify {name}@{runner.backend}",
                           reduce=output_reducer(task, split.feeds, reference))
        if task == LM_TASK:
            metrics, cos = lm_metrics(reference, output)
        elif task == "text-embedding":
            metrics, cos = embedding_metrics(reference, output)
        else:
            metrics, cos = classification_metrics(reference, output, split.labels)
        result.accuracy[name] = metrics
        # Full precision: FP32 gaps (1 - cosine) are ~1e-13 and rounding would erase them.
        result.distributions[name] = {"cosine": [float(c) for c in cos]}
        result.seconds[name] = time.perf_counter() - start
        result.outputs[name] = output
    return result


# ----------------------------------------------------------------------------- across backends
ALL_BACKENDS = ("torch", "ort-cpu", "ort-cuda", "tensorrt")


def backend_availability() -> dict[str, str | None]:
    """``{backend: None if usable here else why not}`` (nothing is imported that could crash)."""
    import onnxruntime as ort

    from deploykit.engine import tensorrt_status

    out: dict[str, str | None] = {"torch": None, "ort-cpu": None}
    gpu = None
    try:
        import torch

        gpu = torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - a broken CUDA setup is "no GPU" here
        gpu = False
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        out["ort-cuda"] = "this onnxruntime build has no CUDA execution provider"
    elif not gpu:
        out["ort-cuda"] = "no CUDA GPU"
    else:
        out["ort-cuda"] = None
    out["tensorrt"] = tensorrt_status()[1]        # a stub tensorrt package is not TensorRT
    return out


def choose_backends(requested: list[str]) -> tuple[list[str], dict[str, str]]:
    """(backends to run, {backend: reason} skipped). ``auto`` means every usable one; a backend
    asked for by name that is not usable is skipped with its reason, never faked."""
    from deploykit.errors import UserError

    bad = [b for b in requested if b != "auto" and b not in ALL_BACKENDS]
    if bad:
        raise UserError(f"unknown backend(s) {bad}", fix=f"use auto or {', '.join(ALL_BACKENDS)}")
    wanted = list(ALL_BACKENDS) if "auto" in requested else list(dict.fromkeys(requested))
    available = backend_availability()
    run = [b for b in wanted if available.get(b) is None]
    skipped = {b: str(available[b]) for b in wanted if available.get(b) is not None}
    return run, skipped



def cross_verify(runners: dict[str, Any], reference: np.ndarray, split: Split, task: str, *,
                 batch_size: int = 32) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray]]:
    """Run ``{"<variant>@<backend>": runner}`` on ``split``; (parity entries, outputs)."""
    parity: dict[str, dict[str, Any]] = {}
    outputs: dict[str, np.ndarray] = {}
    for key, runner in runners.items():
        output = run_split(runner, split, batch_size=batch_size, description=f"verify {key}",
                           reduce=output_reducer(task, split.feeds, reference))
        outputs[key] = output
        parity[key] = parity_entry(task, reference, output, split.labels)
    return parity, outputs



def suggest_exclusions(errors: list[Any], *, limit: int = 10, margin_db: float = 6.0) -> list[str]:
    """Nodes whose added error stands out: added SNR more than ``margin_db`` below the median
    of all quantized nodes (worst first, at most ``limit``; at least the worst one). A starting
    point for ``--exclude``; ``deploykit calibrate --tune`` measures the fallback instead."""
    if not errors:
        return []
    snrs = np.array([e.added_snr_db for e in errors], dtype=np.float64)
    median = float(np.median(snrs[np.isfinite(snrs)])) if np.isfinite(snrs).any() else 0.0
    worst = sorted(errors, key=lambda e: e.added_snr_db)
    picked = [e.node for e in worst if e.added_snr_db < median - margin_db][:limit]
    return picked or [worst[0].node]


def localize(fp32_path, qdq_path, split: Split, *, samples: int = 64, top: int = 10) -> dict[str, Any]:
    """Per-node error of a Q/DQ model against its float counterpart on ``samples`` inputs
    (deploykit.quantize.debug) and the nodes to exclude."""
    from pathlib import Path

    from deploykit.onnx_utils import load_onnx
    from deploykit.quantize.debug import float_counterpart, node_errors
    from deploykit.quantize.record import ranges_path_for

    qdq_path = Path(qdq_path)
    float_model = float_counterpart(load_onnx(Path(fp32_path)), ranges_path_for(qdq_path),
                                    quantized=qdq_path, fp32=Path(fp32_path))
    part = Split(split.name, {k: v[:samples] for k, v in split.feeds.items()}, split.sha256)
    errors = node_errors(float_model, load_onnx(qdq_path), part)
    return {"samples": part.count, "nodes": [e.to_dict() for e in errors[:top]],
            "exclude": suggest_exclusions(errors)}


__all__ = ["ALL_BACKENDS", "VerifyResult", "backend_availability", "choose_backends", "classification_metrics",
           "cross_verify", "embedding_metrics", "lm_metrics", "output_reducer", "evaluate_checks", "localize", "nearest_neighbours", "parity_entry",
           "parse_rule", "passes", "run_split", "snr_db", "suggest_exclusions", "task_metrics", "verify"]
