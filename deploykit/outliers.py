"""Activation outlier metrics, computed as Bondarenko et al. (2023) compute them.

Per transformer layer, forward hooks record

``ffn_out``    the FFN's output projection (BERT ``output.dense``, ViT ``mlp.fc2``)
``ln_in``      LayerNorm inputs: the residual sums (BERT: the LayerNorm after the FFN;
               ViT, pre-LN: ``norm1``/``norm2``, the larger of the two)
``ln_out``     the same LayerNorms' outputs
``block_out``  the layer's output (BERT: = ``ln_out``; ViT: the residual stream after the block)

and, per sequence, the infinity norm ``max |x|`` over all its tokens and channels, and the
kurtosis ``mu4 / (sigma^4 + 1e-6)`` of its values (``sigma`` the Bessel-corrected standard
deviation, as ``torch.std``; an ordinary Gaussian gives ~3). Both are averaged over the
evaluation sequences. The headline figures are the paper's: the maximum over layers of the
average infinity norm, and the kurtosis averaged over layers and the sites ``ffn_out`` and
``block_out``.

One difference: the paper evaluates fixed-length chunks of text with no padding; deploykit's
text batches are padded, and padded positions are left out of both statistics (they are
not part of any sentence).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deploykit.data import Split, iterate_batches
from deploykit.errors import UserError
from deploykit.models.base import ModelBundle
from deploykit.progress import track

SITES = ("ffn_out", "ln_in", "ln_out", "block_out")
KURTOSIS_SITES = ("ffn_out", "block_out")


@dataclass
class _Layer:
    index: int
    hooks: dict[str, tuple[torch.nn.Module, str]]      # site -> (module, "in" | "out")


def find_layers(module: torch.nn.Module) -> list[_Layer]:
    """Transformer layers of a Hugging Face BERT-family encoder or a timm ViT, in order."""
    layers: list[_Layer] = []
    for name, mod in module.named_modules():
        m = re.search(r"(?:^|\.)(?:layer|blocks)\.(\d+)$", name)
        if not m:
            continue
        index = int(m.group(1))
        out = getattr(mod, "output", None)
        if out is not None and hasattr(out, "dense") and hasattr(out, "LayerNorm"):          # BERT, post-LN
            layers.append(_Layer(index, {"ffn_out": (out.dense, "out"), "ln_in": (out.LayerNorm, "in"),
                                         "ln_out": (out.LayerNorm, "out"), "block_out": (out.LayerNorm, "out")}))
        elif hasattr(mod, "mlp") and hasattr(getattr(mod, "mlp"), "fc2") and hasattr(mod, "norm1"):  # timm, pre-LN
            layers.append(_Layer(index, {"ffn_out": (mod.mlp.fc2, "out"), "ln_in": (mod.norm1, "in"),
                                         "ln_in2": (mod.norm2, "in"), "ln_out": (mod.norm1, "out"),
                                         "ln_out2": (mod.norm2, "out"), "block_out": (mod, "out")}))
    if not layers:
        raise UserError("no transformer layers found to measure",
                        fix="outlier metrics support Hugging Face BERT-family encoders and timm ViTs")
    return sorted(layers, key=lambda layer: layer.index)


def sequence_stats(x: torch.Tensor, valid: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    """Per sequence of ``x`` (B, T, D): infinity norm and kurtosis over its valid tokens."""
    x = x.detach().to(torch.float64)
    b, t, d = x.shape
    w = torch.ones(b, t, 1, dtype=torch.float64) if valid is None else valid[:, :t, None].to(torch.float64)
    n = (w.sum(dim=(1, 2)) * d).clamp(min=2.0)
    inf = (x.abs() * w).amax(dim=(1, 2))
    mu = (x * w).sum(dim=(1, 2)) / n
    centred = (x - mu[:, None, None]) * w
    var = (centred ** 2).sum(dim=(1, 2)) / (n - 1.0)             # Bessel-corrected, as torch.std
    mu4 = (centred ** 4).sum(dim=(1, 2)) / n
    kurt = mu4 / (var ** 2 + 1e-6)
    return inf.numpy(), kurt.numpy()


@dataclass
class OutlierStats:
    layers: list[dict[str, Any]] = field(default_factory=list)    # one row per layer
    summary: dict[str, float] = field(default_factory=dict)
    samples: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "summary": self.summary, "layers": self.layers}


def _merge_pre_ln(values: dict[str, float]) -> dict[str, float]:
    """timm blocks have two LayerNorms: report the larger of each pair under one name."""
    out = dict(values)
    for site in ("ln_in", "ln_out"):
        if f"{site}2" in out:
            out[site] = max(out[site], out.pop(f"{site}2"))
    return out


@torch.inference_mode()
def measure_outliers(bundle: ModelBundle, split: Split, *, batch_size: int = 32,
                     samples: int | None = None, description: str = "outlier metrics") -> OutlierStats:
    module = bundle.module
    layers = find_layers(module)
    current: dict[str, Any] = {}
    sums: dict[tuple[int, str], list[float]] = {}      # (layer, site) -> [sum inf, sum kurt]
    handles = []

    def hook_for(layer: int, site: str, where: str):
        def hook(_mod, inputs, output):
            x = inputs[0] if where == "in" else (output[0] if isinstance(output, tuple) else output)
            if not isinstance(x, torch.Tensor) or x.dim() != 3:
                return
            inf, kurt = sequence_stats(x, current.get("valid"))
            acc = sums.setdefault((layer, site), [0.0, 0.0])
            acc[0] += float(inf.sum())
            acc[1] += float(kurt.sum())
        return hook

    for layer in layers:
        for site, (mod, where) in layer.hooks.items():
            handles.append(mod.register_forward_hook(hook_for(layer.index, site, where)))
    was_training = module.training
    module.eval()
    count = split.count if samples is None else min(samples, split.count)
    feeds_all = {k: v[:count] for k, v in split.feeds.items()}
    try:
        for feeds in track(iterate_batches(feeds_all, batch_size), total=-(-count // batch_size),
                           description=description):
            mask = feeds.get("attention_mask")
            current["valid"] = None if mask is None else torch.from_numpy(mask).bool()
            module(*[torch.from_numpy(feeds[n]) for n in bundle.input_names])
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    rows = []
    for layer in layers:
        inf = _merge_pre_ln({site: sums[(layer.index, site)][0] / count for site in layer.hooks
                             if (layer.index, site) in sums})
        kurt = _merge_pre_ln({site: sums[(layer.index, site)][1] / count for site in layer.hooks
                              if (layer.index, site) in sums})
        rows.append({"layer": layer.index, **{f"inf_{s}": inf.get(s) for s in SITES},
                     **{f"kurtosis_{s}": kurt.get(s) for s in SITES}})
    summary = {f"max_inf_{s}": max(r[f"inf_{s}"] for r in rows) for s in SITES}
    summary["max_inf_norm"] = max(summary.values())
    kurts = [r[f"kurtosis_{s}"] for r in rows for s in KURTOSIS_SITES]
    summary["avg_kurtosis"] = float(np.mean(kurts))
    summary["max_kurtosis"] = float(np.max(kurts))
    return OutlierStats(rows, {k: float(v) for k, v in summary.items()}, count)


# ----------------------------------------------------------------------------- output
def print_outliers(stats: OutlierStats, title: str = "activation outliers per layer") -> None:
    from deploykit.progress import console, is_quiet

    if is_quiet():
        return
    from rich.table import Table

    table = Table(title=title)
    table.add_column("layer", justify="right")
    for s in SITES:
        table.add_column(f"max|x| {s}", justify="right")
    for s in KURTOSIS_SITES:
        table.add_column(f"kurtosis {s}", justify="right")
    for r in stats.layers:
        table.add_row(str(r["layer"]), *[f"{r[f'inf_{s}']:.1f}" for s in SITES],
                      *[f"{r[f'kurtosis_{s}']:.1f}" for s in KURTOSIS_SITES])
    console.print(table)
    s = stats.summary
    console.print(f"max inf-norm {s['max_inf_norm']:.1f} · avg kurtosis {s['avg_kurtosis']:.1f} · "
                  f"max kurtosis {s['max_kurtosis']:.1f} ({stats.samples} sequences)")


def plot_outliers(per_variant: dict[str, dict[str, Any]], dest: Path, inputs: tuple[Path, ...] = ()) -> Path:
    """Per-layer max |x| of the FFN output and LayerNorm input, and kurtosis, one line per variant."""
    from deploykit.report.plots import figure, save

    fig, axes = figure(11.0, 3.8, ncols=3)
    panels = (("inf_ffn_out", "FFN output: mean over sequences of max |x|"),
              ("inf_ln_in", "LayerNorm input (residual sum): max |x|"),
              ("kurtosis_block_out", "block output: kurtosis"))
    for ax, (key, title) in zip(axes, panels):
        for name, stats in per_variant.items():
            rows = stats["layers"]
            ax.plot([r["layer"] for r in rows], [r[key] for r in rows], marker="o", label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("layer")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    return save(fig, dest, inputs)
