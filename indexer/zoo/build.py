"""The zoo generator: lay out trees of models, train them, write Hub-style repos and the ground truth.

Output layout under OUT/:
    <org>/<name>/{config.json, model.safetensors, README.md}   one repo per model
    hub.json    {"version": 1, "repos": {repo_id: {"createdAt", "gated", "private"}}}: upload times,
                parents strictly before children, trees and siblings interleaved (a seeded random
                topological order), for a local Hub emulator
    truth.csv   parent,child  (empty parent for roots), sorted by child
    zoo.json    {"version": 1, preset, split, seed, total_seconds, models: {repo_id: {...}}}; written
                first with "status": "building", so that --force recognises an interrupted zoo

Steps of `make_zoo`:
    1. check OUT (empty, new, or an old zoo with --force)
    2. lay out the trees (tasks, lrs, epochs, ranks, names, upload times): all from one seeded Generator
    3. train, each model as soon as its parent is written, on `workers` processes of one thread each
    4. write hub.json, truth.csv, zoo.json
Every model's weights depend only on (seed, its index, its parent's weights), never on scheduling, so
the same seed gives byte-identical model.safetensors on the same machine whatever `workers` is.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from multiprocessing import get_context
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from errors import BadInputError
from indexer.zoo.data import CHILD_TASKS, ROOT_TASKS, TASKS

logger = logging.getLogger(__name__)

ZOO_VERSION = 1
PresetName = Literal["tiny", "small", "vthr"]
Split = Literal["ft", "lora-f", "lora-v"]
PRESETS_ORDER: tuple[str, ...] = ("tiny", "small", "vthr")
SPLITS: tuple[str, ...] = ("ft", "lora-f", "lora-v")

# The paper's VTHR hyper-parameters (its Tab. 2 and 3).
FT_LRS = (6e-3, 9e-3, 2e-4, 5e-4)
FT_EPOCHS = (2, 5)  # inclusive
LORA_EPOCHS = (10, 20)  # inclusive
LORA_V_RANKS = (8, 16, 32, 64)
LORA_F_RANK = 16
ROOT_LR = 2e-3  # AdamW from scratch; 1e-3 reached 0.47 held-out after 184 steps, 2e-3 0.77 after 540

# Neutral labs: a model's org is drawn independently of its tree, so names carry no lineage.
ORGS = ("aurora-lab", "bluefin-ai", "cedar-ml", "delta-vision", "ember-research", "fjord-ai",
        "granite-labs", "harbor-ml")
EPOCH0 = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
MEAN_UPLOAD_GAP_S = 6 * 3600.0  # one upload every six hours on average


Tree = tuple["Tree", ...]  # a node is the tuple of its children


@dataclass(frozen=True)
class Preset:
    """Size of a zoo: tree shape, and how much data and how many epochs its models get."""

    n_trees: int
    shape: Tree
    root_epochs: int
    root_train: int
    ft_train: int
    lora_train: int


_LEAF: Tree = ()
PRESETS: dict[str, Preset] = {
    # root, 2 children, 1 grandchild under the first: seconds
    "tiny": Preset(2, ((_LEAF,), ()), root_epochs=10, root_train=512, ft_train=256, lora_train=256),
    # root, 2 children, 2 grandchildren each
    "small": Preset(3, ((_LEAF, _LEAF), (_LEAF, _LEAF)), root_epochs=10, root_train=2048,
                    ft_train=1024, lora_train=512),
    # the paper's VTHR: root, 4 children, 4 grandchildren each; LoRA on 1,024 examples as VTAB-1k,
    # full FT on 3,072 (the paper's FT used larger sets "to prevent overfitting")
    "vthr": Preset(5, tuple((_LEAF,) * 4 for _ in range(4)), root_epochs=15, root_train=4096,
                   ft_train=3072, lora_train=1024),
}


@dataclass(frozen=True)
class ModelSpec:
    """One model of the zoo as laid out before training."""

    index: int
    repo_id: str
    parent: str | None
    tree: int
    level: int
    task: str
    method: Literal["scratch", "full", "lora"]
    lr: float
    epochs: int
    rank: int | None
    n_train: int
    seed: int  # torch seed of this model, from (zoo seed, index)
    created_at: str


@dataclass(frozen=True)
class ZooSummary:
    """What `make_zoo` built."""

    out: Path
    n_models: int
    n_trees: int
    seconds: float


def model_seed(zoo_seed: int, index: int) -> int:
    """The torch seed of model `index`: a SeedSequence hash, so neighbouring indices are unrelated."""
    return int(np.random.SeedSequence([zoo_seed, index]).generate_state(1)[0])


def _domain(task: str) -> str:
    """The word a model's name carries: the data domain, the same for roots and fine-tunes."""
    return "shapes" if task in ("shapes", "orientation", "count") else "digits"


def _names(tasks: list[str], rng: np.random.Generator) -> list[str]:
    """Unique `org/vit-<domain>-<4 hex>` ids; the org is drawn per model, not per tree."""
    taken: set[str] = set()
    out = []
    for task in tasks:
        while True:
            name = f"{ORGS[int(rng.integers(len(ORGS)))]}/vit-{_domain(task)}-{int(rng.integers(16**4)):04x}"
            if name not in taken:
                break
        taken.add(name)
        out.append(name)
    return out


def _upload_times(parents: list[int | None], rng: np.random.Generator) -> list[str]:
    """createdAt per model: a random topological order (trees and siblings interleaved), random gaps."""
    children: dict[int | None, list[int]] = {}
    for i, p in enumerate(parents):
        children.setdefault(p, []).append(i)
    ready = sorted(children.get(None, []))
    stamps: list[str] = [""] * len(parents)
    now = EPOCH0
    while ready:
        i = ready.pop(int(rng.integers(len(ready))))
        now += timedelta(milliseconds=1 + int(rng.exponential(MEAN_UPLOAD_GAP_S * 1000)))
        stamps[i] = now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"
        ready = sorted(ready + children.get(i, []))
    return stamps


def _walk(shape: Tree, parent: int | None, level: int) -> Iterator[tuple[int | None, int, Tree]]:
    """(parent position, level, subtree) in breadth-first order, positions counted from the root."""
    queue: list[tuple[int | None, int, Tree]] = [(parent, level, shape)]
    pos = 0
    while queue:
        p, lev, node = queue.pop(0)
        yield p, lev, node
        queue.extend((pos, lev + 1, child) for child in node)
        pos += 1


def _tasks_for(shape: Tree, root_task: str, rng: np.random.Generator) -> list[str]:
    """Per node (breadth-first): siblings on distinct tasks, every child on a task unlike its parent's."""
    nodes = list(_walk(shape, None, 0))
    tasks = [root_task] + [""] * (len(nodes) - 1)
    by_parent: dict[int, list[int]] = {}
    for pos, (p, _, _) in enumerate(nodes):
        if p is not None:
            by_parent.setdefault(p, []).append(pos)
    for p in sorted(by_parent):
        pool = [t for t in CHILD_TASKS if t != tasks[p]]
        picks = rng.choice(len(pool), size=len(by_parent[p]), replace=False)
        for pos, k in zip(by_parent[p], (int(x) for x in picks), strict=True):
            tasks[pos] = pool[k]
    return tasks


def layout(preset: PresetName, split: Split, seed: int) -> list[ModelSpec]:
    """All models of a zoo, parents before children, with every random choice drawn from `seed`."""
    cfg = PRESETS[preset]
    rng = np.random.default_rng([seed, PRESETS_ORDER.index(preset), SPLITS.index(split)])
    rows: list[tuple[int | None, int, int, str]] = []  # (parent row, tree, level, task)
    for tree in range(cfg.n_trees):
        root_task = ROOT_TASKS[int(rng.integers(len(ROOT_TASKS)))]
        offset = len(rows)
        tasks = _tasks_for(cfg.shape, root_task, rng)
        for (p, level, _), task in zip(_walk(cfg.shape, None, 0), tasks, strict=True):
            rows.append((None if p is None else offset + p, tree, level, task))
    names = _names([r[3] for r in rows], rng)
    stamps = _upload_times([r[0] for r in rows], rng)
    specs = []
    for i, (p, tree, level, task) in enumerate(rows):
        method, lr, epochs, rank, n_train = _recipe(cfg, split, level, rng)
        specs.append(ModelSpec(i, names[i], None if p is None else names[p], tree, level, task, method, lr,
                               epochs, rank, n_train, model_seed(seed, i), stamps[i]))
    return specs


def _recipe(cfg: Preset, split: Split, level: int, rng: np.random.Generator
            ) -> tuple[Literal["scratch", "full", "lora"], float, int, int | None, int]:
    """(method, lr, epochs, rank, n_train) of one model; roots are always trained from scratch."""
    if level == 0:
        return "scratch", ROOT_LR, cfg.root_epochs, None, cfg.root_train
    lr = float(FT_LRS[int(rng.integers(len(FT_LRS)))])
    if split == "ft":
        return "full", lr, int(rng.integers(FT_EPOCHS[0], FT_EPOCHS[1] + 1)), None, cfg.ft_train
    epochs = int(rng.integers(LORA_EPOCHS[0], LORA_EPOCHS[1] + 1))
    rank = LORA_F_RANK if split == "lora-f" else int(LORA_V_RANKS[int(rng.integers(len(LORA_V_RANKS)))])
    return "lora", lr, epochs, rank, cfg.lora_train


# --- training one model (runs in a worker process) ---------------------------------------------------


@dataclass(frozen=True)
class ModelReport:
    """What training one model measured."""

    repo_id: str
    epoch_losses: tuple[float, ...]
    train_accuracy: float
    test_accuracy: float
    head_is_new: bool
    seconds: float


def _quiet_transformers() -> None:
    """No per-model progress bars or load reports from transformers: 105 of them drown our own bar."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def train_one(spec: ModelSpec, out: Path, *, zoo_seed: int) -> ModelReport:
    """Train one model (its parent must already be written under `out`) and write its repo."""
    from indexer.zoo.data import make_task_data
    from indexer.zoo.repo import CardFacts, write_repo
    from indexer.zoo.train import Recipe, deterministic_torch, fit, fit_lora, from_parent, new_model

    _quiet_transformers()
    start = time.perf_counter()
    task = TASKS[spec.task]
    recipe = Recipe(spec.method, spec.lr, spec.epochs, rank=spec.rank)
    data = make_task_data(spec.task, zoo_seed=zoo_seed, model_seed=spec.seed, n_train=spec.n_train)
    with deterministic_torch(threads=1):
        if spec.parent is None:
            model, head_is_new = new_model(task, seed=spec.seed), True
        else:
            model, head_is_new = from_parent(out / spec.parent, task, seed=spec.seed)
        if spec.method == "lora":
            model, result = fit_lora(model, data, recipe, seed=spec.seed, head_is_new=head_is_new)
        else:
            result = fit(model, data, recipe, seed=spec.seed, head_is_new=head_is_new)
        facts = CardFacts(spec.repo_id, spec.parent, spec.task, recipe, len(data.y_train), len(data.y_test), result)
        write_repo(out / spec.repo_id, model, facts)
    seconds = time.perf_counter() - start
    logger.info("%s: %s held-out %.3f in %.1f s", spec.repo_id, spec.task, result.test_accuracy, seconds)
    return ModelReport(spec.repo_id, result.epoch_losses, result.train_accuracy, result.test_accuracy,
                       head_is_new, seconds)


# --- the whole zoo -----------------------------------------------------------------------------------


def _check_out(out: Path, *, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise BadInputError(str(out), "exists and is not a folder; pick a new or empty folder")
    if not out.exists() or not any(out.iterdir()):
        return
    if not force:
        raise BadInputError(str(out), "exists and is not empty; pick a new or empty folder, or pass --force "
                            "to replace a zoo built there before")
    if not (out / "zoo.json").is_file():
        raise BadInputError(str(out), "is not empty and holds no zoo.json, so it is not a zoo; refusing to "
                            "delete it even with --force")
    logger.warning("replacing the zoo at %s", out)
    shutil.rmtree(out)


def _train_all(specs: list[ModelSpec], out: Path, *, zoo_seed: int, workers: int) -> dict[str, ModelReport]:
    """Train every model, each once its parent is written; `workers` processes (1 = in this process)."""
    reports: dict[str, ModelReport] = {}
    with tqdm(total=len(specs), desc="zoo", unit="model", disable=None) as bar:
        if workers <= 1:
            for spec in specs:  # specs are laid out parents first
                reports[spec.repo_id] = train_one(spec, out, zoo_seed=zoo_seed)
                bar.update()
            return reports
        ctx = get_context("spawn")  # fork after torch has started threads can deadlock
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_quiet_transformers) as pool:
            _schedule(pool, specs, out, zoo_seed, reports, bar)
    return reports


def _schedule(pool: Executor, specs: list[ModelSpec], out: Path, zoo_seed: int,
              reports: dict[str, ModelReport], bar: tqdm) -> None:
    """Submit roots, then each model as soon as its parent's report is in."""
    kids: dict[str | None, list[ModelSpec]] = {}
    for spec in specs:
        kids.setdefault(spec.parent, []).append(spec)
    running: dict[Future[ModelReport], ModelSpec] = {
        pool.submit(train_one, s, out, zoo_seed=zoo_seed): s for s in kids.get(None, [])
    }
    while running:
        done, _ = wait(running, return_when=FIRST_COMPLETED)
        for fut in sorted(done, key=lambda f: running[f].index):  # deterministic submission order
            spec = running.pop(fut)
            reports[spec.repo_id] = fut.result()
            bar.update()
            for child in kids.get(spec.repo_id, []):
                running[pool.submit(train_one, child, out, zoo_seed=zoo_seed)] = child


def _write_json(path: Path, obj: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


def _write_truth(out: Path, specs: list[ModelSpec]) -> None:
    with (out / "truth.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["parent", "child"])
        for spec in sorted(specs, key=lambda s: s.repo_id):  # sorted by child
            writer.writerow([spec.parent or "", spec.repo_id])


def _hub_json(specs: list[ModelSpec]) -> dict[str, object]:
    repos = {s.repo_id: {"createdAt": s.created_at, "gated": False, "private": False}
             for s in sorted(specs, key=lambda s: s.repo_id)}
    return {"version": ZOO_VERSION, "repos": repos}


def _zoo_json(specs: list[ModelSpec], reports: dict[str, ModelReport], *, preset: str, split: str,
              seed: int, seconds: float | None) -> dict[str, object]:
    models: dict[str, object] = {}
    for spec in sorted(specs, key=lambda s: s.repo_id):
        row: dict[str, object] = asdict(spec)
        if spec.repo_id in reports:
            rep = asdict(reports[spec.repo_id])
            rep.pop("repo_id")
            row |= rep
        models[spec.repo_id] = row
    status = "building" if seconds is None else "done"
    return {"version": ZOO_VERSION, "status": status, "preset": preset, "split": split, "seed": seed,
            "total_seconds": seconds, "n_models": len(specs), "models": models}


def make_zoo(out: Path, *, preset: PresetName, split: Split, seed: int = 0, force: bool = False,
             workers: int | None = None) -> ZooSummary:
    """Train a zoo of ViTs in trees with known lineage and write it under `out` (see the module doc)."""
    if preset not in PRESETS:
        raise BadInputError(preset, f"unknown preset; choose one of {', '.join(PRESETS_ORDER)}")
    if split not in SPLITS:
        raise BadInputError(split, f"unknown split; choose one of {', '.join(SPLITS)}")
    start = time.perf_counter()
    out = Path(out)
    _check_out(out, force=force)  # 1.
    specs = layout(preset, split, seed)  # 2.
    write_zoo(out, specs, preset=preset, split=split, seed=seed, workers=workers)  # 3. and 4.
    seconds = time.perf_counter() - start
    logger.info("zoo %s/%s seed %d: %d models in %.1f s", preset, split, seed, len(specs), seconds)
    return ZooSummary(out, len(specs), PRESETS[preset].n_trees, seconds)


def write_zoo(out: Path, specs: list[ModelSpec], *, preset: str, split: str, seed: int,
              workers: int | None = None) -> dict[str, ModelReport]:
    """Train the laid-out `specs` (parents first; any sub-forest of a layout) and write the zoo files."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "zoo.json", _zoo_json(specs, {}, preset=preset, split=split, seed=seed, seconds=None))
    n_workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    reports = _train_all(specs, out, zoo_seed=seed, workers=n_workers)
    _write_json(out / "hub.json", _hub_json(specs))
    _write_truth(out, specs)
    seconds = time.perf_counter() - start
    _write_json(out / "zoo.json", _zoo_json(specs, reports, preset=preset, split=split, seed=seed, seconds=seconds))
    return reports


_TRUTH_HEADERS = (["parent", "child"], ["parent", "child", "relation"])  # the wild presets add the relation


def _truth_rows(out: Path) -> list[dict[str, str]]:
    path = Path(out) / "truth.csv"
    if not path.is_file():
        raise BadInputError(str(path), "missing; is this a zoo built by `index zoo make`?")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames not in _TRUTH_HEADERS:
            raise BadInputError(str(path), f"header is {reader.fieldnames}, expected parent,child or "
                                "parent,child,relation")
        return list(reader)


def read_truth(out: Path) -> dict[str, str | None]:
    """child -> parent (None for a root), from OUT/truth.csv."""
    return {row["child"]: (row["parent"] or None) for row in _truth_rows(out)}


def read_relations(out: Path) -> dict[str, str]:
    """child -> relation (finetune | adapter | quantized | merge | duplicate; "" for a root), from
    OUT/truth.csv; a zoo without the relation column holds fine-tunes only."""
    return {row["child"]: (row.get("relation") or ("finetune" if row["parent"] else "")) for row in _truth_rows(out)}
