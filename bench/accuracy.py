"""Accuracy benchmark: MoTHer (paper), ours, the Neural Phylogeny baseline and ablations on the VTHR zoos.

    .venv/bin/python bench/accuracy.py [--zoo-dir zoo] [--splits ft,lora-f,lora-v] [--results bench/RESULTS.md]

For each split, reuses `<zoo-dir>/vthr-<split>` when its zoo.json says "done", else builds it with
`indexer.zoo.make_zoo` (hours on 2 cores; a zoo another process is still building is refused). Then
runs every configuration below on the folder from disk (weights read each time: the wall time is a
full recovery) and prints ONE markdown table: per-tree edge accuracy (trees in order of their root id),
overall accuracy, clustering accuracy, wall seconds; the paper's reported row beside ours. The table,
the command, the machine and the date are written to --results.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import torch  # noqa: E402

from indexer.evaluate import EvalReport, evaluate, read_truth_csv  # noqa: E402
from indexer.lineage.methods import Options  # noqa: E402
from indexer.lineage.recover import recover  # noqa: E402

logger = logging.getLogger("bench.accuracy")

PRESET = "vthr"
TREES = 5  # VTHR: 5 trees of 21 models (the table has this many per-tree columns)
# The MoTHer paper's Table (VTHR, Model Graph with K known): per tree (ImageNet, ImageNet-21k, MAE,
# DINO, MSN roots) and overall.
PAPER = {
    "ft": ((1.0, 1.0, 0.95, 0.5, 1.0), 0.89),
    "lora-f": ((1.0, 1.0, 1.0, 1.0, 0.8), 0.96),
    "lora-v": ((1.0, 1.0, 1.0, 1.0, 1.0), 1.0),
}


@dataclass(frozen=True)
class Config:
    label: str
    options: Options


def configs(split: str, trees: int) -> list[Config]:
    """Rows of one split: the paper's method, ours, each ablation of ours, the baseline."""
    paper_distance = "linf" if split == "ft" else "rank"  # the paper's choice per split
    return [
        Config(f"mother-paper (K={trees} known, {paper_distance})",
               Options(method="mother-paper", trees=trees, distance=paper_distance)),
        Config("**mother** (ours, K unknown)", Options()),
        Config("mother, K known (ward)", Options(trees=trees)),
        Config("mother without upload time", Options(use_time=False)),
        Config("mother + kurtosis weighted by time agreement", Options(kurtosis="always")),
        Config("mother + kurtosis, sign fixed +1 (paper)", Options(kurtosis="always", auto_sign=False)),
        Config("mother, time weight 1 (not 3)", Options(time_weight=1.0, kurtosis="always")),
        Config("mother with 1-D tensors", Options(include_1d=True)),
        Config("mother without auto rank (tail forced)", Options(distance="tail")),
        Config("mother with the old l2n distance (layer-normalised L2)", Options(distance="l2n")),
        Config("mother, plain L2 (not layer-normalised)", Options(distance="l2")),
        Config("mother on all shared layers (not dense only)", Options(dense_only=False)),
        Config("mother with paper's linf distance", Options(distance="linf")),
        Config("phylogeny (K unknown, alpha 0.5)", Options(method="phylogeny")),
        Config(f"phylogeny (K={trees} known, alpha 0.5)", Options(method="phylogeny", trees=trees)),
    ]


def ensure_zoo(folder: Path, preset: str, split: str, seed: int) -> None:
    meta = folder / "zoo.json"
    if meta.is_file():
        status = json.loads(meta.read_text()).get("status")
        if status == "done":
            return
        raise SystemExit(f"{folder}: zoo.json says {status!r}; another process may be building it. "
                         "Wait for it, or delete the folder to rebuild.")
    from indexer.zoo import make_zoo

    logger.warning("building %s (preset %s, split %s, seed %d): this trains every model", folder, preset, split, seed)
    make_zoo(folder, preset=preset, split=split, seed=seed)  # type: ignore[arg-type]


def run_one(folder: Path, truth: dict[str, str], config: Config) -> tuple[EvalReport, float]:
    start = time.perf_counter()
    forest = recover(folder, config.options)
    seconds = time.perf_counter() - start
    for note in forest.notes:
        logger.info("%s | %s", config.label, note)
    return evaluate(forest, truth), seconds


def _cell(x: float) -> str:
    return f"{x:.2f}"


def table(results: list[tuple[str, str, EvalReport | None, float | None]], trees: int) -> str:
    head = "| split | method | " + " | ".join(f"tree {i + 1}" for i in range(trees)) + " | overall | clustering | wall s |"
    lines = [head, "|" + "---|" * (trees + 5)]
    for split, label, report, seconds in results:
        if report is None:
            per, overall = PAPER[split]
            cells = ([_cell(x) for x in per] + ["-"] * trees)[:trees] + [_cell(overall), "1.00", "-"]
        else:
            per_tree = [_cell(t.accuracy) for t in report.trees] + ["-"] * max(0, trees - len(report.trees))
            cells = per_tree[:trees] + [f"**{_cell(report.accuracy)}**" if label.startswith("**") else _cell(report.accuracy),
                                        _cell(report.clustering_accuracy), f"{seconds:.1f}"]
        lines.append(f"| {split} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        cpu = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), cpu)
    except OSError:
        pass
    nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=False).stdout.strip()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (distances on CPU)"
    return f"{nproc} cores (`nproc`), {cpu}, {gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo-dir", type=Path, default=Path("zoo"))
    parser.add_argument("--splits", default="ft,lora-f,lora-v")
    parser.add_argument("--seed", type=int, default=0, help="zoo seed when a zoo must be built")
    parser.add_argument("--preset", default=PRESET, help="zoo preset (folders <zoo-dir>/<preset>-<split>)")
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results: list[tuple[str, str, EvalReport | None, float | None]] = []
    from indexer.zoo import PRESETS

    trees = PRESETS[args.preset].n_trees  # a smaller preset for a quick check; the paper row stays VTHR's
    for split in args.splits.split(","):
        folder = args.zoo_dir / f"{args.preset}-{split}"
        ensure_zoo(folder, args.preset, split, args.seed)
        truth = read_truth_csv(folder / "truth.csv")
        results.append((split, "MoTHer paper, reported (their zoo)", None, None))
        for config in configs(split, trees):
            report, seconds = run_one(folder, truth, config)
            logger.warning("%s %-40s acc %.3f clustering %.3f %.1f s", split, config.label, report.accuracy,
                           report.clustering_accuracy, seconds)
            results.append((split, config.label, report, seconds))
    md = table(results, TREES)
    print(md)
    command = "`.venv/bin/python bench/accuracy.py " + " ".join(sys.argv[1:]) + "`"
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    block = f"Command: {command} (or `make bench-accuracy`)\n\nMachine: {machine()}\n\nDate: {stamp}\n\n{md}\n"
    write_results(args.results, block)


START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def write_results(path: Path, block: str) -> None:
    """Replace the generated block of `path`, keeping the hand-written notes around it."""
    text = path.read_text() if path.is_file() else f"# Accuracy benchmark\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        text += f"\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{START}\n{block}{END}{tail}")


if __name__ == "__main__":
    main()
