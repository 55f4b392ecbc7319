"""A synthetic Hub of N models through sketch -> FAISS nominees -> exact pairs -> incremental forest.

    .venv/bin/python bench/scale.py --models 100000 [--k 16] [--dim 64] [--width 256] [--seed 0]

Synthetic Hub: families with power-law sizes (Zipf, exponent 1.5, capped); a family is a set of trees;
a tree grows by random-walk fine-tuning: a child = its parent's weights + a Gaussian step whose size is
log-uniform over two decades (learning rates differ), depth at most 6; a child's heavy tails shrink a
little (kurtosis falls under specialisation) and it is uploaded after its parent. Models arrive in upload
order. Each model's "selected weights" are `width` float32 values; its sketch is `sketches.sketch`'s
count sketch (dim `--dim`); nominees come from the family's `store.vectors.VectorIndex` (FAISS flat);
the exact step is the relative L2 distance + direction penalty of indexer.incremental.exact (log
weights), and the forest update is indexer.incremental.forest. No Parquet here: persistence is
measured by the store's own benchmarks; this is the lineage path's throughput and memory.

Prints a markdown table: models, models/s, peak RSS, accuracy vs the simulated truth, recall@k,
exact computations per arrival, arrival paths.
"""

from __future__ import annotations

import argparse
import logging
import math
import resource
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexer.incremental.exact import DEFAULT_PENALTY, FLOOR, MIN_RELATIVE, penalty_count  # noqa: E402
from indexer.incremental.forest import Candidate, IncrementalForest  # noqa: E402
from sketches.sketch import _projection  # noqa: E402
from store.vectors import VectorIndex  # noqa: E402

logger = logging.getLogger("bench.scale")


def simulate(n: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(weights (n, width) f32, parent index (-1 root), family id, kurtosis proxy), in upload order."""
    rng = np.random.default_rng(seed)
    sizes: list[int] = []
    while sum(sizes) < n:
        sizes.append(int(min(rng.zipf(1.5), max(10, n // 20))))
    sizes[-1] -= sum(sizes) - n
    weights = np.empty((n, width), dtype=np.float32)
    parent = np.full(n, -1, dtype=np.int64)
    family = np.empty(n, dtype=np.int64)
    kurt = np.empty(n, dtype=np.float64)
    depth = np.zeros(n, dtype=np.int64)
    at = 0
    for fam, size in enumerate(sizes):
        start = at
        for i in range(at, at + size):
            family[i] = fam
            open_ = [j for j in range(max(start, i - 200), i) if depth[j] < 6]  # recent, not too deep
            if i == start or rng.random() < 0.08 or not open_:
                weights[i] = rng.standard_t(5, size=width)
                kurt[i] = 6.0 + rng.normal(0, 0.2)
            else:
                p = int(open_[int(rng.integers(len(open_)))])
                step = 10 ** rng.uniform(-3, -1)
                weights[i] = weights[p] + step * rng.normal(size=width).astype(np.float32)
                parent[i], depth[i] = p, depth[p] + 1
                kurt[i] = kurt[p] - abs(rng.normal(0.3, 0.1))
        at += size
    return weights, parent, family, kurt


def run(n: int, *, k: int, dim: int, width: int, seed: int, penalty: float = DEFAULT_PENALTY) -> dict[str, float]:
    weights, parent, family, kurt = simulate(n, width, seed)
    bucket, sign = _projection("synthetic", "w", width, dim, seed)
    proj = np.zeros((width, dim), dtype=np.float32)
    proj[np.arange(width), bucket] = sign  # the count sketch as a sparse matrix: one +-1 per row
    norms = np.linalg.norm(weights.astype(np.float64), axis=1)
    indexes: dict[int, VectorIndex] = {}
    forests: dict[int, IncrementalForest] = {}
    names = [f"m{i:08d}" for i in range(n)]
    ids: dict[int, list[int]] = {}
    exact, recall_hit, recall_n = 0, 0, 0
    started = time.perf_counter()
    for i in range(n):
        fam = int(family[i])
        vec = weights[i] @ proj  # 1. sketch
        index = indexes.setdefault(fam, VectorIndex(f"f{fam}", dim))
        forest = forests.setdefault(fam, IncrementalForest())
        nominees = [int(r[1:]) for r, _ in index.nearest(vec, k)] if len(index) else []  # 2.
        if parent[i] >= 0:
            recall_n += 1
            recall_hit += int(parent[i] in nominees)
        exact += len(nominees)
        edges = _edges(i, nominees, weights, norms, kurt, names, penalty)  # 3.
        forest.add(names[i], edges)  # 4.
        index.upsert([(names[i], "local:0", vec)])
        ids.setdefault(fam, []).append(i)
    seconds = time.perf_counter() - started
    correct = sum(forests[int(family[i])].parent(names[i]) == names[parent[i]] for i in range(n) if parent[i] >= 0)
    edges_true = int((parent >= 0).sum())
    paths: Counter[str] = Counter()
    for f in forests.values():
        paths.update(f.counts)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {"models": n, "families": len(forests), "seconds": seconds, "per_s": n / seconds, "peak_gib": peak,
            "accuracy": correct / max(edges_true, 1), "recall": recall_hit / max(recall_n, 1),
            "exact_mean": exact / n, "new": paths["new"], "attach": paths["attach"], "recompute": paths["recompute"]}


def _edges(i: int, nominees: list[int], weights: np.ndarray, norms: np.ndarray, kurt: np.ndarray,
           names: list[str], penalty: float) -> list[Candidate]:
    if not nominees:
        return []
    idx = np.array(nominees)
    diff = weights[idx].astype(np.float64) - weights[i]
    rel = np.sqrt((diff * diff).sum(axis=1)) / np.sqrt((norms[idx] ** 2 + norms[i] ** 2) / 2)
    out = []
    for j, r in zip(nominees, rel.tolist(), strict=True):
        if r >= MIN_RELATIVE:
            continue
        base = math.log(max(r, FLOOR))
        t_in = penalty_count(kurt[j], kurt[i], float(j), float(i))  # j -> i; index = upload time
        t_out = penalty_count(kurt[i], kurt[j], float(i), float(j))
        out += [Candidate(names[j], names[i], base + penalty * t_in), Candidate(names[i], names[j], base + penalty * t_out)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=100_000)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    r = run(args.models, k=args.k, dim=args.dim, width=args.width, seed=args.seed)
    sys.stdout.write(
        "| models | families | models/s | peak RSS GiB | accuracy | recall@k | exact/arrival | new/attach/recompute |\n"
        "|---|---|---|---|---|---|---|---|\n"
        f"| {r['models']:,} | {r['families']:,} | {r['per_s']:,.0f} | {r['peak_gib']:.2f} | {r['accuracy']:.3f} | "
        f"{r['recall']:.3f} | {r['exact_mean']:.1f} | {r['new']}/{r['attach']}/{r['recompute']} |\n")


if __name__ == "__main__":
    main()
