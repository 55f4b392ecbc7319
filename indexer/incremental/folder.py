"""Index a local folder of model repos into the lineage index, one model at a time, in a chosen order.

Used by the benchmark (bench/incremental.py) and the demo. Folder layout as `indexer.lineage.recover`
(any directory with safetensors, a top-level GGUF or an adapter_config.json is a repo, `hub.json` gives
upload times). Order `"upload"` is the Hub's (createdAt, then id); an integer is the seed of a random
permutation (arrival orders a crawl could see when uploads race, or a backfill that lists in another order).

Every repo is read by the crawl's own reader (`indexer.crawl.read_model` over `indexer.sources.LocalRepo`,
every planned tensor whole), as `index add` and the batch recovery read it: one parser per format, so
adapters, GGUF files and packed quantized safetensors (GPTQ, AWQ, bitsandbytes, FP8) arrive as the crawl
hands them to the index -- an adapter as a satellite (`LineageIndex.add_adapter`), a quantized copy
dequantized with its scheme (`Arrival.quant`: a leaf unless nothing else fits). A repo the reader refuses
is a failure with the crawl's one-line reason (`indexer.crawl.classify`); the rest of the folder goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from errors import AdapterError, BadInputError
from indexer.crawl import classify, local_bases, read_folder
from indexer.incremental.index import (
    DEFAULT_EXPAND,
    DEFAULT_K,
    Arrival,
    ArrivalResult,
    LineageIndex,
)
from indexer.incremental.satellites import AdapterArrival
from indexer.lineage.recover import WHOLE_MODEL, discover_repos, upload_times
from indexer.sources import declared_bases
from store.schema import EdgeRecord
from store.tables import read_records

logger = logging.getLogger(__name__)

Order = str | int  # "upload", "newest" (the crawl's listing: newest first) or a permutation seed
Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class IngestReport:
    arrivals: tuple[ArrivalResult, ...]  # the forest's models (full precision and quantized), in arrival order
    parents: dict[str, str]  # every placed repo of the folder, child -> its edges row's parent ("" root)
    seconds: float
    adapters: dict[str, int] = field(default_factory=dict)  # adapter -> adapters compared (its chain step)
    edges: dict[str, EdgeRecord] = field(default_factory=dict)  # every placed repo's edges row
    failed: dict[str, str] = field(default_factory=dict)  # repo -> the crawl's one-line reason


def arrival_order(repos: Sequence[tuple[str, Path]], times: dict[str, float], order: Order) -> list[tuple[str, Path]]:
    ranked = sorted(repos, key=lambda r: (times.get(r[0], float("inf")), r[0]))
    if order == "upload":
        return ranked
    if order == "newest":  # a first crawl's order: copies and fine-tunes before the bases they come from
        return sorted(repos, key=lambda r: (-times.get(r[0], float("-inf")), r[0]))
    perm = np.random.default_rng(int(order)).permutation(len(ranked))
    return [ranked[i] for i in perm]


def read_local(repo_id: str, path: Path, created_at: datetime | None = None) -> Arrival | AdapterArrival:
    """One local repo as the crawl hands it to the index: an adapter, else a model (a quantized copy
    dequantized, with its scheme and predicted error). Raises what `read_model` raises."""
    read, entry = read_folder(path, budget=WHOLE_MODEL)
    if read.adapter is not None:
        return AdapterArrival(repo_id, entry.revision, created_at, read.adapter, read.arrays)
    return Arrival(repo_id, entry.revision, read.family, read.arrays, created_at, read.quant, declared_bases(entry),
                   read.copy_rank)


def read_repo(path: Path) -> tuple[str, str, dict[str, np.ndarray]]:
    """(family key, local revision, planned tensors as float32) of one local model repo (`read_local`)."""
    arrival = read_local(path.name, path)
    if isinstance(arrival, AdapterArrival):
        raise BadInputError(str(path), "an adapter repo has no tensors of its own to compare; pass a model repo")
    return arrival.family, arrival.revision, dict(arrival.arrays)




def ingest_folder(home: Path, folder: Path, *, order: Order = "upload", k: int = DEFAULT_K, device: str = "auto",
                  penalty: float | None = None, flush_every: int = 16, expand: int = DEFAULT_EXPAND) -> IngestReport:
    """Index every repo under `folder` into the store at `home`, one arrival at a time, in `order`."""
    folder = Path(folder)
    times = upload_times(folder)
    found = discover_repos(folder)
    repos = arrival_order(found, times, order)
    started = time.perf_counter()
    extra = {} if penalty is None else {"penalty": penalty}
    arrivals: list[ArrivalResult] = []
    adapters: dict[str, int] = {}
    failed: dict[str, str] = {}
    with LineageIndex.open(Path(home), k=k, device=device, flush_every=flush_every, expand=expand,  # type: ignore[arg-type]
                           bases=local_bases(dict(found)), **extra) as index:
        for repo_id, path in repos:
            created = datetime.fromtimestamp(times[repo_id], UTC) if repo_id in times else None
            try:
                arrival = read_local(repo_id, path, created)
            except Exception as exc:  # noqa: BLE001 -- the crawl's rule: one bad repo is a recorded failure
                failed[repo_id] = classify(exc)[1]
                logger.warning("%s: %s", repo_id, failed[repo_id])
                continue
            if isinstance(arrival, AdapterArrival):
                try:
                    _, details = index.add_adapter(arrival)
                except AdapterError as exc:  # updates it cannot use: recorded, as the crawl does
                    failed[repo_id] = classify(exc)[1]
                    logger.warning("%s: %s", repo_id, failed[repo_id])
                    continue
                adapters[repo_id] = int(details.get("chain_compared", 0))  # type: ignore[call-overload]
            else:
                arrivals.append(index.add_many([arrival])[0])
    ids = {r for r, _ in found}
    edges = {e.repo_id: e for e in read_records(Path(home), "edges") if e.repo_id in ids}  # type: ignore[union-attr]
    return IngestReport(tuple(arrivals), {r: e.parent for r, e in sorted(edges.items())}, time.perf_counter() - started,
                        adapters, dict(sorted(edges.items())), dict(sorted(failed.items())))
