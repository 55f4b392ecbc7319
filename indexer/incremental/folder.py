"""Index a local folder of model repos into the lineage index, one model at a time, in a chosen order.

Used by the benchmark (bench/incremental.py) and the demo. Folder layout as `indexer.lineage.recover`
(any directory with safetensors is a repo, `hub.json` gives upload times). Order `"upload"` is the
Hub's (createdAt, then id); an integer is the seed of a random permutation (arrival orders a crawl could
see when uploads race, or a backfill that lists in another order).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from indexer.incremental.index import DEFAULT_EXPAND, DEFAULT_K, ArrivalResult, LineageIndex
from indexer.lineage.recover import discover_repos, upload_times
from sketches.layers import canonical_tensors, family_key
from sketches.safetensors import open_local_repo

logger = logging.getLogger(__name__)

Order = str | int  # "upload" or a permutation seed


@dataclass(frozen=True)
class IngestReport:
    arrivals: tuple[ArrivalResult, ...]  # in arrival order
    parents: dict[str, str]  # every family's forest, child -> parent ("" root)
    seconds: float


def arrival_order(repos: Sequence[tuple[str, Path]], times: dict[str, float], order: Order) -> list[tuple[str, Path]]:
    ranked = sorted(repos, key=lambda r: (times.get(r[0], float("inf")), r[0]))
    if order == "upload":
        return ranked
    perm = np.random.default_rng(int(order)).permutation(len(ranked))
    return [ranked[i] for i in perm]


def read_repo(path: Path) -> tuple[str, str, dict[str, np.ndarray]]:
    """(family key, local revision, 2-D and 4-D tensors as float32) of one local repo."""
    with open_local_repo(path) as weights:
        tensors = weights.tensors()
        stored = canonical_tensors(tensors)  # normalised names, learned float tensors only
        shapes = {name: tensors[raw].shape for name, raw in stored.items()}
        arrays = {n: np.asarray(weights.read(stored[n]), dtype=np.float32) for n in sorted(shapes) if len(shapes[n]) in (2, 4)}
    digest = hashlib.blake2b(digest_size=16)
    for f in sorted(path.glob("*.safetensors")):
        digest.update(f.read_bytes())
    return family_key(shapes), f"local:{digest.hexdigest()}", arrays


def ingest_folder(home: Path, folder: Path, *, order: Order = "upload", k: int = DEFAULT_K, device: str = "auto",
                  penalty: float | None = None, flush_every: int = 16, expand: int = DEFAULT_EXPAND) -> IngestReport:
    """Index every repo under `folder` into the store at `home`, one arrival at a time, in `order`."""
    folder = Path(folder)
    times = upload_times(folder)
    repos = arrival_order(discover_repos(folder), times, order)
    started = time.perf_counter()
    extra = {} if penalty is None else {"penalty": penalty}
    arrivals = []
    with LineageIndex.open(Path(home), k=k, device=device, flush_every=flush_every, expand=expand, **extra) as index:  # type: ignore[arg-type]
        for repo_id, path in repos:
            family, revision, arrays = read_repo(path)
            created = datetime.fromtimestamp(times[repo_id], UTC) if repo_id in times else None
            arrivals.append(index.add(repo_id, revision, family, arrays, created))
        parents: dict[str, str] = {}
        for family in index.families():
            parents.update(index.parents(family))
    return IngestReport(tuple(arrivals), dict(sorted(parents.items())), time.perf_counter() - started)
