"""Training loops of the zoo: from-scratch pre-training, full fine-tuning and LoRA fine-tuning of a small ViT.

The model is a real `transformers.ViTForImageClassification` (8x8 grey images, patch 2 -> 16 patches +
CLS, hidden 128, 4 layers, 4 heads, MLP 256: 0.53 M parameters, about 45 ms per batch of 64 on one CPU
core), so its tensor names are those of every ViT on the Hub.

Optimisers (the paper's learning rates {6e-3, 9e-3, 2e-4, 5e-4} are used as given):
- scratch: AdamW, lr 2e-3, weight decay 0.05, 5 % linear warm-up then cosine decay: a "pre-training".
- full: SGD with momentum 0.9 (the ViT paper's fine-tuning recipe, where such lrs are at home; AdamW at
  9e-3 wrecks the pre-trained features: parity fell to 0.53 held-out), cosine decay, gradient norm
  clipped at 1.0. The new classifier head learns at 10x the lr (capped at 0.05), as is usual in
  transfer learning; otherwise the 2e-4 runs leave a fresh head near chance after 2 epochs.
- lora: AdamW without weight decay (the usual peft recipe), cosine decay, clipping 1.0. With SGD the
  low-rank updates stay so small that numpy's rank tolerance saw rank 22 in a rank-64 update; with
  AdamW it sees the full 64, which is what the LoRA rank distance relies on.

Determinism: every model runs on one thread (a fixed reduction order), with its own torch seed for the
initialisation and a seeded DataLoader generator for the order of the batches.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import ViTConfig, ViTForImageClassification

from indexer.zoo.data import IMAGE_SIZE, Task, TaskData

logger = logging.getLogger(__name__)

Method = Literal["scratch", "full", "lora"]

HIDDEN = 128  # LoRA ranks up to 64 stay below full rank (128)
LAYERS = 4
HEADS = 4
MLP = 256
PATCH = 2
HEAD_LR_FACTOR = 10.0
MAX_HEAD_LR = 0.05  # a cap, not tuned: 10 x 9e-3 = 0.09 under momentum 0.9 is a step of ~0.9 per unit grad
# transformers 5 names the attention projections q_proj/k_proj/v_proj/o_proj in memory and writes the
# Hub names (attention.attention.query/key/value, attention.output.dense) in save_pretrained.
LORA_TARGETS = ("q_proj", "v_proj")


@dataclass(frozen=True)
class Recipe:
    """How one model is trained."""

    method: Method
    lr: float
    epochs: int
    batch_size: int = 64
    rank: int | None = None  # LoRA rank (alpha = rank), None unless method == "lora"


@dataclass(frozen=True)
class TrainResult:
    """What a training run measured: mean train loss per epoch, accuracies after the last epoch."""

    epoch_losses: tuple[float, ...]
    train_accuracy: float
    test_accuracy: float


def vit_config(task: Task) -> ViTConfig:
    """The transformers config of every zoo model; only the label set differs between tasks."""
    return ViTConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        num_channels=1,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=MLP,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        id2label={i: label for i, label in enumerate(task.labels)},
        label2id={label: i for i, label in enumerate(task.labels)},
    )


@contextmanager
def deterministic_torch(threads: int = 1) -> Iterator[None]:
    """One thread and deterministic kernels inside, the caller's settings restored after."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det)
        torch.set_num_threads(old_threads)


def new_model(task: Task, *, seed: int) -> ViTForImageClassification:
    """A ViT initialised from scratch with its own seed (the zoo's unrelated roots)."""
    torch.manual_seed(seed)
    return ViTForImageClassification(vit_config(task)).eval()


def from_parent(parent_dir: Path, task: Task, *, seed: int) -> tuple[ViTForImageClassification, bool]:
    """A ViT loaded from the parent's published folder with a fresh classifier head for `task`.

    Returns (model, head_is_new); the head is always new because every child's task differs from its
    parent's, even when the class count matches: a kept 10-way digits head on rot90 digits scored
    0.10 held-out after 4 epochs at lr 5e-4, a fresh one learns. It is drawn, seeded, with ViT's own
    init (truncated normal, std 0.02; zero bias), as `from_pretrained(..., ignore_mismatched_sizes=True)`.
    """
    model = ViTForImageClassification.from_pretrained(parent_dir)
    torch.manual_seed(seed)
    head = torch.nn.Linear(HIDDEN, task.n_classes)
    torch.nn.init.trunc_normal_(head.weight, std=model.config.initializer_range)
    torch.nn.init.zeros_(head.bias)
    model.classifier = head
    fresh = vit_config(task)
    model.config.id2label, model.config.label2id = fresh.id2label, fresh.label2id
    return model.eval(), True


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _optimizer(model: torch.nn.Module, recipe: Recipe, *, head_is_new: bool) -> torch.optim.Optimizer:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if recipe.method == "scratch":
        return torch.optim.AdamW([p for _, p in params], lr=recipe.lr, weight_decay=0.05)
    if recipe.method == "lora":
        return torch.optim.AdamW([p for _, p in params], lr=recipe.lr, weight_decay=0.0)
    head_lr = min(recipe.lr * HEAD_LR_FACTOR, MAX_HEAD_LR) if head_is_new else recipe.lr
    head = [p for n, p in params if "classifier" in n]
    body = [p for n, p in params if "classifier" not in n]
    groups = [{"params": body, "lr": recipe.lr}, {"params": head, "lr": max(head_lr, recipe.lr)}]
    return torch.optim.SGD(groups, lr=recipe.lr, momentum=0.9)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, *, batch_size: int = 512) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(x), batch_size):
        logits = model(pixel_values=torch.from_numpy(x[start : start + batch_size])).logits
        correct += int((logits.argmax(-1).numpy() == y[start : start + batch_size]).sum())
    return correct / max(1, len(x))


def fit(model: torch.nn.Module, data: TaskData, recipe: Recipe, *, seed: int, head_is_new: bool) -> TrainResult:
    """Train `model` in place on `data.x_train`; the batch order is drawn from `seed`."""
    loader = DataLoader(
        TensorDataset(torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)),
        batch_size=recipe.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    opt = _optimizer(model, recipe, head_is_new=head_is_new)
    base_lrs = [g["lr"] for g in opt.param_groups]
    total = recipe.epochs * len(loader)
    warmup = max(1, total // 20) if recipe.method == "scratch" else 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    step, losses = 0, []
    model.train()
    for _ in range(recipe.epochs):
        epoch_loss = 0.0
        for xb, yb in loader:
            for group, base in zip(opt.param_groups, base_lrs, strict=True):
                group["lr"] = base * _cosine(step, total, warmup)
            loss = model(pixel_values=xb, labels=yb).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            epoch_loss += float(loss.detach()) * len(yb)
            step += 1
        losses.append(epoch_loss / len(data.y_train))
    return TrainResult(
        tuple(losses),
        accuracy(model, data.x_train, data.y_train),
        accuracy(model, data.x_test, data.y_test),
    )


def fit_lora(
    model: ViTForImageClassification, data: TaskData, recipe: Recipe, *, seed: int, head_is_new: bool
) -> tuple[ViTForImageClassification, TrainResult]:
    """LoRA on the attention query/value layers (alpha = rank), head trained in full; returns merged."""
    from peft import LoraConfig, get_peft_model  # imported late: only the LoRA splits need peft

    if recipe.rank is None:
        raise ValueError("a LoRA recipe needs a rank")
    config = LoraConfig(
        r=recipe.rank,
        lora_alpha=recipe.rank,
        lora_dropout=0.0,
        target_modules=list(LORA_TARGETS),
        modules_to_save=["classifier"],
    )
    torch.manual_seed(seed + 1)  # the LoRA A matrices are drawn here, apart from the head's draw
    with warnings.catch_warnings():
        # peft 0.21 asks transformers 5 `is_gradient_checkpointing`, deprecated there: noise, per model
        warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
        peft_model = get_peft_model(model, config)
        result = fit(peft_model, data, recipe, seed=seed, head_is_new=head_is_new)
    merged = peft_model.merge_and_unload()
    if not isinstance(merged, ViTForImageClassification):
        raise RuntimeError(f"merge_and_unload returned {type(merged).__name__}")
    return merged.eval(), result
