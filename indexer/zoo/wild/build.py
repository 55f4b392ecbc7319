"""Build a wild zoo: train the laid-out forest, write the copies, then hub.json, truth.csv and zoo.json.

Output layout under OUT/ is the ViT zoo's (see indexer/zoo/build.py), so `index recover`, `index hub serve`
and `index eval` read it unchanged:
    <org>/<name>/{config.json, model.safetensors, README.md}
    hub.json    upload times; a parent strictly before its children, so copies after their originals
    truth.csv   parent,child,relation  (relation: finetune | quantized | duplicate; empty for roots)
    zoo.json    per model: tag (the phenomenon), recipe, seconds, drift vs its parent, accuracies
The model cards declare `base_model` and `base_model_relation` (finetune, or quantized for the dtype
copies). Duplicates and re-saves declare `base_model` alone: the Hub has no "duplicate" relation and
shows such a repo as a fine-tune; truth.csv says duplicate.

Steps of `make_wild_zoo`:
    1. check OUT (empty, new, or an old zoo with --force)
    2. lay out the forest (names, seeds, upload times from the seed)
    3. run the jobs, each once its parent is written, on `workers` processes of one thread each:
       a training job writes one model (three for a snake run), a copy job re-writes its parent's file
    4. write hub.json, truth.csv, zoo.json
Every tensor depends only on (seed, the model's index, its parent's file), never on scheduling, so the
same seed gives byte-identical model.safetensors on the same machine whatever `workers` is.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from errors import BadInputError
from indexer.zoo.build import ZOO_VERSION, _check_out, _quiet_transformers, _write_json
from indexer.zoo.train import deterministic_torch
from indexer.zoo.wild.archs import ARCHS, Arch, Tensors, body_drift, is_buffer
from indexer.zoo.wild.data import TEXT_TASKS, Arrays, image_classes, image_data, text_data
from indexer.zoo.wild.layout import WILD_ORDER, WILD_PRESETS, WildSpec, layout
from indexer.zoo.wild.train import Recipe, TrainResult, fit

logger = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
_DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16}
_PIPELINES = {"classify": "text-classification", "pretrain": "fill-mask", "lm": "text-generation"}


@dataclass(frozen=True)
class WildReport:
    """What making one model measured (copies carry no accuracies of their own)."""

    repo_id: str
    seconds: float
    drift: float | None  # median relative L2 of the body's matrices vs the parent (None for roots)
    steps: int | None
    train_loss: float | None
    train_accuracy: float | None
    test_loss: float | None
    test_accuracy: float | None


@dataclass(frozen=True)
class WildSummary:
    """What `make_wild_zoo` built; `drifts` is (repo_id, tag, drift) per model in layout order."""

    out: Path
    n_models: int
    n_trees: int
    seconds: float
    drifts: tuple[tuple[str, str, float | None], ...]


# --- one job (runs in a worker process) --------------------------------------------------------------


def _n_classes(spec: WildSpec, recipe: Recipe) -> int:
    if spec.arch == "conv":
        return image_classes(recipe.task)
    return TEXT_TASKS[recipe.task].n_classes


def _data(spec: WildSpec, recipe: Recipe, zoo_seed: int) -> tuple[Arrays, Arrays]:
    if spec.arch == "conv":
        return image_data(recipe.task, zoo_seed=zoo_seed, model_seed=spec.seed, n_train=recipe.n_train)
    return text_data(recipe.task, recipe.objective, zoo_seed=zoo_seed, model_seed=spec.seed, n_train=recipe.n_train,
                     style="bert" if spec.arch == "bert" else "gpt2")


def _front_matter(spec: WildSpec, arch: Arch, head: str) -> str:
    pipeline = "image-classification" if spec.arch == "conv" else _PIPELINES[head]
    meta: dict[str, object] = {"library_name": arch.library, "pipeline_tag": pipeline}
    if spec.parent is not None:
        meta["base_model"] = spec.parent
        if spec.relation != "duplicate":  # the Hub's closed set has no "duplicate"
            meta["base_model_relation"] = spec.relation
    meta["tags"] = [spec.arch, "model-graph-index-zoo", "wild"]
    meta["license"] = "apache-2.0"
    return yaml.safe_dump(meta, sort_keys=False, default_flow_style=False)


def _card(spec: WildSpec, arch: Arch, head: str, lines: list[str]) -> str:
    return "\n".join(["---", _front_matter(spec, arch, head).rstrip("\n"), "---", "", f"# {spec.repo_id}", "",
                      *lines, ""])


def _recipe_lines(recipe: Recipe, result: TrainResult) -> list[str]:
    return [f"Trained on the synthetic task `{recipe.task}` ({recipe.objective}).", "", "## Training", "",
            f"- optimizer: {recipe.optimizer}, learning rate {recipe.lr:g}, weight decay {recipe.weight_decay:g}",
            f"- epochs: {recipe.epochs} over {recipe.n_train} examples, batch {recipe.batch_size}, {result.steps} steps",
            f"- frozen body: {'yes' if recipe.frozen_body else 'no'}", "", "## Results", "",
            f"- train loss (last epoch): {result.train_loss:.4f}",
            f"- accuracy: train {result.train_accuracy:.4f}, held-out {result.test_accuracy:.4f}"]


def _write(folder: Path, tensors: Tensors, config: dict[str, Any], card: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (folder / "README.md").write_text(card, encoding="utf-8")


def _train_job(specs: tuple[WildSpec, ...], out: Path, zoo_seed: int) -> list[WildReport]:
    """Train one run and write each of its checkpoints (one, or three for a snake)."""
    first = specs[0]
    recipe, arch = first.recipe, ARCHS[first.arch]
    if recipe is None:
        raise ValueError(f"{first.repo_id} has no recipe")
    n_classes = _n_classes(first, recipe)
    train, test = _data(first, recipe, zoo_seed)
    reports: list[WildReport] = []
    with deterministic_torch(threads=1):
        model = arch.build(recipe.head, n_classes, seed=first.seed)
        previous = load_file(str(out / first.parent / WEIGHTS)) if first.parent else None
        if previous is not None:
            arch.load(model, previous, keep_head=recipe.keep_head)
        clock = [time.perf_counter()]

        def save(k: int, result: TrainResult) -> None:
            nonlocal previous
            spec, tensors = specs[k], arch.saved_tensors(model)
            card = _card(spec, arch, recipe.head, _recipe_lines(recipe, result))
            _write(out / spec.repo_id, tensors, arch.config(model, recipe.head, n_classes), card)
            drift = body_drift(arch, previous, tensors) if previous is not None else None
            now = time.perf_counter()
            reports.append(WildReport(spec.repo_id, now - clock[0], drift, result.steps, result.train_loss,
                                      result.train_accuracy, result.test_loss, result.test_accuracy))
            clock[0], previous = now, tensors  # a snake's next checkpoint descends from this one

        fit(arch, model, train, test, recipe, seed=first.seed, on_checkpoint=save)
    return reports


def _copied(spec: WildSpec, arch: Arch, source: Tensors) -> Tensors:
    """The copy's tensors under the source's names (dtype changed, buffers dropped, as the op says)."""
    if spec.copy == "nobuffer":
        return {n: t for n, t in source.items() if not is_buffer(n)}
    if spec.copy in _DTYPES:
        dtype = _DTYPES[spec.copy]
        return {n: t.to(dtype) if t.is_floating_point() else t for n, t in source.items()}
    return dict(source)


def _copy_job(spec: WildSpec, out: Path) -> WildReport:
    """Re-write the parent's weights as the spec's copy op says; config.json travels along."""
    start = time.perf_counter()
    arch, src = ARCHS[spec.arch], out / str(spec.parent)
    source = load_file(str(src / WEIGHTS))
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    kept = _copied(spec, arch, source)
    if spec.copy in _DTYPES and spec.arch != "conv":
        config["dtype"] = str(_DTYPES[spec.copy]).removeprefix("torch.")  # as save_pretrained records it
    head = "classify" if spec.arch == "conv" else _head_of(config)
    text = {"prefix": f"The weights of {spec.parent}, re-saved under other tensor names.",
            "nobuffer": f"The weights of {spec.parent}, re-saved without the buffers.",
            "f16": f"{spec.parent} in float16.", "bf16": f"{spec.parent} in bfloat16.",
            "duplicate": f"A re-upload of {spec.parent}."}[str(spec.copy)]
    card = _card(spec, arch, head, [text])
    if spec.copy == "duplicate":  # byte for byte: the file itself, not a re-serialisation
        (out / spec.repo_id).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / WEIGHTS, out / spec.repo_id / WEIGHTS)
        _write_side_files(out / spec.repo_id, config, card)
    else:
        written = {arch.rename(n): t for n, t in kept.items()} if spec.copy == "prefix" else kept
        _write(out / spec.repo_id, written, config, card)
    return WildReport(spec.repo_id, time.perf_counter() - start, body_drift(arch, source, kept),
                      None, None, None, None, None)


def _write_side_files(folder: Path, config: dict[str, Any], card: str) -> None:
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (folder / "README.md").write_text(card, encoding="utf-8")


def _head_of(config: dict[str, Any]) -> str:
    name = (config.get("architectures") or [""])[0]
    return "classify" if "SequenceClassification" in name else "lm" if "LMHead" in name else "pretrain"


def run_job(specs: tuple[WildSpec, ...], out: Path, zoo_seed: int) -> list[WildReport]:
    """Make the models of one job (its parent must already be written under `out`)."""
    _quiet_transformers()
    if specs[0].copy is not None:
        return [_copy_job(specs[0], out)]
    return _train_job(specs, out, zoo_seed)


def _log(job: tuple[WildSpec, ...], reports: list[WildReport]) -> None:
    """One line per model, in the main process (a spawned worker has no logging set up)."""
    for spec, rep in zip(job, reports, strict=True):
        drift = "-" if rep.drift is None else f"{rep.drift:.3f}"
        logger.info("%s [%s]: drift %s, held-out %s, %.1f s", spec.repo_id, spec.tag, drift,
                    "-" if rep.test_accuracy is None else f"{rep.test_accuracy:.3f}", rep.seconds)


# --- scheduling --------------------------------------------------------------------------------------


def _jobs(specs: list[WildSpec]) -> dict[str, tuple[WildSpec, ...]]:
    """job id -> its specs in checkpoint order, in layout order."""
    jobs: dict[str, list[WildSpec]] = {}
    for spec in specs:
        jobs.setdefault(spec.job, []).append(spec)
    return {k: tuple(sorted(v, key=lambda s: s.checkpoint)) for k, v in jobs.items()}


def _run_all(specs: list[WildSpec], out: Path, *, zoo_seed: int, workers: int) -> dict[str, WildReport]:
    jobs = _jobs(specs)
    reports: dict[str, WildReport] = {}
    with tqdm(total=len(specs), desc="zoo", unit="model", disable=None) as bar:
        if workers <= 1:
            for job in jobs.values():  # laid out parents first
                done = run_job(job, out, zoo_seed)
                _log(job, done)
                reports |= {rep.repo_id: rep for rep in done}
                bar.update(len(job))
            return reports
        ctx = get_context("spawn")  # fork after torch has started threads can deadlock
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_quiet_transformers) as pool:
            _schedule(pool, specs, jobs, out, zoo_seed, reports, bar)
    return reports


def _schedule(pool: Executor, specs: list[WildSpec], jobs: dict[str, tuple[WildSpec, ...]], out: Path,
              zoo_seed: int, reports: dict[str, WildReport], bar: tqdm) -> None:
    """Submit the root jobs, then each job as soon as the job writing its parent is done."""
    job_of = {s.repo_id: s.job for s in specs}
    waiting: dict[str | None, list[str]] = {}
    for job_id, job in jobs.items():
        parent = job[0].parent
        waiting.setdefault(None if parent is None else job_of[parent], []).append(job_id)
    running: dict[Future[list[WildReport]], str] = {
        pool.submit(run_job, jobs[j], out, zoo_seed): j for j in waiting.get(None, [])
    }
    while running:
        done, _ = wait(running, return_when=FIRST_COMPLETED)
        for fut in sorted(done, key=lambda f: jobs[running[f]][0].index):  # deterministic submission order
            job_id = running.pop(fut)
            done = fut.result()
            _log(jobs[job_id], done)
            reports |= {rep.repo_id: rep for rep in done}
            bar.update(len(jobs[job_id]))
            for child in waiting.get(job_id, []):
                running[pool.submit(run_job, jobs[child], out, zoo_seed)] = child


# --- the zoo files -----------------------------------------------------------------------------------


def _write_truth(out: Path, specs: list[WildSpec]) -> None:
    with (out / "truth.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["parent", "child", "relation"])
        for spec in sorted(specs, key=lambda s: s.repo_id):  # sorted by child
            writer.writerow([spec.parent or "", spec.repo_id, spec.relation])


def _hub_json(specs: list[WildSpec]) -> dict[str, object]:
    repos = {s.repo_id: {"createdAt": s.created_at, "gated": False, "private": False}
             for s in sorted(specs, key=lambda s: s.repo_id)}
    return {"version": ZOO_VERSION, "repos": repos}


_INHERITED = ("train_loss", "train_accuracy", "test_loss", "test_accuracy")


def _row(spec: WildSpec, reports: dict[str, WildReport]) -> dict[str, object]:
    row: dict[str, object] = {k: v for k, v in asdict(spec).items() if k != "recipe"}
    row |= asdict(spec.recipe) if spec.recipe is not None else {"task": None, "lr": None, "epochs": None}
    if spec.repo_id in reports:
        row |= {k: v for k, v in asdict(reports[spec.repo_id]).items() if k != "repo_id"}
        if spec.copy is not None and spec.parent in reports:  # same weights: the source's figures
            row |= {k: getattr(reports[spec.parent], k) for k in _INHERITED}
    return row


def _zoo_json(specs: list[WildSpec], reports: dict[str, WildReport], *, preset: str, seed: int,
              seconds: float | None) -> dict[str, object]:
    models = {s.repo_id: _row(s, reports) for s in sorted(specs, key=lambda s: s.repo_id)}
    status = "building" if seconds is None else "done"
    return {"version": ZOO_VERSION, "status": status, "preset": preset, "split": "wild", "seed": seed,
            "total_seconds": seconds, "n_models": len(specs), "models": models}


def make_wild_zoo(out: Path, *, preset: str, seed: int = 0, force: bool = False,
                  workers: int | None = None) -> WildSummary:
    """Train a wild preset's forest and write it under `out` (see the module doc)."""
    if preset not in WILD_PRESETS:
        raise BadInputError(preset, f"unknown wild preset; choose one of {', '.join(WILD_ORDER)}")
    start = time.perf_counter()
    out = Path(out)
    _check_out(out, force=force)  # 1.
    specs = layout(preset, seed)  # 2.
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "zoo.json", _zoo_json(specs, {}, preset=preset, seed=seed, seconds=None))
    n_workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    reports = _run_all(specs, out, zoo_seed=seed, workers=n_workers)  # 3.
    _write_json(out / "hub.json", _hub_json(specs))  # 4.
    _write_truth(out, specs)
    seconds = time.perf_counter() - start
    _write_json(out / "zoo.json", _zoo_json(specs, reports, preset=preset, seed=seed, seconds=seconds))
    logger.info("zoo %s seed %d: %d models in %.1f s", preset, seed, len(specs), seconds)
    drifts = tuple((s.repo_id, s.tag, reports[s.repo_id].drift) for s in specs)
    return WildSummary(out, len(specs), sum(s.parent is None for s in specs), seconds, drifts)
