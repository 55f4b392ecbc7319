"""Synthetic model families whose lineage is known by construction (for tests and quick checks).

Not trained models (the zoo in `indexer.zoo` trains real ones): a root is heavy-tailed (Student-t,
3 degrees of freedom, so its kurtosis is high) and each child is its parent plus Gaussian noise, which
lowers the kurtosis at every generation, as MoTHer's specialisation prior expects. With `lora_rank`,
children differ from their parent only by a rank-r product B @ A on the value matrices (merged LoRA).

Layout written: `OUT/<org>/<name>/model.safetensors` (ViT tensor names), `OUT/hub.json` with createdAt
in creation order (a parent always before its children), and `OUT/truth.csv` (`parent,child`).
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

logger = logging.getLogger(__name__)

_KINDS = ("attention.attention.query", "attention.attention.key", "attention.attention.value", "attention.output.dense")


@dataclass(frozen=True)
class SyntheticSpec:
    trees: int = 2
    children: int = 3
    grandchildren: int = 2
    hidden: int = 32
    blocks: int = 2
    noise: float = 0.05  # child = parent + noise * N(0, 1): about 5% of the root's weight scale
    lora_rank: int | None = None
    classes: tuple[int, ...] = (10, 5, 3)  # classifier rows drawn per model: heads differ in shape
    seed: int = 0


def _root(spec: SyntheticSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    h = spec.hidden
    w: dict[str, np.ndarray] = {}
    for b in range(spec.blocks):
        for kind in _KINDS:
            w[f"vit.encoder.layer.{b}.{kind}.weight"] = (rng.standard_t(3, size=(h, h)) * 0.1).astype(np.float32)
        w[f"vit.encoder.layer.{b}.intermediate.dense.weight"] = (rng.standard_t(3, size=(2 * h, h)) * 0.1).astype(np.float32)
        w[f"vit.encoder.layer.{b}.layernorm_before.weight"] = np.ones(h, dtype=np.float32)
    w["vit.embeddings.patch_embeddings.projection.weight"] = (rng.standard_t(3, size=(h, 1, 2, 2)) * 0.1).astype(np.float32)
    return w


def _child(parent: dict[str, np.ndarray], spec: SyntheticSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for name in sorted(parent):
        w = parent[name]
        if name.startswith("classifier."):
            continue
        if spec.lora_rank is None:
            out[name] = (w + spec.noise * rng.standard_normal(w.shape)).astype(np.float32) if w.ndim > 1 else w
        elif name.endswith("attention.attention.value.weight"):
            r, h = spec.lora_rank, w.shape[0]
            delta = rng.standard_normal((h, r)) @ rng.standard_normal((r, h)) * (spec.noise / np.sqrt(r))
            out[name] = (w + delta).astype(np.float32)
        else:
            out[name] = w
    return out


def _with_head(w: dict[str, np.ndarray], classes: int, hidden: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    head = (rng.standard_normal((classes, hidden)) * 0.02).astype(np.float32)
    return {**{k: v for k, v in w.items() if not k.startswith("classifier.")}, "classifier.weight": head}


def write_synthetic_zoo(out: Path, spec: SyntheticSpec = SyntheticSpec()) -> dict[str, str]:
    """Write the family; return the truth (child -> parent, "" for roots)."""
    rng = np.random.default_rng(spec.seed)
    truth: dict[str, str] = {}
    created: dict[str, str] = {}
    clock = datetime(2024, 1, 1, tzinfo=timezone.utc)

    def emit(repo: str, weights: dict[str, np.ndarray], parent: str) -> dict[str, np.ndarray]:
        nonlocal clock
        w = _with_head(weights, spec.classes[len(truth) % len(spec.classes)], spec.hidden, rng)
        folder = out / repo
        folder.mkdir(parents=True, exist_ok=True)
        save_file(w, str(folder / "model.safetensors"))
        truth[repo] = parent
        clock += timedelta(hours=1)
        created[repo] = clock.strftime("%Y-%m-%dT%H:%M:%S.000Z")
        return w

    for t in range(spec.trees):
        root_id = f"org{t}/root"
        root = emit(root_id, _root(spec, rng), "")
        for c in range(spec.children):
            child_id = f"org{t}/c{c}"
            child = emit(child_id, _child(root, spec, rng), root_id)
            for g in range(spec.grandchildren):
                emit(f"org{t}/c{c}-g{g}", _child(child, spec, rng), child_id)
    _write_meta(out, truth, created)
    return truth


def _write_meta(out: Path, truth: dict[str, str], created: dict[str, str]) -> None:
    repos = {rid: {"createdAt": created[rid], "gated": False, "private": False} for rid in sorted(truth)}
    (out / "hub.json").write_text(json.dumps({"version": 1, "repos": repos}, indent=1, sort_keys=True))
    with open(out / "truth.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["parent", "child"])
        for child in sorted(truth):
            writer.writerow([truth[child], child])
