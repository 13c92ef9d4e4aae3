"""One decode step of a causal LM with its KV cache, as ONNX (``deploykit export --decode-step``).

Inputs (``P`` = past length, dynamic; ``B`` dynamic)::

    input_ids       int64 [B, 1]        the new token
    attention_mask  int64 [B, P + 1]    1 for every real past token and the new one
    position_ids    int64 [B, 1]        the new token's position (its row's real past length)
    past_key_<i>    float [B, Hkv, P, D]   layer i's cached keys (RoPE applied), values
    past_value_<i>

Outputs: ``logits`` [B, vocabulary] of the new token, then ``present_key_<i>`` /
``present_value_<i>`` [B, Hkv, P + 1, D] (the past with the new token appended). Padded past
slots (mask 0) are ignored by the attention, so rows of one batch may have different real
lengths: a right-padded prefill's cache feeds the step as it is.

The step is the model's own forward with a ``DynamicCache`` built from the past tensors,
traced by torch's dynamo exporter with dynamic batch and past length. Parity is measured on
real prefixes: each text's second-to-last token decoded after its prefix's prefill
(:func:`decode_feeds`), whose logits must also equal the prefill's at that position.
"""

from __future__ import annotations

import contextlib
import io
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

import deploykit
from deploykit.data import Split
from deploykit.errors import UserError
from deploykit.io import atomic_path, sha256_arrays
from deploykit.models.base import ModelBundle
from deploykit.onnx_utils import set_metadata

DECODE_TASK = "text-generation-decode"


def _causal_lm(bundle: ModelBundle) -> torch.nn.Module:
    model = getattr(bundle.module, "model", None)
    if bundle.task != "text-generation" or model is None or not hasattr(model, "config"):
        raise UserError(f"{bundle.source} is not a causal language model: there is no decode step to export",
                        fix="use a causal LM source (embedded:smollm2, hf:<Llama/GPT-2 folder>) or export without "
                            "--decode-step")
    if any(type(m).__name__ == "HFDecoderAttention" for m in model.modules()):
        raise UserError("the model's attention was transformed (a sliding window or another swap); those run "
                        "prefill only", fix="export the decode step of the untransformed model")
    return model


def _layers(model: torch.nn.Module) -> int:
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(getattr(text, "num_hidden_layers", 0) or getattr(text, "n_layer", 0))


def input_names(layers: int) -> list[str]:
    return ["input_ids", "attention_mask", "position_ids"] + [
        f"past_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]


def output_names(layers: int) -> list[str]:
    return ["logits"] + [f"present_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]


def _cache_keyword(model: torch.nn.Module) -> str:
    """``cache`` where the model's forward takes it (transformers >= 5.2x renamed it), else
    ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _returned_cache(out: Any):
    cache = getattr(out, "past_key_values", None)
    return cache if cache is not None else out.cache


class DecodeStep(torch.nn.Module):
    """``(input_ids, attention_mask, position_ids, *past) -> (logits, *present)``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.layers = _layers(model)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{_cache_keyword(self.model): cache})
        present = []
        for layer in _returned_cache(out).layers[: self.layers]:
            present += [layer.keys, layer.values]
        return (out.logits[:, -1], *present)


@torch.inference_mode()
def decode_feeds(bundle: ModelBundle, split: Split, *, batch_size: int = 8) -> tuple[Split, np.ndarray, np.ndarray]:
    """Decode-step feeds from ``split``'s texts: each row's second-to-last real token after its
    prefix (the real tokens before it), with the prefix's KV cache from a torch prefill padded
    to the split's width - 2. Also the full-sequence prefill's logits at that position (what
    the step must reproduce) and the row's last real token (the step's true next token, for
    perplexity). Rows with fewer than three real tokens are left out."""
    model = _causal_lm(bundle)
    ids_all, mask_all = split.feeds["input_ids"], split.feeds["attention_mask"]
    lengths = mask_all.sum(axis=1).astype(np.int64)
    keep = np.flatnonzero(lengths >= 3)
    if keep.size == 0:
        raise UserError("no text has three tokens or more to decode", fix="use longer texts or a larger data split")
    width = ids_all.shape[1] - 2
    feeds: dict[str, list[np.ndarray]] = {}
    expected, targets = [], []
    for start in range(0, keep.size, batch_size):
        rows = keep[start: start + batch_size]
        n = lengths[rows]
        at = torch.from_numpy(n - 2)                      # the step's token; its prefix is [0, n - 2)
        index = torch.arange(len(rows))
        ids = torch.from_numpy(ids_all[rows])
        prefix_mask = torch.from_numpy((np.arange(width)[None, :] < (n - 2)[:, None]).astype(np.int64))
        prefix = ids[:, :width].masked_fill(prefix_mask == 0, 0)
        out = _returned_cache(model(input_ids=prefix, attention_mask=prefix_mask, use_cache=True))
        full = model(input_ids=ids, attention_mask=torch.from_numpy(mask_all[rows]), use_cache=False)
        expected.append(full.logits[index, at].float().numpy())
        targets.append(ids[index, at + 1].numpy())
        step = {"input_ids": ids[index, at][:, None].numpy().astype(np.int64),
                "attention_mask": np.concatenate([prefix_mask.numpy(), np.ones((len(rows), 1), np.int64)], axis=1),
                "position_ids": (n - 2)[:, None].astype(np.int64)}
        for i, layer in enumerate(out.layers[: _layers(model)]):
            step[f"past_key_{i}"] = layer.keys.float().numpy()
            step[f"past_value_{i}"] = layer.values.float().numpy()
        for k, v in step.items():
            feeds.setdefault(k, []).append(v)
    arrays = {k: np.ascontiguousarray(np.concatenate(v)) for k, v in feeds.items()}
    return (Split(f"{split.name}-decode", arrays, sha256_arrays(arrays)), np.concatenate(expected),
            np.concatenate(targets))


def step_metrics(reference: np.ndarray, logits: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """A variant's step logits against the reference's (both [N, vocabulary]) with the LM
    metrics of a prefill (:func:`deploykit.metrics.lm_metrics`): perplexity of the true next
    tokens and its ratio, top-1 agreement, cosine of the logits at the reference's top tokens.
    Each step is a two-position record whose first position predicts ``targets``."""
    from deploykit.metrics import lm_metrics, lm_record

    ids = np.stack([np.zeros_like(targets), targets], axis=1).astype(np.int64)
    mask = np.ones_like(ids)

    def record(x: np.ndarray, ref: np.ndarray | None = None) -> np.ndarray:
        return lm_record(np.stack([x, np.zeros_like(x)], axis=1), ids, mask, 2, ref)

    ref = record(reference)
    metrics, _ = lm_metrics(ref, record(logits, ref))
    return {**metrics, "steps": metrics["tokens"]}


def run_step_torch(bundle: ModelBundle, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The torch step's logits for ``feeds`` (one batch)."""
    step = DecodeStep(_causal_lm(bundle)).eval()
    names = input_names(step.layers)
    with torch.inference_mode():
        return step(*(torch.from_numpy(feeds[n]) for n in names))[0].float().numpy()


def export_decode_step(bundle: ModelBundle, out_path: str | Path, split: Split, *, opset: int = 18,
                       batch_size: int = 8) -> dict[str, Any]:
    """Export the decode step of ``bundle`` to ``out_path``; parity with the torch step and
    with the prefill on ``split``'s texts. Returns the record ``<out>.export.json`` holds."""
    model = _causal_lm(bundle)
    out_path = Path(out_path)
    start = time.perf_counter()
    step = DecodeStep(model).eval()
    layers = step.layers
    feeds, expected, _ = decode_feeds(bundle, split, batch_size=batch_size)
    example = {k: v[:2] for k, v in feeds.feeds.items()}
    names = input_names(layers)
    batch = torch.export.Dim("batch")
    past = torch.export.Dim("past", min=1, max=int(bundle.dim_max.get("sequence", 4096)) - 1)
    # forward(input_ids, attention_mask, position_ids, *past): the varargs are one tuple here
    shapes = ({0: batch}, {0: batch, 1: past + 1}, {0: batch}, tuple({0: batch, 2: past} for _ in range(2 * layers)))
    log = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(step, tuple(torch.from_numpy(example[n]) for n in names), f=None, dynamo=True,
                                        opset_version=opset, input_names=names, output_names=output_names(layers),
                                        dynamic_shapes=shapes, verbose=False, optimize=True)
        except Exception as exc:
            raise RuntimeError(f"torch.onnx.export of the decode step failed for {bundle.source}: {exc}\n"
                               f"{log.getvalue()}") from exc
    onnx_model = program.model_proto
    onnx_model.doc_string = f"{bundle.name} decode step exported by deploykit {deploykit.__version__}"
    set_metadata(onnx_model, {
        "version": deploykit.__version__, "source": bundle.source, "name": bundle.name, "task": DECODE_TASK,
        "input_names": names, "output_name": "logits", "info": {**bundle.info, "layers": layers},
        "variant": "fp32", **({"options": bundle.options} if bundle.options else {})})
    onnx.checker.check_model(onnx_model, full_check=True)
    with atomic_path(out_path) as tmp:
        onnx.save_model(onnx_model, str(tmp))
    parity = step_parity(bundle, out_path, feeds, expected, batch_size=batch_size)
    return {"model": bundle.source, "path": str(out_path), "kind": "decode-step", "opset": opset, "layers": layers,
            "nodes": len(onnx_model.graph.node), "seconds": round(time.perf_counter() - start, 2),
            "parity": parity, "parity_max_abs_diff": parity["max_abs_diff"]}


def step_parity(bundle: ModelBundle, onnx_path: Path, feeds: Split, expected: np.ndarray, *,
                batch_size: int = 8) -> dict[str, Any]:
    """Max |ORT step - torch step| and |ORT step - prefill| of the logits over ``feeds``."""
    from deploykit.data import iterate_batches
    from deploykit.runners import OrtRunner

    runner = OrtRunner(onnx_path, threads=None)
    worst = worst_prefill = 0.0
    done = 0
    for batch in iterate_batches(feeds.feeds, batch_size):
        out = runner.infer(batch)
        ref = run_step_torch(bundle, batch)
        rows = out.shape[0]
        worst = max(worst, float(np.max(np.abs(out.astype(np.float64) - ref))))
        worst_prefill = max(worst_prefill, float(np.max(np.abs(out.astype(np.float64) - expected[done: done + rows]))))
        done += rows
    return {"max_abs_diff": worst, "vs_prefill_max_abs_diff": worst_prefill, "samples": done, "backend": "ort-cpu"}
