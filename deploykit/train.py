"""Small, honest CPU training: from scratch on labels, or distillation from a teacher.

``scratch``  cross-entropy on the split's labels (image classification, e.g. a ViT on digits).
``distill``  ``1 - cosine`` between the student's and the teacher's outputs (sentence
             embeddings), the teacher being the model before any transform: fine-tunes a
             pretrained encoder into its clipped-softmax / gated form without labels.

AdamW with decoupled weight decay on matrices only, linear warm-up then cosine decay,
gradient clipping; seeded shuffling and dropout so a run repeats exactly on one machine.
Dropout is on when training from scratch and off when distilling: a student that starts
equal to its teacher (fine-tuning gates) would otherwise be pushed away from it by noise.
The checkpoint is a safetensors file of the same module ``model.options.checkpoint`` loads.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deploykit.data import DataSplits, Split, iterate_batches
from deploykit.errors import UserError
from deploykit.io import atomic_path
from deploykit.models.base import ModelBundle
from deploykit.progress import console, is_quiet

MODES = ("scratch", "distill")


@dataclass
class TrainSpec:
    enabled: bool = False
    mode: str = "scratch"            # scratch | distill
    epochs: float = 10.0
    max_steps: int | None = None     # caps the steps the epochs give
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: float = 0.05             # share of the steps
    grad_clip: float = 1.0
    label_smoothing: float = 0.0
    dropout: bool | None = None      # None: on from scratch, off when distilling (the target is exact)
    seed: int = 0
    threads: int | None = None

    def validate(self, where: str | None = None) -> None:
        if self.mode not in MODES:
            raise UserError(f"unknown train.mode '{self.mode}'", path=where, fix=f"use {' or '.join(MODES)}")
        if self.epochs <= 0 or self.batch_size < 1 or self.lr <= 0:
            raise UserError("train needs epochs > 0, batch_size >= 1 and lr > 0", path=where,
                            fix="check the train section")
        if not 0.0 <= self.warmup < 1.0:
            raise UserError(f"train.warmup {self.warmup} is outside [0, 1)", path=where, fix="use e.g. 0.05")


@dataclass
class TrainResult:
    steps: int
    seconds: float
    losses: list[float]              # mean loss per logging window
    log_every: int
    final_loss: float
    checkpoint: str | None

    def summary(self) -> dict[str, Any]:
        return {"steps": self.steps, "seconds": round(self.seconds, 1), "final_loss": self.final_loss,
                "log_every": self.log_every, "losses": self.losses, "checkpoint": self.checkpoint}


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "gate" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(bundle: ModelBundle, split: Split, spec: TrainSpec, *, teacher: torch.nn.Module | None = None,
          checkpoint: str | Path | None = None, description: str = "train") -> TrainResult:
    """Train ``bundle.module`` in place on ``split``; write ``checkpoint`` (safetensors) if given."""
    spec.validate()
    if spec.mode == "scratch" and split.labels is None:
        raise UserError("train.mode scratch needs labelled data (e.g. data.source: digits)",
                        fix="use train.mode: distill for unlabelled text")
    if spec.mode == "distill" and teacher is None:
        raise ValueError("distillation needs a teacher module")
    module = bundle.module
    previous_threads = torch.get_num_threads()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    rng = np.random.default_rng(spec.seed)
    n = split.count
    steps_per_epoch = -(-n // spec.batch_size)
    total = max(1, int(round(spec.epochs * steps_per_epoch)))
    if spec.max_steps:
        total = min(total, spec.max_steps)
    warmup = int(spec.warmup * total)
    optimizer = torch.optim.AdamW(_param_groups(module, spec.weight_decay), lr=spec.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, total, warmup))
    labels = None if split.labels is None else torch.from_numpy(np.asarray(split.labels, dtype=np.int64))
    log_every = max(1, total // 50)
    losses: list[float] = []
    start = time.perf_counter()
    _enter_training(module, spec, teacher)
    # Modules that follow the optimisation (``on_train_step(step, total)``), called after
    # every optimizer step.
    step_hooks = [m.on_train_step for m in module.modules() if callable(getattr(m, "on_train_step", None))]
    try:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        with Progress(TextColumn("  {task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                      console=console, disable=is_quiet() or not console.is_terminal, transient=True) as progress:
            task = progress.add_task(description, total=total, loss="-")
            loop = _Loop(bundle, split, spec, teacher, labels, optimizer, scheduler, step_hooks, total, log_every)
            while loop.step < total:
                loop.epoch(rng, losses, lambda: progress.update(
                    task, advance=1, loss=f"{losses[-1]:.4f}" if losses else "-"))
    finally:
        module.eval()
        torch.set_num_threads(previous_threads)
    seconds = time.perf_counter() - start
    if not is_quiet():
        console.print(f"  {description}: {total} steps in {seconds:.0f} s, final loss {losses[-1]:.4f}")
    saved = None
    if checkpoint is not None:
        saved = str(save_checkpoint(bundle, checkpoint))
    return TrainResult(total, seconds, [round(v, 6) for v in losses], log_every, round(losses[-1], 6), saved)


def _enter_training(module: torch.nn.Module, spec: TrainSpec, teacher: torch.nn.Module | None) -> None:
    """Training mode, with dropout off where the spec (or distillation) wants it; the teacher in eval."""
    module.train()
    dropout = spec.dropout if spec.dropout is not None else spec.mode == "scratch"
    if not dropout:
        for m in module.modules():
            if isinstance(m, torch.nn.Dropout):
                m.eval()
    if teacher is not None:
        teacher.eval()


@dataclass
class _Loop:
    """The optimisation loop's state: one :meth:`epoch` is one seeded shuffle of the split."""
    bundle: ModelBundle
    split: Split
    spec: TrainSpec
    teacher: torch.nn.Module | None
    labels: torch.Tensor | None
    optimizer: Any
    scheduler: Any
    step_hooks: list[Any]
    total: int
    log_every: int
    step: int = 0
    window: list[float] = field(default_factory=list)

    def epoch(self, rng: np.random.Generator, losses: list[float], advance) -> None:
        spec, n = self.spec, self.split.count
        order = rng.permutation(n)
        shuffled = {k: v[order] for k, v in self.split.feeds.items()}
        for offset, feeds in zip(range(0, n, spec.batch_size), iterate_batches(shuffled, spec.batch_size)):
            if self.step >= self.total:
                break
            loss = self._loss(feeds, order[offset: offset + spec.batch_size])
            if not torch.isfinite(loss):
                raise UserError(f"training diverged at step {self.step} (loss {loss.item()})",
                                fix="lower train.lr or raise train.warmup")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if spec.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.bundle.module.parameters(), spec.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            for hook in self.step_hooks:         # e.g. a gradual sparsity schedule, masks re-applied
                hook(self.step + 1, self.total)
            self.window.append(float(loss.detach()))
            self.step += 1
            if len(self.window) == self.log_every or self.step == self.total:
                losses.append(float(np.mean(self.window)))
                self.window = []
            advance()

    def _loss(self, feeds: dict[str, np.ndarray], rows: np.ndarray) -> torch.Tensor:
        args = [torch.from_numpy(feeds[k]) for k in self.bundle.input_names]
        out = self.bundle.module(*args)
        if self.spec.mode == "scratch":
            target = self.labels[rows]
            return torch.nn.functional.cross_entropy(out, target, label_smoothing=self.spec.label_smoothing)
        with torch.no_grad():
            ref = self.teacher(*args)
        return (1.0 - torch.nn.functional.cosine_similarity(out, ref, dim=-1)).mean()


def save_checkpoint(bundle: ModelBundle, path: str | Path) -> Path:
    from safetensors.torch import save_file

    from deploykit.models import checkpoint_target

    path = Path(path)
    state = {k: v.detach().contiguous().clone() for k, v in checkpoint_target(bundle).state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
    return path


def distillation_teacher(source: str, options: dict[str, Any]):
    """The model of ``source`` *without* its transforms or checkpoint, frozen: the bundle
    distillation matches (and whose outputs a distilled model is scored against)."""
    from deploykit.models import load_model

    bundle = load_model(source, {k: v for k, v in options.items() if k not in ("transforms", "checkpoint")})
    bundle.module.eval()
    for p in bundle.module.parameters():
        p.requires_grad_(False)
    return bundle


def train_variant(bundle: ModelBundle, rec, splits: DataSplits, out_dir: Path, *,
                  teacher=None) -> dict[str, Any] | None:
    """Train ``bundle`` per ``rec.train`` (``rec`` a :class:`deploykit.recipe.Recipe`) on the training
    split; None when there is nothing to do. Distillation uses ``teacher`` (a module), or builds
    :func:`distillation_teacher`."""
    spec = rec.train
    if not spec.enabled:
        return None
    if splits.training is None:
        raise UserError("train.enabled needs a training split", path=rec.path,
                        fix="set data.training (a count, or -1 for every sample the other splits leave)")
    if spec.mode == "distill" and not bundle.info.get("transforms"):
        # The student would start equal to its teacher: zero loss, zero gradient, nothing to learn.
        return {"skipped": "distillation of an untransformed model from itself is the identity"}
    if spec.mode == "distill" and teacher is None:
        teacher = distillation_teacher(rec.model.source, rec.model.options).module
    result = train(bundle, splits.training, spec, teacher=teacher, checkpoint=out_dir / "model.safetensors",
                   description=f"train {out_dir.name}")
    return result.summary()
