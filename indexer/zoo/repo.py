"""Writing one zoo model as a Hugging Face-style repo folder: config.json, model.safetensors, README.md.

The model card's YAML front matter carries the ground truth the way the Hub does: `base_model` and
`base_model_relation: finetune` on every fine-tuned model, neither on a root. The body records how the
model was trained and what it reached, so a person can audit the zoo by reading the cards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import yaml
from transformers import ViTForImageClassification

from indexer.zoo.data import TASKS
from indexer.zoo.train import HEADS, HIDDEN, LAYERS, MLP, PATCH, Recipe, TrainResult

logger = logging.getLogger(__name__)

_METHOD_TEXT = {
    "scratch": "pre-trained from scratch (random init), AdamW, weight decay 0.05, warm-up + cosine",
    "full": "full fine-tuning, SGD momentum 0.9, cosine decay, gradient clipping 1.0",
    "lora": "LoRA fine-tuning, AdamW, cosine decay, gradient clipping 1.0; adapters merged into the weights",
}


@dataclass(frozen=True)
class CardFacts:
    """Everything a model card states about one model."""

    repo_id: str
    base_model: str | None
    task: str
    recipe: Recipe
    n_train: int
    n_test: int
    result: TrainResult


def _front_matter(facts: CardFacts) -> str:
    meta: dict[str, object] = {"library_name": "transformers", "pipeline_tag": "image-classification"}
    if facts.base_model is not None:
        meta["base_model"] = facts.base_model
        meta["base_model_relation"] = "finetune"
    tags = ["vit", "image-classification", "model-graph-index-zoo", facts.task]
    if facts.recipe.method == "lora":
        tags.append("lora")
    meta["tags"] = tags
    meta["license"] = "apache-2.0"
    return yaml.safe_dump(meta, sort_keys=False, default_flow_style=False)


def model_card(facts: CardFacts) -> str:
    """The README.md text of one zoo model."""
    task = TASKS[facts.task]
    recipe, result = facts.recipe, facts.result
    lines = [
        "---",
        _front_matter(facts).rstrip("\n"),
        "---",
        "",
        f"# {facts.repo_id}",
        "",
        f"A small ViT image classifier (8x8 grey images, patch {PATCH}, hidden {HIDDEN}, {LAYERS} layers, "
        f"{HEADS} heads, MLP {MLP}).",
        "",
        "## Training",
        "",
        f"- task: {task.name} ({task.description}; {task.n_classes} classes: {', '.join(task.labels)})",
        f"- method: {_METHOD_TEXT[recipe.method]}",
        f"- learning rate: {recipe.lr:g}",
        f"- epochs: {recipe.epochs}",
        f"- batch size: {recipe.batch_size}",
        f"- train examples: {facts.n_train}",
    ]
    if recipe.rank is not None:
        lines.append(f"- LoRA rank: {recipe.rank} (alpha {recipe.rank}, on attention query/value; head trained in full)")
    lines += [
        "",
        "## Results",
        "",
        f"- train loss per epoch: {', '.join(f'{x:.4f}' for x in result.epoch_losses)}",
        f"- train accuracy: {result.train_accuracy:.4f}",
        f"- held-out accuracy: {result.test_accuracy:.4f} ({facts.n_test} images)",
        "",
    ]
    return "\n".join(lines)


def write_repo(folder: Path, model: ViTForImageClassification, facts: CardFacts) -> None:
    """Write the repo folder: `save_pretrained` (config.json + F32 model.safetensors) and the card."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "README.md").write_text(model_card(facts), encoding="utf-8")
