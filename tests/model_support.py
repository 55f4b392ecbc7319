"""Helpers the tests share to make relatives of a real model."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any


def perturb_matrices(model: Any, step: float, seed: int | None = None) -> Any:
    """A fine-tune stand-in: every matrix of `model` moved in place by `step` x its std, Gaussian, from a
    generator seeded with `seed` (None: torch's global one), in the matrix's own dtype. Returns the model."""
    import torch

    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.add_((step * p.float().std() * torch.randn(p.shape, generator=gen)).to(p.dtype))
    return model


def dated_legacy(zoo: Path, out: Path, fraction: float) -> Path:
    """A copy of `zoo` whose earliest `fraction` of uploads read the Hub's legacy createdAt."""
    shutil.copytree(zoo, out)
    doc = json.loads((out / "hub.json").read_text())
    order = sorted(doc["repos"], key=lambda r: (doc["repos"][r]["createdAt"], r))
    for rid in order[:math.ceil(fraction * len(order))]:
        doc["repos"][rid]["createdAt"] = "2022-03-02T23:29:04.000Z"
    (out / "hub.json").write_text(json.dumps(doc))
    return out



def same_in_incremental_and_crawl(hub_root: Path, work: Path, truth: dict[str, tuple[str, str]], *,
                                  batch: bool = False) -> None:
    """The incremental index in both arrival orders and a crawl over HTTP of `hub_root` (and with `batch`, first
    `index recover`) each give every repo the (parent, relation) `truth` says, with nothing failed."""
    from indexer.crawl import CrawlOptions, crawl
    from indexer.hub_emulator import HubEmulator
    from indexer.incremental.folder import ingest_folder
    from indexer.lineage.methods import Options
    from indexer.lineage.recover import recover
    from indexer.retry import RetryPolicy
    from store.tables import read_records

    if batch:
        forest = recover(hub_root, Options(device="cpu"))
        assert not forest.failures() and {r.repo_id: (r.parent, r.relation) for r in forest.rows} == truth
    for order in ("upload", "newest"):
        report = ingest_folder(work / order, hub_root, device="cpu", order=order)  # type: ignore[arg-type]
        assert not report.failed and {r: (e.parent, e.relation) for r, e in report.edges.items()} == truth, order
    with HubEmulator(hub_root) as server:
        options = CrawlOptions(endpoint=server.url, progress=False, policy=RetryPolicy(sleep=lambda s: None), device="cpu")
        crawled = crawl(work / "crawl", options).as_dict()
    assert crawled["indexed"] == len(truth) and not crawled["failed"], crawled
    edges = {e.repo_id: (e.parent, e.relation) for e in read_records(work / "crawl", "edges")}  # type: ignore[union-attr]
    assert edges == truth
