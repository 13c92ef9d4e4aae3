"""Accuracy figures of an output against its reference: per-row cosine, nearest-neighbour
agreement, top-1 agreement / accuracy, max abs difference and SNR in dB (a leaf: numpy only)."""

from __future__ import annotations

from typing import Any

import numpy as np


def task_metrics(task: str, reference: np.ndarray, output: np.ndarray,
                 labels: np.ndarray | None = None) -> dict[str, float]:
    if task == LM_TASK:
        return lm_metrics(reference, output)[0]
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
    return {**task_metrics(task, reference, output, labels), "samples": int(output.shape[0])}


# ----------------------------------------------------------------------------- causal language models
# A causal LM's logits (batch x sequence x vocabulary: 40 x 128 x 49152 floats are 1 GB) are never
# kept: each batch is reduced to a per-position record as it comes out of the model.
LM_TASK = "text-generation"
LM_TOPK = 32
_VALID, _NLL, _ARGMAX, _LSE, _IDX = 0, 1, 2, 3, 4


def lm_record(logits: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray, width: int,
              reference: np.ndarray | None = None, k: int = LM_TOPK) -> np.ndarray:
    """Per-position record of one batch's logits, float32 ``(batch, width, 4 + 2k)``: valid (the
    position and the next are real tokens), negative log-likelihood of the next token, argmax
    token, log-sum-exp, then k token ids and the logits at those ids: the record's own top k, or
    (``reference``: that batch's reference record) the reference's top k, so the two compare
    logit by logit. Positions past the batch's length (trimmed padding) are zero up to ``width``.
    Token ids are exact in float32 (below 2**24)."""
    x = np.asarray(logits, dtype=np.float32)
    b, s, v = x.shape
    k = min(k, v)
    lse = np.empty((b, s), dtype=np.float64)
    for row in range(b):               # one sequence at a time: the temporaries stay seq x vocab
        peak = x[row].max(axis=-1, keepdims=True)
        lse[row] = (np.log(np.exp(x[row] - peak).sum(axis=-1, keepdims=True, dtype=np.float64)) + peak)[..., 0]
    ids = np.asarray(input_ids)[:, :s].astype(np.int64)
    mask = np.asarray(attention_mask)[:, :s] > 0
    out = np.zeros((b, width, 4 + 2 * k), dtype=np.float32)
    nxt = np.take_along_axis(x[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]
    out[:, : s - 1, _VALID] = mask[:, :-1] & mask[:, 1:]
    out[:, : s - 1, _NLL] = lse[:, :-1] - nxt
    out[:, :s, _ARGMAX] = x.argmax(axis=-1)
    out[:, :s, _LSE] = lse
    if reference is None:
        idx = np.stack([np.argpartition(-x[row], k - 1, axis=-1)[..., :k] for row in range(b)])
    else:
        idx = np.asarray(reference)[:, :s, _IDX: _IDX + k].astype(np.int64)
    out[:, :s, _IDX: _IDX + k] = idx
    out[:, :s, _IDX + k:] = np.take_along_axis(x, idx, axis=-1)
    return out


def lm_reducer(width: int, reference: np.ndarray | None = None):
    """``reduce(feeds, logits, start) -> record`` for :func:`deploykit.verify.run_split`:
    each batch against the reference rows ``start..start+batch`` when a reference is given."""
    def reduce(feeds: dict[str, np.ndarray], logits: np.ndarray, start: int) -> np.ndarray:
        ref = None if reference is None else reference[start: start + logits.shape[0]]
        return lm_record(logits, feeds["input_ids"], feeds["attention_mask"], width, ref)
    return reduce


def output_reducer(task: str, feeds: dict[str, np.ndarray], reference: np.ndarray | None = None):
    """The per-batch reduction of ``task``'s outputs (None: outputs are kept as they come)."""
    if task != LM_TASK:
        return None
    return lm_reducer(int(feeds["input_ids"].shape[1]), reference)


def lm_metrics(reference: np.ndarray, output: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
    """Perplexity of both on the evaluated next tokens and their ratio, top-1 next-token agreement
    with the reference, and the cosine of the logits over the reference's top-k tokens per
    position (mean / min / 1st percentile; the distribution returned is each sequence's mean).
    Both records must come from :func:`lm_record`, ``output``'s gathered at ``reference``'s ids."""
    if reference.shape != output.shape or reference.ndim != 3:
        raise ValueError(f"LM records differ in shape: {reference.shape} vs {output.shape}")
    k = (reference.shape[-1] - _IDX) // 2
    if not np.array_equal(reference[..., _IDX: _IDX + k], output[..., _IDX: _IDX + k]):
        raise ValueError("the output's logits were not gathered at the reference's top-k token ids")
    valid = reference[..., _VALID] > 0
    count = int(valid.sum())
    ref_nll = float(reference[..., _NLL][valid].astype(np.float64).mean()) if count else 0.0
    out_nll = float(output[..., _NLL][valid].astype(np.float64).mean()) if count else 0.0
    ref_vals = reference[..., _IDX + k:][valid].astype(np.float64)
    out_vals = output[..., _IDX + k:][valid].astype(np.float64)
    cos = _rows_cosine(ref_vals, out_vals) if count else np.ones(1)
    rows = np.zeros(reference.shape[:2])
    rows[valid] = cos if count else 0.0
    per_sequence = rows.sum(axis=1) / np.maximum(valid.sum(axis=1), 1)
    metrics = {
        "perplexity": float(np.exp(out_nll)),
        "reference_perplexity": float(np.exp(ref_nll)),
        "perplexity_ratio": float(np.exp(out_nll - ref_nll)),
        "top1_agreement": float(np.mean(reference[..., _ARGMAX][valid] == output[..., _ARGMAX][valid])) if count else 1.0,
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "cosine_p01": float(np.percentile(cos, 1)),
        "max_abs_diff": float(np.max(np.abs(ref_vals - out_vals))) if count else 0.0,
        "snr_db": snr_db(ref_vals, out_vals) if count else None,
        "tokens": count,
    }
    return metrics, per_sequence
