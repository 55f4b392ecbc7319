"""One training loop for the three architectures and their objectives (classify, MLM + NSP, LM).

Optimisers, as the families are trained in the wild:
- adamw (BERT, GPT-2, and the conv net's pre-training): AdamW, decoupled weight decay.
- sgd (the conv net's fine-tunes): SGD, momentum 0.9, weight decay 5e-4 (torchvision's recipe). A new
  head learns at HEAD_LR_FACTOR x the body's lr (capped at MAX_HEAD_LR), the usual transfer recipe.
Every run: optional 5 % linear warm-up (from-scratch and pre-training runs only), cosine decay to 0,
gradient norm clipped at 1.0. A frozen body gets no gradient and stays in eval mode (BatchNorm running
statistics unchanged), so its tensors are bit-identical to the parent's.
A run may be cut into `checkpoints` equal parts, each written as its own model (the "snake").

Determinism: the caller runs this on one thread; the batch order comes from a torch Generator seeded
with the model's seed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from indexer.zoo.wild.archs import Arch, Head
from indexer.zoo.wild.data import Arrays, Objective

logger = logging.getLogger(__name__)

HEAD_LR_FACTOR = 10.0
MAX_HEAD_LR = 0.05
SGD_WEIGHT_DECAY = 5e-4
WARMUP_FRACTION = 0.05
EVAL_BATCH = 256


@dataclass(frozen=True)
class Recipe:
    """How one model (or one snake run) is trained."""

    head: Head
    task: str
    objective: Objective
    n_train: int
    epochs: int
    lr: float
    optimizer: Literal["adamw", "sgd"]
    weight_decay: float = 0.0
    batch_size: int = 64
    frozen_body: bool = False
    keep_head: bool = False  # the parent's head fits this task and is kept (else a fresh one is drawn)
    warmup: bool = False
    checkpoints: int = 1


@dataclass(frozen=True)
class TrainResult:
    """Mean train loss of the last epoch (or part), accuracies on the train subset and held-out data."""

    steps: int
    train_loss: float
    train_accuracy: float
    test_loss: float
    test_accuracy: float


Batch = dict[str, torch.Tensor]


def _forward(model: torch.nn.Module, batch: Batch, objective: Objective) -> tuple[torch.Tensor, int, int]:
    """(loss, correct predictions, predictions) of one batch; the accuracy is the objective's own
    (classes, masked tokens, next tokens)."""
    if "x" in batch:
        logits = model(batch["x"])
        labels = batch["labels"]
        loss = F.cross_entropy(logits, labels)
    elif objective == "lm":
        out = model(input_ids=batch["input_ids"], labels=batch["input_ids"])
        loss, logits, labels = out.loss, out.logits[:, :-1], batch["input_ids"][:, 1:]
    else:
        out = model(**batch)
        loss = out.loss
        logits = out.prediction_logits if objective == "mlm-nsp" else out.logits
        labels = batch["labels"]
    scored = labels != -100
    correct = int(((logits.argmax(-1) == labels) & scored).sum())
    return loss, correct, int(scored.sum())


def _tensors(arrays: Arrays) -> Batch:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sorted(arrays.items())}


def _slice(data: Batch, idx: torch.Tensor) -> Batch:
    return {k: v[idx] for k, v in data.items()}


@torch.no_grad()
def evaluate(model: torch.nn.Module, arrays: Arrays, objective: Objective, *, limit: int = 1024) -> tuple[float, float]:
    """(mean loss, accuracy) on the first `limit` examples, in eval mode."""
    model.eval()
    data = _tensors(arrays)
    n = min(limit, len(next(iter(data.values()))))
    losses, correct, count = [], 0, 0
    for start in range(0, n, EVAL_BATCH):
        batch = _slice(data, torch.arange(start, min(n, start + EVAL_BATCH)))
        loss, c, k = _forward(model, batch, objective)
        losses.append(float(loss) * k)
        correct, count = correct + c, count + k
    return sum(losses) / max(1, count), correct / max(1, count)


def _optimizer(arch: Arch, model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW([p for _, p in params], lr=recipe.lr, weight_decay=recipe.weight_decay)
    head_lr = recipe.lr if recipe.keep_head else max(recipe.lr, min(recipe.lr * HEAD_LR_FACTOR, MAX_HEAD_LR))
    groups = [{"params": [p for n, p in params if not arch.is_head(n)], "lr": recipe.lr},
              {"params": [p for n, p in params if arch.is_head(n)], "lr": head_lr}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.SGD(groups, lr=recipe.lr, momentum=0.9, weight_decay=recipe.weight_decay or SGD_WEIGHT_DECAY)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


Checkpoint = Callable[[int, TrainResult], None]


def fit(arch: Arch, model: torch.nn.Module, train: Arrays, test: Arrays, recipe: Recipe, *, seed: int,
        on_checkpoint: Checkpoint) -> None:
    """Train `model` in place; call `on_checkpoint(k, result)` after each of the recipe's checkpoints."""
    if recipe.frozen_body:
        arch.freeze_body(model)
    data = _tensors(train)
    n = len(next(iter(data.values())))  # every array has one row per example
    per_epoch = -(-n // recipe.batch_size)
    total = recipe.epochs * per_epoch
    stops = {total * (k + 1) // recipe.checkpoints: k for k in range(recipe.checkpoints)}
    opt = _optimizer(arch, model, recipe)
    base_lrs = [g["lr"] for g in opt.param_groups]
    warmup = max(1, int(total * WARMUP_FRACTION)) if recipe.warmup else 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    step, window = 0, []
    for _ in range(recipe.epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, recipe.batch_size):
            arch.body_train_mode(model, frozen=recipe.frozen_body)
            for group, base in zip(opt.param_groups, base_lrs, strict=True):
                group["lr"] = base * _lr_factor(step, total, warmup)
            loss, _, _ = _forward(model, _slice(data, order[start : start + recipe.batch_size]), recipe.objective)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            window.append(float(loss.detach()))
            step += 1
            if step in stops:
                on_checkpoint(stops[step], _measure(model, train, test, recipe, step, window[-per_epoch:]))
    for p in model.parameters():
        p.requires_grad_(True)


def _measure(model: torch.nn.Module, train: Arrays, test: Arrays, recipe: Recipe, step: int,
             losses: list[float]) -> TrainResult:
    _, train_acc = evaluate(model, train, recipe.objective, limit=512)
    test_loss, test_acc = evaluate(model, test, recipe.objective)
    return TrainResult(step, sum(losses) / max(1, len(losses)), train_acc, test_loss, test_acc)
