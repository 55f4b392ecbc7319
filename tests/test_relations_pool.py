"""indexer.relations.pool: one merge pool rule for batch and the incremental index. A TIES merge whose base
is not among its nearest relatives, next to a byte-identical re-upload, gets the same row from the
incremental index (real store, real FAISS) in every arrival order as from batch's `find_merges`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from indexer.incremental.index import LineageIndex
from indexer.relations.batch import find_merges
from indexer.relations.pool import PairStats, merge_pool, pair_stats
from indexer.relations.rules import MERGE_CANDIDATES
from store.tables import read_records

T0 = datetime(2024, 1, 1, tzinfo=UTC)
FAMILY = "vit-pool"


def family(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """base; two fine-tunes, a re-upload of one, three children of them; a TIES merge of the two (upload
    order). The TIES merge's five nearest are the fine-tunes, the re-upload and children: its base, what
    tells a masked merge, is further."""
    rng = np.random.default_rng(seed)
    base = {f"enc.{b}.attention.output.dense.weight": rng.standard_t(3, size=(32, 32)).astype(np.float32) for b in range(2)}
    base["enc.0.mlp.weight"] = rng.standard_t(3, size=(64, 32)).astype(np.float32)

    def tune(src: dict[str, np.ndarray], step: float) -> dict[str, np.ndarray]:
        return {n: (a + step * rng.standard_normal(a.shape)).astype(np.float32) for n, a in src.items()}

    ft1, ft2 = tune(base, 0.3), tune(base, 0.3)
    ties = {}  # mergekit's TIES: trim each task vector to its larger half, elect signs, disjoint mean
    for n, b in base.items():
        taus = np.stack([ft1[n] - b, ft2[n] - b])
        kept = taus * (np.abs(taus) >= np.quantile(np.abs(taus), 0.5, axis=(1, 2), keepdims=True))
        agree = (np.sign(kept) == np.sign(kept.sum(0))) & (kept != 0)
        ties[n] = (b + (kept * agree).sum(0) / np.maximum(agree.sum(0), 1)).astype(np.float32)
    return {"org/base": base, "org/ft1": ft1, "org/ft2": ft2, "org/ft1-copy": {n: a.copy() for n, a in ft1.items()},
            "org/ft1-a": tune(ft1, 0.05), "org/ft1-b": tune(ft1, 0.05), "org/ft2-a": tune(ft2, 0.05),
            "org/ties": ties}


def test_the_pool_skips_re_uploads_and_later_models_and_adds_the_likeliest_base() -> None:
    models = family()
    created = {r: float(i) for i, r in enumerate(models)}
    x = models["org/ties"]
    relatives = {r: (created[r], pair_stats(x, a)) for r, a in models.items() if r != "org/ties"}
    nearest = sorted(relatives, key=lambda r: relatives[r][1].d2)  # type: ignore[union-attr]
    assert nearest.index("org/base") >= MERGE_CANDIDATES  # the case the base rule is for

    def same(a: str, b: str) -> bool:
        return {a, b} == {"org/ft1", "org/ft1-copy"}

    pool = merge_pool(created["org/ties"], relatives, same)  # type: ignore[arg-type]
    assert len(pool) == MERGE_CANDIDATES + 1 and pool[-1] == "org/base"
    assert not {"org/ft1", "org/ft1-copy"} <= set(pool)  # one of the two identical columns
    early = merge_pool(created["org/ft1-copy"], relatives, same)  # type: ignore[arg-type]
    assert set(early) == {"org/base", "org/ft1", "org/ft2"}  # nothing uploaded later; one of the two copies
    assert merge_pool(0.0, {"a": (None, PairStats(0.0, 1.0, True))}, same) == []  # a duplicate is no parent


@pytest.mark.parametrize("order", ["upload", "newest first", 0, 1])
def test_incremental_merges_equal_batch_in_every_arrival_order(tmp_path: Path, order: str | int) -> None:
    """Regression (relations zoo, rel/a-ties): the index fitted an arrival over its 5 nearest related
    nominees (no base: no masked merge) and refitted older models over other pools, so 3 of 4 orders
    gave a-ties another row than batch."""
    models = family()
    created = {r: T0 + timedelta(hours=i) for i, r in enumerate(models)}
    ids = list(models)
    if order == "newest first":
        ids.reverse()
    elif isinstance(order, int):
        ids = [ids[i] for i in np.random.default_rng(order).permutation(len(ids))]
    with LineageIndex.open(tmp_path, device="cpu") as index:
        for rid in ids:
            index.add(rid, "local:0", FAMILY, models[rid], created[rid])
    batch = find_merges([sorted(models)], models, {r: t.timestamp() for r, t in created.items()})
    assert set(batch) == {"org/ties"}
    assert {p for p, _ in batch["org/ties"]} == {"org/ft1", "org/ft2"}
    edges = {e.repo_id: e for e in read_records(tmp_path, "edges")}  # type: ignore[union-attr]
    merges = {r: tuple(e.parents)  # type: ignore[attr-defined]
              for r, e in edges.items() if e.relation == "merge"}  # type: ignore[attr-defined]
    assert merges == batch
