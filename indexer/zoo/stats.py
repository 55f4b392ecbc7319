"""Figures of a built zoo, read back from its zoo.json: accuracy and training time per tree level."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from errors import BadInputError, FormatVersionError
from indexer.zoo.build import ZOO_VERSION

logger = logging.getLogger(__name__)

LEVEL_NAMES = ("root", "child", "grandchild")


@dataclass(frozen=True)
class LevelStats:
    """Means over the models of one level of a zoo."""

    level: str
    n_models: int
    train_accuracy: float
    test_accuracy: float
    seconds: float


@dataclass(frozen=True)
class ZooStats:
    """A zoo's build time and per-level figures."""

    preset: str
    split: str
    seed: int
    total_seconds: float
    levels: tuple[LevelStats, ...]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def zoo_stats(out: Path) -> ZooStats:
    """Read OUT/zoo.json of a finished zoo and average its models per level."""
    path = Path(out) / "zoo.json"
    if not path.is_file():
        raise BadInputError(str(path), "missing; is this a zoo built by `index zoo make`?")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("version", 0) > ZOO_VERSION:
        raise FormatVersionError(f"{path}: zoo format {meta['version']} is newer than {ZOO_VERSION}; upgrade")
    if meta.get("status") != "done":
        raise BadInputError(str(path), "the zoo's build did not finish; rebuild it with --force")
    levels = []
    for level, name in enumerate(LEVEL_NAMES):
        rows = [m for _, m in sorted(meta["models"].items()) if m["level"] == level]
        if rows:
            levels.append(LevelStats(name, len(rows), _mean([m["train_accuracy"] for m in rows]),
                                     _mean([m["test_accuracy"] for m in rows]), _mean([m["seconds"] for m in rows])))
    return ZooStats(meta["preset"], meta["split"], meta["seed"], meta["total_seconds"], tuple(levels))
