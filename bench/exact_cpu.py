"""The exact step on the CPU: the Gram kernel (method "gram") against a reference kernel: the previous SVD
kernel ("svd", the default), the Gram kernel before float32 tails and related-only spectra ("gram64"),
the Gram kernel with torch's matrix products for its Gram matrices instead of BLAS syrk ("matmul"), or
the Gram kernel with its relatedness units projected in float64 ("units64", before session 9).

    .venv/bin/python bench/exact_cpu.py [--threads 2] [--layers 8] [--models 32] [--pairs 64] [--seed 0]
    .venv/bin/python bench/exact_cpu.py --zoo /work/zoo/vthr-ft [--zoo ...] [--reference gram64]

Synthetic (default): bench/gpu_exact.py's 7B-shaped models (the blocks read plan `--plan` selects, full-rank
steps and merged LoRAs, short lists of 16: 14 relatives and 2 strangers) on the first `--layers` blocks;
`--pairs` pairs of a strided sample of the short lists, in one `measure_many` call per method. Zoo mode:
every model of each folder against `--nominees` others of its family (a seeded choice; one job per model),
the tensors the incremental index would compare (`indexer.incremental.index._prepare`).

Both methods run back to back on the same jobs, the reference first, after a one-job warm-up each; wall and
CPU (process) seconds are printed with the load average, because the box is shared. Then, pair by pair:
decisions that differ (`exact.decisions`: related, low-rank tier, identical, direction; must be 0), jobs
whose related nominees come out in another order by distance (must be 0), and the largest relative
differences of the related pairs' stored distance, relative L2, relatedness score and kurtosis sums.
Prints markdown (copy it to bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_exact import make_jobs, make_zoo, selected_blocks, short_lists, subset

from errors import BadInputError, UnsupportedModelError
from indexer.crawl import CrawlOptions
from indexer.incremental.exact import (
    Method,
    ModelView,
    PairMeasure,
    decisions,
    forget_units,
    measure_many,
)
from sketches import gram as gram_module
from sketches import relatedness as relatedness_module
from sketches.plan import PLAN_V2, PLAN_V3

Job = tuple[ModelView, list[ModelView]]
PLANS = {"v2": PLAN_V2, "v3": PLAN_V3}
FIELDS = ("distance", "relative", "median_relative", "score", "ku_new", "ku_other")


def synthetic_jobs(args: argparse.Namespace) -> tuple[str, list[Job]]:
    blocks = selected_blocks(int(args.budget_mib * (1 << 20)), spec=PLANS[args.plan])[: args.layers]
    zoo = make_zoo(args.models, blocks, seed=args.seed)
    lists = short_lists(zoo, seed=args.seed)
    jobs = make_jobs(zoo, lists, sum(len(one) for mine in lists for one in mine))  # every list, then sampled
    _, sample = subset(jobs, args.pairs)
    shape = blocks[0][1]
    return f"synthetic 7B-shaped (plan {args.plan}), {len(blocks)} blocks of {shape[0]} x {shape[1]}, {args.models} models", sample


def zoo_jobs(folder: Path, nominees: int, seed: int) -> tuple[str, list[Job]]:
    """Every model of the folder against `nominees` others of its family (seeded choice; all when the
    family is smaller), as the index would see them."""
    from indexer.incremental.folder import read_repo
    from indexer.incremental.index import DEFAULT_DIM, Arrival, _prepare
    from indexer.lineage.recover import discover_repos

    views: dict[str, list[ModelView]] = {}
    for repo_id, path in discover_repos(folder):
        try:
            family, revision, arrays = read_repo(path)
        except (BadInputError, UnsupportedModelError):  # an adapter or a quantized layout: no exact pairs
            continue
        views.setdefault(family, []).append(_prepare(0, Arrival(repo_id, revision, family, arrays, None), DEFAULT_DIM, 0).mine)
    rng = np.random.default_rng(seed)
    jobs = []
    for _, members in sorted(views.items()):
        for v in members:
            others = [o for o in members if o is not v]
            chosen = sorted(rng.choice(len(others), size=min(nominees, len(others)), replace=False).tolist())
            jobs.append((v, [others[i] for i in chosen]))
    return (f"zoo {folder.name}, {sum(len(m) for m in views.values())} models, {nominees} random nominees each",
            [j for j in jobs if j[1]])


def timed(jobs: Sequence[Job], method: str, *, cold: bool) -> tuple[float, float, list[list[PairMeasure]]]:
    """One `measure_many` call after a one-job warm-up; `cold`: no model's relatedness units cached.
    "matmul": method gram with the Gram matrices from torch's matrix product instead of BLAS syrk
    (sketches.gram._syrk), the kernel before session 8."""
    with _products(method == "matmul"), _float64_units(method == "units64"):
        kernel: Method = "gram" if method in ("matmul", "units64") else method  # type: ignore[assignment]
        measure_many(jobs[:1], device="cpu", method=kernel)  # warm-up (thread pools)
        if cold:
            forget_units()
        wall, cpu = time.perf_counter(), time.process_time()
        out = measure_many(jobs, device="cpu", method=kernel)
    return time.perf_counter() - wall, time.process_time() - cpu, out


@contextmanager
def _products(matmul: bool) -> Iterator[None]:
    saved = dict(gram_module._SYRK)
    if matmul:
        gram_module._SYRK.clear()  # gram() then takes torch's product on every device
    try:
        yield
    finally:
        gram_module._SYRK.update(saved)


@contextmanager
def _float64_units(wide: bool) -> Iterator[None]:
    """Method "units64": relatedness units projected in float64 (the definition before session 9; now
    sketches.relatedness.unit_rows projects wide layers in float32). Units cached by either are dropped
    on the way in and out, so neither kernel reads the other's."""
    saved = relatedness_module.unit_rows
    if wide:
        relatedness_module.unit_rows = gram_module.unit_rows = _unit_rows64  # type: ignore[assignment]
        forget_units()
    try:
        yield
    finally:
        if wide:
            relatedness_module.unit_rows = gram_module.unit_rows = saved  # type: ignore[assignment]
            forget_units()


def _unit_rows64(layer: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    m = min(int(layer.shape[0]), relatedness_module.MAX_ROWS)
    mat = layer[:m].reshape(m, -1).to(torch.float64)
    mat = mat - mat.mean()
    return mat @ relatedness_module.projection(mat.shape[1]) if mat.shape[1] > relatedness_module.MAX_COLS else mat


def rel_diff(a: float, b: float) -> float:
    if a == b or (math.isnan(a) and math.isnan(b)):
        return 0.0
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def compare(new: list[list[PairMeasure]], old: list[list[PairMeasure]], reference: str
            ) -> tuple[int, list[str], dict[str, float]]:
    """(pairs compared, the differing decisions and nominee orders, max relative difference per field).
    A job's order: its related nominees sorted by stored distance, what its candidate edges compete on.
    An unrelated pair's distance is compared with nothing: gram does not measure its spectra
    (indexer.incremental.exact._related_rows), and no edge reads it."""
    differ, worst, n = [], dict.fromkeys(FIELDS, 0.0), 0
    for g_job, s_job in zip(new, old, strict=True):
        for g, s in zip(g_job, s_job, strict=True):
            n += 1
            if decisions(g) != decisions(s):
                differ.append(f"{g.other}: gram {decisions(g)} {reference} {decisions(s)}")
            for f in FIELDS if s.related else ():
                worst[f] = max(worst[f], rel_diff(getattr(g, f), getattr(s, f)))
        if order(g_job) != order(s_job):
            differ.append(f"nominee order by distance: gram {order(g_job)} {reference} {order(s_job)}")
    return n, differ, worst


def order(job: list[PairMeasure]) -> list[str]:
    return [p.other for p in sorted(job, key=lambda p: (p.distance, p.other)) if p.related]


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def run(title: str, jobs: list[Job], repeat: int, reference: str) -> None:
    """The reference kernel and gram alternately, `repeat` times each: the box is shared, so the best of
    each is reported with every run's times and the load average around them."""
    before = load()
    times: dict[str, list[tuple[float, float]]] = {reference: [], "gram": [], "gram, units cached": []}
    results: dict[str, list[list[PairMeasure]]] = {}
    for _ in range(repeat):
        for method, runs in times.items():
            wall, cpu, results[method] = timed(jobs, method.split(",")[0], cold=method != "gram, units cached")  # type: ignore[arg-type]
            runs.append((wall, cpu))
    n, differ, worst = compare(results["gram"], results[reference], reference)
    print(f"\n{title}: {n:,} pairs in {len(jobs)} jobs; load average {before} before, {load()} after; "
          f"torch {torch.get_num_threads()} threads; best of {repeat} alternating runs\n")
    print("| method | seconds (wall, best) | pairs/s (wall) | CPU seconds (best) | pairs per CPU second | every run, wall s |\n"
          "|---|---:|---:|---:|---:|---|")
    best = {m: (min(w for w, _ in ts), min(c for _, c in ts)) for m, ts in times.items()}
    labels = {reference: f"{reference} (reference)", "gram": "gram (new), cold",
              "gram, units cached": "gram (new), every model's units cached (a crawl's nominees)"}
    for method, label in labels.items():
        wall, cpu = best[method]
        every = ", ".join(f"{w:.1f}" for w, _ in times[method])
        print(f"| {label} | {wall:.2f} | {n / wall:.1f} | {cpu:.2f} | {n / cpu:.1f} | {every} |")
    print(f"\nspeed-up {best[reference][0] / best['gram'][0]:.1f}x wall, {best[reference][1] / best['gram'][1]:.1f}x CPU; "
          f"decisions that differ: {len(differ)}; max relative difference: "
          + ", ".join(f"{f} {v:.1e}" for f, v in worst.items()), flush=True)
    for line in differ:
        print(f"- {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8, help="first N selected 7B blocks (default plan: 32 in all)")
    parser.add_argument("--plan", choices=sorted(PLANS), default="v3", help="read plan: v2, 128 attention blocks of "
                        "64 x 4096 (issue 14's figures, at 64 MiB); v3, the first rows of the 32 value matrices "
                        "(the crawler's default)")
    parser.add_argument("--budget-mib", type=float, default=CrawlOptions(endpoint="").budget / (1 << 20),
                        help="the crawl's byte budget per model the blocks come from (default: the crawler's); "
                             "plan v3 reads 64-row value blocks at 16 MiB, 256-row ones at 64 MiB")
    parser.add_argument("--models", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=2, help="alternating runs of each method")
    parser.add_argument("--nominees", type=int, default=16, help="zoo mode: others compared with each model")
    parser.add_argument("--zoo", type=Path, action="append", default=[], help="zoo folders instead of synthetic")
    parser.add_argument("--reference", choices=("svd", "gram64", "matmul", "units64"), default="svd",
                        help="the kernel gram is timed and compared against: svd, gram64 (float64 tails), "
                             "matmul (gram with torch's products for the Gram matrices, not syrk), or units64 "
                             "(gram with the relatedness units projected in float64, before session 9)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for zoo in args.zoo:
        run(*zoo_jobs(zoo, args.nominees, args.seed), args.repeat, args.reference)
    if not args.zoo:
        run(*synthetic_jobs(args), args.repeat, args.reference)


if __name__ == "__main__":
    main()
