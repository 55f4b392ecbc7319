"""GPU re-ranking benchmark: exact distances for (model, nominee) pairs of 7B-shaped selected layers, through
`indexer.incremental.exact.measure_many`, on the CPU and on CUDA.

    .venv/bin/python bench/gpu_exact.py [--pairs 10000] [--device cpu|cuda|both] [--models 320]
        [--cpu-pairs 500] [--layers 128] [--max-gib 8] [--seed 0] [--method gram|svd] [--cpu-method gram|svd]

Layers: what the crawler reads of a Llama-2-7B under the default 64 MiB budget (`sketches.plan.plan_reads`
on the emulator's Llama-2-7B layout): the first 64 rows of each of the 128 square attention matrices
(q/k/v/o of 32 blocks), 4096 columns; BF16 on the Hub, float32 once decoded: 128 blocks of (64, 4096),
128 MiB per model. `--layers N` keeps the first N blocks (quick runs on a small machine).

Models (fixed seed): trees of 40 in upload order; a root is N(0, 0.02); a child is a random earlier
member of its tree plus either a full-rank step (70 %: N(0, 0.02 x delta), delta log-uniform in
[0.01, 0.1]) or a merged LoRA (30 %: B @ A of rank 4, 8 or 16 on q and v; k and o are the parent's own
arrays). Noise is sliced at random offsets from one pool of 2**26 normals (256 MiB), so that generating
320 x 128 MiB of models costs copies, not 10**10 draws; slices at different offsets are uncorrelated.
Pairs: each model has two short lists of 16 nominees -- its 14 nearest relatives by tree hops plus 2
strangers (the k-NN's near misses), then the next 14 plus 2 (the index's second hop, `expand`) --
taken in that order until `--pairs`. 320 models give 10,240 pairs.

Timing: one `measure_many` call over all the jobs, after a one-job warm-up (CUDA context, cuSOLVER).
The models sit in host memory, as in the crawl, so GPU times include the host -> GPU copies. The CPU
times a strided subset of `--cpu-pairs` pairs and extrapolates its rate (labelled as such). GiB/s counts
both models' float32 blocks of every pair. "max |diff|" compares the GPU's results with the CPU's on
the pairs both computed.

`--method` picks the exact step's kernel on the GPU, `--cpu-method` on the CPU (default both "gram"; "svd"
is the previous kernel: `--cpu-method svd` checks the GPU's Gram kernel against it). bench/exact_cpu.py
compares the two kernels on the CPU alone.

Prints markdown tables (copy them to bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexer.hub_emulator.virtual import LAYOUTS
from indexer.incremental.exact import (
    METHODS,
    ModelView,
    PairMeasure,
    decisions,
    measure_many,
)
from sketches.plan import PlanSpec, plan_reads
from sketches.safetensors import TensorInfo

GIB = 1 << 30
TREE_SIZE = 40
LORA_SHARE = 0.3
LORA_RANKS = (4, 8, 16)
LIST_LEN = 16
STRANGERS = 2  # per short list
POOL = 1 << 26
STD = 0.02

Job = tuple[ModelView, list[ModelView]]


def selected_blocks(budget: int = 64 << 20, spec: PlanSpec | None = None) -> list[tuple[str, tuple[int, int]]]:
    """(tensor, (rows, cols)) that the crawl reads of a BF16 Llama-2-7B under `budget` (plan `spec`, default
    the crawler's: plan v3 reads 32 value blocks of 256 x 4096; plan v2 read 128 attention blocks of 64 x 4096)."""
    tensors, offset = {}, 0
    for name, shape in LAYOUTS["llama-2-7b"].tensors():
        nbytes = math.prod(shape) * 2
        tensors[name] = TensorInfo(name, "BF16", shape, offset, offset + nbytes)
        offset += nbytes
    plan = plan_reads(tensors, family="llama", budget=budget, spec=spec)
    return [(b.tensor, (b.rows[1] - b.rows[0], tensors[b.tensor].shape[1])) for b in plan.blocks]


@dataclass
class Zoo:
    views: list[ModelView]
    tree: list[int]
    parent: list[int | None]


def _slice(rng: np.random.Generator, pool: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    n = math.prod(shape)
    start = int(rng.integers(0, len(pool) - n))
    return pool[start:start + n].reshape(shape)


def _child(rng: np.random.Generator, pool: np.ndarray, parent: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if rng.random() < LORA_SHARE:
        rank = int(rng.choice(LORA_RANKS))
        out = dict(parent)  # k and o untouched: the very same arrays
        for name, w in parent.items():
            if "q_proj" in name or "v_proj" in name:
                b, a = STD * _slice(rng, pool, (w.shape[0], rank)), STD * _slice(rng, pool, (rank, w.shape[1]))
                out[name] = w + b @ a
        return out
    delta = float(10 ** rng.uniform(-2, -1))
    return {name: w + (STD * delta) * _slice(rng, pool, w.shape) for name, w in parent.items()}


def _view(i: int, arrays: dict[str, np.ndarray]) -> ModelView:
    norms = {n: float(np.linalg.norm(a)) for n, a in arrays.items()}
    direction = tuple(sorted(n for n in arrays if "o_proj" in n))
    return ModelView(f"synthetic/m{i:04d}", arrays, {}, norms, float(i), direction)


def make_zoo(models: int, blocks: Sequence[tuple[str, tuple[int, int]]], *, seed: int) -> Zoo:
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal(POOL, dtype=np.float32)
    trees = max(2, models // TREE_SIZE)  # at least two: strangers must exist
    weights: list[dict[str, np.ndarray]] = []
    tree, parent = [], []
    for i in range(models):  # upload order: the trees grow side by side
        t = i % trees
        members = [j for j in range(i) if tree[j] == t]
        p = int(rng.choice(members)) if members else None
        if p is None:
            weights.append({name: STD * _slice(rng, pool, shape) for name, shape in blocks})
        else:
            weights.append(_child(rng, pool, weights[p]))
        tree.append(t)
        parent.append(p)
    return Zoo([_view(i, w) for i, w in enumerate(weights)], tree, parent)


def short_lists(zoo: Zoo, *, seed: int) -> list[list[list[int]]]:
    """Per model, two lists of 16 nominees: nearest relatives by tree hops (random tie-break) + strangers."""
    rng = np.random.default_rng(seed + 1)
    graph = nx.Graph((i, p) for i, p in enumerate(zoo.parent) if p is not None)
    graph.add_nodes_from(range(len(zoo.views)))
    out = []
    for m in range(len(zoo.views)):
        hops = nx.single_source_shortest_path_length(graph, m)
        relatives = sorted((h, float(rng.random()), j) for j, h in hops.items() if j != m)
        near = [j for _, _, j in relatives]
        strangers = [int(j) for j in rng.permutation(len(zoo.views)) if zoo.tree[j] != zoo.tree[m]]
        lists = []
        for r in range(2):
            mine = near[r * (LIST_LEN - STRANGERS):(r + 1) * (LIST_LEN - STRANGERS)]
            fill = strangers[r * LIST_LEN:(r + 1) * LIST_LEN]
            lists.append(mine + fill[:LIST_LEN - len(mine)])
        out.append(lists)
    return out


def make_jobs(zoo: Zoo, lists: list[list[list[int]]], pairs: int) -> list[Job]:
    """First lists of every model, then second lists, cut at `pairs` pairs."""
    jobs, left = [], pairs
    for r in range(2):
        for m, mine in enumerate(lists):
            if left <= 0:
                return jobs
            chosen = mine[r][:left]
            jobs.append((zoo.views[m], [zoo.views[j] for j in chosen]))
            left -= len(chosen)
    if left > 0:
        raise SystemExit(f"--pairs {pairs} needs more models: {len(lists)} models give {pairs - left} pairs; "
                         f"raise --models to at least {math.ceil(pairs / (2 * LIST_LEN))}")
    return jobs


def subset(jobs: list[Job], pairs: int) -> tuple[list[int], list[Job]]:
    """A strided sample of jobs (spread over both rounds), cut at `pairs` pairs: (job indexes, jobs)."""
    total = sum(len(o) for _, o in jobs)
    stride = max(1, round(total / max(pairs, 1)))
    picked, out, left = [], [], pairs
    for i in range(0, len(jobs), stride):
        if left <= 0:
            break
        new, others = jobs[i]
        picked.append(i)
        out.append((new, others[:left]))
        left -= len(out[-1][1])
    return picked, out


def pair_bytes(jobs: Sequence[Job]) -> int:
    """Both models' float32 blocks of every pair (every block is shared within a job here)."""
    return sum(2 * sum(a.nbytes for a in new.arrays.values()) * len(others) for new, others in jobs)


def timed(jobs: list[Job], device: str, max_bytes: int, method: str) -> tuple[float, list[list[PairMeasure]]]:
    measure_many(jobs[:1], device=device, max_bytes=max_bytes, method=method)  # type: ignore[arg-type]  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    out = measure_many(jobs, device=device, max_bytes=max_bytes, method=method)  # type: ignore[arg-type]  # on the host
    return time.perf_counter() - started, out


def compare(gpu: list[list[PairMeasure]], cpu: list[list[PairMeasure]]) -> tuple[float, float, int]:
    """(max |diff| of the stored distance, of the relative L2, pairs whose decisions differ: `exact.decisions`)."""
    dist, rel, flips = 0.0, 0.0, 0
    for g_job, c_job in zip(gpu, cpu, strict=True):
        for g, c in zip(g_job, c_job, strict=False):  # the CPU's last job may be cut short
            dist = max(dist, abs(g.distance - c.distance))
            rel = max(rel, abs(g.relative - c.relative))
            flips += decisions(g) != decisions(c)
    return dist, rel, flips


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores, torch {torch.get_num_threads()} threads"
    except OSError:
        pass
    return f"{platform.processor() or 'CPU'}, {os.cpu_count()} cores"


def row(device: str, pairs: int, seconds: float, nbytes: int, diff: str) -> str:
    return f"| {device} | {pairs:,} | {seconds:.1f} | {pairs / seconds:.1f} | {nbytes / GIB / seconds:.1f} | {diff} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=10_000)
    parser.add_argument("--device", choices=["cpu", "cuda", "both"], default="both")
    parser.add_argument("--models", type=int, default=320)
    parser.add_argument("--cpu-pairs", type=int, default=500, help="pairs the CPU times (its rate is extrapolated)")
    parser.add_argument("--layers", type=int, default=None, help="keep the first N selected blocks (default: all)")
    parser.add_argument("--max-gib", type=float, default=8.0, help="measure_many's max_bytes, in GiB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--method", choices=METHODS, default="gram", help="the exact step's kernel on the GPU")
    parser.add_argument("--cpu-method", choices=METHODS, default="gram", help="the exact step's kernel on the CPU")
    args = parser.parse_args()
    if args.device != "cpu" and not torch.cuda.is_available():
        raise SystemExit("torch sees no CUDA GPU here; use --device cpu")

    blocks = selected_blocks()[: args.layers]
    t = time.perf_counter()
    zoo = make_zoo(args.models, blocks, seed=args.seed)
    jobs = make_jobs(zoo, short_lists(zoo, seed=args.seed), args.pairs)
    made = time.perf_counter() - t
    max_bytes = int(args.max_gib * GIB)
    rows_, shape = len(blocks), blocks[0][1]
    print(f"{args.models} models x {rows_} blocks of {shape} float32 ({rows_ * math.prod(shape) * 4 / (1 << 20):.0f} "
          f"MiB a model), {sum(len(o) for _, o in jobs):,} pairs in {len(jobs)} jobs; generated in {made:.1f} s; "
          f"max_bytes {args.max_gib:g} GiB; torch {torch.__version__}\n", flush=True)

    print("| device | pairs | seconds | pairs/s | GiB/s compared | max abs diff vs CPU |\n|---|---:|---:|---:|---:|---|",
          flush=True)  # row by row: a long run still leaves the rows it finished
    picked, sample = subset(jobs, args.cpu_pairs)
    cpu_out = run_cpu(jobs, sample, max_bytes, args.cpu_method) if args.device in ("cpu", "both") else None
    if args.device in ("cuda", "both"):
        run_gpu(jobs, picked, sample, cpu_out, max_bytes, args.method)


def run_cpu(jobs: list[Job], sample: list[Job], max_bytes: int, method: str) -> list[list[PairMeasure]]:
    seconds, out = timed(sample, "cpu", max_bytes, method)
    n, total = sum(len(o) for _, o in sample), sum(len(o) for _, o in jobs)
    print(row(f"CPU ({method}): {cpu_name()}", n, seconds, pair_bytes(sample), "(reference)"), flush=True)
    rate = n / seconds
    print(f"| CPU, **extrapolated** from the {n:,} pairs above | {total:,} | {total / rate:.0f} (extrapolated) "
          f"| {rate:.1f} | {pair_bytes(jobs) / GIB / (total / rate):.1f} | - |", flush=True)
    return out


def run_gpu(jobs: list[Job], picked: list[int], sample: list[Job], cpu_out: list[list[PairMeasure]] | None,
            max_bytes: int, method: str) -> None:
    seconds, out = timed(jobs, "cuda", max_bytes, method)
    diff = "-"
    if cpu_out is not None:
        dist, rel, flips = compare([out[i] for i in picked], cpu_out)
        diff = (f"distance {dist:.2e}, relative {rel:.2e}, decisions that differ {flips} "
                f"(on {sum(len(o) for _, o in sample):,} pairs)")
    print(row(f"GPU ({method}): {torch.cuda.get_device_name(0)}", sum(len(o) for _, o in jobs), seconds, pair_bytes(jobs), diff))
    mix = [p for job in out for p in job]
    print(f"\nGPU peak memory {torch.cuda.max_memory_allocated() / GIB:.1f} GiB; pairs low-rank "
          f"{sum(p.low_rank for p in mix) / len(mix):.0%}, related {sum(p.related for p in mix) / len(mix):.0%}", flush=True)

if __name__ == "__main__":
    main()
