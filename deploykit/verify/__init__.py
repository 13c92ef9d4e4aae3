"""Accuracy of each variant against the torch FP32 reference, on the evaluation split.

Text embeddings: per-sentence cosine to the reference embedding (mean, min, 1st percentile)
and nearest-neighbour agreement: for each sentence, is its nearest other sentence (by cosine)
the same under the variant as under the reference? Classification: top-1 agreement with the
reference, top-1 accuracy against labels when the data has them, and logit cosine.
Both also carry the parity figures: max abs difference and SNR in dB over all elements
(``10 log10(sum ref^2 / sum (ref - out)^2)``; null when the outputs are identical).

Cross-backend verification (:func:`cross_verify`) runs each variant (fp32, int8, ...) on
each backend usable here (torch, ort-cpu, ort-cuda, tensorrt) on the same saved inputs and
keys the figures ``<variant>@<backend>``; :func:`evaluate_checks` applies the recipe's
thresholds to them, and :func:`localize` names the nodes of a Q/DQ model that cost the most.
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


def run_split(runner, split: Split, *, batch_size: int = 32, description: str = "") -> np.ndarray:
    if batch_size < 1:
        from deploykit.errors import UserError

        raise UserError(f"batch size must be at least 1, not {batch_size}", fix="e.g. verify.batch_size: 32")
    n_batches = -(-split.count // batch_size)
    outs = [runner.infer(feeds) for feeds in track(iterate_batches(split.feeds, batch_size), total=n_batches,
                                                    description=description or f"verify {runner.backend}")]
    return np.concatenate(outs, axis=0)


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
        output = run_split(runner, split, batch_size=batch_size, description=f"verify {name}@{runner.backend}")
        if task == "text-embedding":
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


def parity_entry(task: str, reference: np.ndarray, output: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
    metrics = embedding_metrics(reference, output)[0] if task == "text-embedding" else \
        classification_metrics(reference, output, labels)[0]
    return {**metrics, "samples": int(output.shape[0])}


def cross_verify(runners: dict[str, Any], reference: np.ndarray, split: Split, task: str, *,
                 batch_size: int = 32) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray]]:
    """Run ``{"<variant>@<backend>": runner}`` on ``split``; (parity entries, outputs)."""
    parity: dict[str, dict[str, Any]] = {}
    outputs: dict[str, np.ndarray] = {}
    for key, runner in runners.items():
        output = run_split(runner, split, batch_size=batch_size, description=f"verify {key}")
        outputs[key] = output
        parity[key] = parity_entry(task, reference, output, split.labels)
    return parity, outputs


def evaluate_checks(rules: dict[str, str], parity: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Thresholds on the parity entries: ``int8.cosine_mean`` applies to int8 on every backend
    it ran on, ``int8@tensorrt.cosine_mean`` to one. A rule that matches nothing fails (a gate
    must not pass because its variant did not run)."""
    results = []
    for key, rule in rules.items():
        variant, metric = key.rsplit(".", 1)
        keys = [k for k in parity if (k == variant if "@" in variant else k.split("@", 1)[0] == variant)]
        keys = [k for k in keys if not k.endswith("@torch") or variant.endswith("@torch")] or keys
        threshold = " ".join(str(rule).split())
        if not keys:
            results.append({"check": key, "value": None, "threshold": threshold, "passed": False,
                            "note": f"no '{variant}' result to check"})
        for k in keys:
            value = parity[k].get(metric)
            if metric == "snr_db" and value is None and parity[k].get("max_abs_diff") == 0:
                ok = parse_rule(rule)[0] in (">=", ">")      # identical outputs: infinite SNR
            else:
                ok = passes(value, rule)
            results.append({"check": f"{k}.{metric}", "value": value, "threshold": threshold, "passed": ok})
    return results


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
