"""A synthetic Hub of N models through sketch -> FAISS nominees -> exact pairs -> incremental forest.

    .venv/bin/python bench/scale.py --models 1000000 [--k 16] [--dim 64] [--layers 4] [--width 64]
        [--batch 2048] [--seed 0] [--store DIR [--queries 50]]

Synthetic Hub: families with power-law sizes (Zipf, exponent 1.5, capped at N/20); a family is a set of
trees; a tree grows by random-walk fine-tuning: a child = its parent's weights + a Gaussian step whose
size is log-uniform over two decades (learning rates differ), depth at most 6, the parent drawn among the
family's 200 most recent models; 8 % of arrivals start a new tree. A child's heavy tails shrink a little
(kurtosis falls under specialisation) and it is uploaded after its parent. Models arrive in upload order.

Each model's "selected weights" are `layers` tensors of `width` float32 values. The path per batch of
arrivals (a night's crawl delivers them in upload order; `--batch` of them are nominated at once):
    1. sketch: `sketches.sketch`'s count sketch (one +-1 per weight, dim `--dim`), as one matrix product;
    2. nominees: `store.vectors.VectorIndex.nearest_in_order` per family -- the k nearest among the
       family's FAISS index and the batch's earlier arrivals, exactly the sequential nominees;
    3. exact pairs, vectorised over the batch, with the pair-local rule of indexer.incremental.exact:
       related when the median per-layer ||a - b|| / sqrt(||a||^2 + ||b||^2) < MIN_RELATIVE; weight =
       TIER_GAP + log distance + the upload-time penalty (a child uploaded before its parent pays
       TIME_WEIGHT units). The distance is pair rule 1's full-rank tier, sum over layers of ||a - b|| /
       RMS(||a||, ||b||): the synthetic "layers" are vectors of isotropic steps, which have no spectral
       tail for rule 2 to keep (the cost of a real tail is measured by bench/gpu_exact.py);
    4. `indexer.incremental.forest.IncrementalForest.add`, one arrival at a time, in upload order;
    5. the batch's vectors are upserted into their families' indexes.
With `--store DIR` the forest is then written as a real store (models + edges tables through
`store.tables.Store`) and `index query` (whole process, p50/p95 over `--queries` random models) and
`index export` are timed on it.

Prints a markdown table: models, models/s of the path above, peak RSS, accuracy vs the simulated truth,
recall@k of the true parent among the nominees, exact computations per arrival, arrival paths.
"""

from __future__ import annotations

import argparse
import logging
import math
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexer.incremental.exact import DEFAULT_PENALTY, FLOOR, TIER_GAP, TIME_WEIGHT  # noqa: E402

# The simulation's "layers" are vectors: no rows to permute, so it keeps pair rule 2's relatedness
# (median per-layer relative L2 below 0.5) where the real rule uses the permutation test.
MIN_RELATIVE = 0.5
from indexer.incremental.forest import Candidate, IncrementalForest  # noqa: E402
from sketches.sketch import _projection  # noqa: E402
from store.vectors import VectorIndex  # noqa: E402

logger = logging.getLogger("bench.scale")
ROOT = Path(__file__).resolve().parents[1]
WINDOW = 200  # a new model's parent is one of its family's most recent models
NEW_TREE = 0.08
MAX_DEPTH = 6


def simulate(n: int, layers: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(weights (n, layers, width) f32, parent index (-1 root), family id), in upload order."""
    rng = np.random.default_rng(seed)
    sizes: list[int] = []
    while sum(sizes) < n:
        sizes.append(int(min(rng.zipf(1.5), max(10, n // 20))))
    sizes[-1] -= sum(sizes) - n
    weights = np.empty((n, layers, width), dtype=np.float32)
    parent = np.full(n, -1, dtype=np.int64)
    family = np.repeat(np.arange(len(sizes)), sizes)
    depth = np.zeros(n, dtype=np.int64)
    at = 0
    for size in sizes:
        start = at
        for i in range(at, at + size):
            lo = max(start, i - WINDOW)
            open_ = np.flatnonzero(depth[lo:i] < MAX_DEPTH) + lo
            if i == start or rng.random() < NEW_TREE or not len(open_):
                weights[i] = rng.standard_t(5, size=(layers, width))
            else:
                p = int(open_[int(rng.integers(len(open_)))])
                step = 10 ** rng.uniform(-3, -1)
                weights[i] = weights[p] + step * rng.normal(size=(layers, width)).astype(np.float32)
                parent[i], depth[i] = p, depth[p] + 1
        at += size
    return weights, parent, family


def interleave(family: np.ndarray, seed: int) -> np.ndarray:
    """Upload order: families interleaved at random, each family's models in their own order."""
    rng = np.random.default_rng(seed + 1)
    slots = rng.permutation(len(family))
    order = np.empty(len(family), dtype=np.int64)
    for fam in np.unique(family):
        members = np.flatnonzero(family == fam)
        order[np.sort(slots[members])] = members
    return order


class LineagePath:
    """The benchmark's lineage path state: one FAISS index and one forest per family."""

    def __init__(self, names: list[str], weights: np.ndarray, family: np.ndarray, *, k: int, dim: int,
                 seed: int) -> None:
        self.names, self.weights, self.family, self.k = names, weights, family, k
        n, layers, width = weights.shape
        bucket, sign = _projection("synthetic", "w", layers * width, dim, seed)
        self.proj = np.zeros((layers * width, dim), dtype=np.float32)
        self.proj[np.arange(layers * width), bucket] = sign  # the count sketch as a matrix: one +-1 per row
        self.layer_norms = np.concatenate([  # (n, layers); in chunks: a float64 copy of 1M models is 2 GiB
            np.linalg.norm(weights[at: at + 65536].astype(np.float64), axis=2) for at in range(0, n, 65536)])
        self.uploaded = np.empty(n, dtype=np.float64)  # upload time = arrival position
        self.indexes: dict[int, VectorIndex] = {}
        self.forests: dict[int, IncrementalForest] = {}
        self.nominees: dict[int, list[int]] = {}
        self.exact = 0

    def run_batch(self, rows: np.ndarray, position: int) -> None:
        self.uploaded[rows] = position + np.arange(len(rows))
        vectors = self.weights[rows].reshape(len(rows), -1) @ self.proj  # 1.
        chosen: dict[int, list[int]] = {}
        for fam in np.unique(self.family[rows]):  # 2.
            mine = np.flatnonzero(self.family[rows] == fam)
            index = self.indexes.setdefault(int(fam), VectorIndex(f"f{fam}", vectors.shape[1]))
            names = [self.names[rows[j]] for j in mine]
            found = index.nearest_in_order(names, vectors[mine], self.k)
            for j, near in zip(mine, found, strict=True):
                chosen[int(rows[j])] = [int(r.rsplit("/m", 1)[1]) for r, _ in near]
        edges = self._exact(rows, chosen)  # 3.
        for i in rows:  # 4.
            forest = self.forests.setdefault(int(self.family[i]), IncrementalForest())
            forest.add(self.names[i], edges.get(int(i), []))
        for fam in np.unique(self.family[rows]):  # 5.
            mine = np.flatnonzero(self.family[rows] == fam)
            self.indexes[int(fam)].upsert([(self.names[rows[j]], "local:0", vectors[j]) for j in mine])
        self.nominees.update(chosen)

    def _exact(self, rows: np.ndarray, chosen: dict[int, list[int]]) -> dict[int, list[Candidate]]:
        new = np.array([i for i in rows.tolist() for _ in chosen[i]], dtype=np.int64)
        old = np.array([j for i in rows.tolist() for j in chosen[i]], dtype=np.int64)
        self.exact += len(new)
        if not len(new):
            return {}
        diff = self.weights[new].astype(np.float64) - self.weights[old]
        dist = np.sqrt((diff * diff).sum(axis=2))  # (pairs, layers)
        rms = np.sqrt((self.layer_norms[new] ** 2 + self.layer_norms[old] ** 2) / 2.0)
        related = np.median(dist / (math.sqrt(2.0) * rms), axis=1) < MIN_RELATIVE
        base = TIER_GAP + np.log(np.maximum((dist / rms).sum(axis=1), FLOOR))
        late = DEFAULT_PENALTY * TIME_WEIGHT  # the edge's child was uploaded before its parent
        into_new = base + np.where(self.uploaded[new] < self.uploaded[old], late, 0.0)
        out_of_new = base + np.where(self.uploaded[old] < self.uploaded[new], late, 0.0)
        out: dict[int, list[Candidate]] = {}
        for p in np.flatnonzero(related).tolist():
            i, j = self.names[new[p]], self.names[old[p]]
            out.setdefault(int(new[p]), []).extend(
                (Candidate(j, i, float(into_new[p])), Candidate(i, j, float(out_of_new[p]))))
        return out


def run(n: int, *, k: int, dim: int, layers: int, width: int, batch: int, seed: int) -> tuple[dict[str, float], LineagePath, np.ndarray]:
    weights, parent, family = simulate(n, layers, width, seed)
    order = interleave(family, seed)
    names = [f"org{family[i] % 997:03d}/m{i:08d}" for i in range(n)]
    path = LineagePath(names, weights, family, k=k, dim=dim, seed=seed)
    started = time.perf_counter()
    for at in range(0, n, batch):
        path.run_batch(order[at: at + batch], at)
        if at and at % (20 * batch) == 0:
            rate = at / (time.perf_counter() - started)
            logger.info("%d models, %.0f models/s, peak RSS %.2f GiB", at, rate, _peak_gib())
    seconds = time.perf_counter() - started
    has_parent = np.flatnonzero(parent >= 0)
    correct = sum(path.forests[int(family[i])].parent(names[i]) == names[parent[i]] for i in has_parent)
    recall = sum(int(parent[i]) in path.nominees[int(i)] for i in has_parent)
    paths: Counter[str] = Counter()
    for f in path.forests.values():
        paths.update(f.counts)
    result = {"models": n, "families": len(path.forests), "seconds": seconds, "per_s": n / seconds,
              "peak_gib": _peak_gib(), "accuracy": correct / max(len(has_parent), 1),
              "recall": recall / max(len(has_parent), 1), "exact_mean": path.exact / n,
              "new": paths["new"], "attach": paths["attach"], "recompute": paths["recompute"]}
    return result, path, parent


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


# --- the store, and the read side on it ------------------------------------------------------------


def write_store(home: Path, path: LineagePath, parent: np.ndarray, chunk: int = 200_000) -> float:
    """models + edges tables of the whole forest through `Store.append`; returns seconds."""
    from store.schema import EdgeRecord, ModelRecord
    from store.tables import Store

    started = time.perf_counter()
    epoch = datetime(2024, 1, 1, tzinfo=UTC)
    now = datetime.now(UTC)
    rows_m, rows_e = [], []
    with Store.open(home) as store:
        for i in np.argsort(path.uploaded, kind="stable").tolist():
            name, fam = path.names[i], int(path.family[i])
            forest = path.forests[fam]
            up = forest.parent(name)
            declared = path.names[parent[i]] if parent[i] >= 0 else ""
            created = epoch + timedelta(seconds=float(path.uploaded[i]))
            rows_m.append(ModelRecord(name, "local:0", f"f{fam}", "indexed", now, created_at=created,
                                      declared_base_model=declared, declared_relation="finetune" if declared else "",
                                      library="transformers", source="synthetic"))
            cid = forest.cluster_id(name)
            rows_e.append(EdgeRecord(name, "local:0", f"f{fam}", forest.cluster_key(cid), up, forest.root(cid),
                                     _depth(forest, name), forest.weight(up, name) if up else 0.0, 0.0, 0.0, now))
            if len(rows_m) == chunk:
                store.append("models", rows_m)
                store.append("edges", rows_e)
                rows_m, rows_e = [], []
        if rows_m:
            store.append("models", rows_m)
            store.append("edges", rows_e)
    return time.perf_counter() - started


def _depth(forest: IncrementalForest, node: str) -> int:
    depth, up = 0, forest.parent(node)
    while up:
        depth, up = depth + 1, forest.parent(up)
    return depth


def time_queries(home: Path, names: list[str], count: int, seed: int) -> tuple[float, float, float]:
    """(p50, p95) seconds of the whole `index query` process, and seconds of `index export`."""
    rng = np.random.default_rng(seed)
    exe = str(ROOT / ".venv" / "bin" / "index")
    times = []
    for i in rng.choice(len(names), size=count, replace=False).tolist():
        started = time.perf_counter()
        subprocess.run([exe, "query", names[i], "--home", str(home)], check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    started = time.perf_counter()
    subprocess.run([exe, "export", str(home / "export.parquet"), "--home", str(home)], check=True, capture_output=True)
    export = time.perf_counter() - started
    return statistics.median(times), float(np.percentile(times, 95)), export


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=100_000)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--store", type=Path, help="write the forest as a store here and time query/export")
    parser.add_argument("--queries", type=int, default=50)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    r, path, parent = run(args.models, k=args.k, dim=args.dim, layers=args.layers, width=args.width,
                          batch=args.batch, seed=args.seed)
    sys.stdout.write(
        "| models | families | models/s | peak RSS GiB | accuracy | recall@k | exact/arrival | new/attach/recompute |\n"
        "|---|---|---|---|---|---|---|---|\n"
        f"| {r['models']:,} | {r['families']:,} | {r['per_s']:,.0f} | {r['peak_gib']:.2f} | {r['accuracy']:.3f} | "
        f"{r['recall']:.3f} | {r['exact_mean']:.1f} | {r['new']}/{r['attach']}/{r['recompute']} |\n")
    sys.stdout.flush()
    if args.store is not None:
        wrote = write_store(args.store, path, parent)
        names = path.names
        del path
        p50, p95, export = time_queries(args.store, names, args.queries, args.seed)
        size = sum(f.stat().st_size for f in args.store.rglob("*.parquet")) / 2**20
        sys.stdout.write(
            "\n| store | write s | Parquet MiB | query p50 ms | query p95 ms | export s |\n|---|---|---|---|---|---|\n"
            f"| {args.store} | {wrote:.0f} | {size:.0f} | {p50 * 1e3:.0f} | {p95 * 1e3:.0f} | {export:.1f} |\n")


if __name__ == "__main__":
    main()
