"""indexer.relations.pool: one merge pool rule for batch and the incremental index. A TIES merge whose base
is not among its nearest relatives, next to a byte-identical re-upload, gets the same row from the
incremental index (real store, real FAISS) in every arrival order as from batch's `find_merges`."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from indexer.incremental.index import LineageIndex
from indexer.relations.batch import find_merges
from indexer.relations.pool import PairStats, merge_parents_of, merge_pool, pair_stats
from indexer.relations.rules import MERGE_CANDIDATES
from store.tables import read_records

T0 = datetime(2024, 1, 1, tzinfo=UTC)
FAMILY = "vit-pool"


def base_and_tune(rng: np.random.Generator) -> tuple[dict[str, np.ndarray], Callable[[dict[str, np.ndarray], float], dict[str, np.ndarray]]]:
    """A heavy-tailed base of three blocks, and a fine-tune step (Gaussian update of a given size)."""
    base = {f"enc.{b}.attention.output.dense.weight": rng.standard_t(3, size=(32, 32)).astype(np.float32) for b in range(2)}
    base["enc.0.mlp.weight"] = rng.standard_t(3, size=(64, 32)).astype(np.float32)

    def tune(src: dict[str, np.ndarray], step: float) -> dict[str, np.ndarray]:
        return {n: (a + step * rng.standard_normal(a.shape)).astype(np.float32) for n, a in src.items()}

    return base, tune


def index_in_order(home: Path, models: dict[str, dict[str, np.ndarray]], created: dict[str, datetime],
                   order: str | int) -> None:
    """Every model into a real index at `home`: in upload order, newest first, or a seeded permutation."""
    ids = list(models)
    if order == "newest first":
        ids.reverse()
    elif isinstance(order, int):
        ids = [ids[i] for i in np.random.default_rng(order).permutation(len(ids))]
    with LineageIndex.open(home, device="cpu") as index:
        for rid in ids:
            index.add(rid, "local:0", FAMILY, models[rid], created[rid])


def family(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """base; two fine-tunes, a re-upload of one, three children of them; a TIES merge of the two (upload
    order). The TIES merge's five nearest are the fine-tunes, the re-upload and children: its base, what
    tells a masked merge, is further."""
    rng = np.random.default_rng(seed)
    base, tune = base_and_tune(rng)
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
    index_in_order(tmp_path, models, created, order)
    batch = find_merges([sorted(models)], models, {r: t.timestamp() for r, t in created.items()})
    assert set(batch) == {"org/ties"}
    assert {p for p, _ in batch["org/ties"]} == {"org/ft1", "org/ft2"}
    edges = {e.repo_id: e for e in read_records(tmp_path, "edges")}  # type: ignore[union-attr]
    merges = {r: tuple(e.parents)  # type: ignore[attr-defined]
              for r, e in edges.items() if e.relation == "merge"}  # type: ignore[attr-defined]
    assert merges == batch


def merges_of_merges(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """base; two fine-tunes; three linear merges of them; a fine-tune of the first merge; then a DARE
    merge of the two fine-tunes over the base (upload order). The DARE merge's nearest relatives are the
    earlier merges and the merge's fine-tune, not the fine-tunes it is made of."""
    rng = np.random.default_rng(seed)
    base, tune = base_and_tune(rng)
    ft1, ft2 = tune(base, 0.3), tune(base, 0.3)

    def linear(w: float) -> dict[str, np.ndarray]:
        return {n: (w * ft1[n] + (1 - w) * ft2[n]).astype(np.float32) for n in base}

    dare = {}  # drop 30 % of each task vector at random, rescale the rest, weights 0.55 / 0.45
    for n, b in base.items():
        keep = rng.random((2, *b.shape)) < 0.7
        dare[n] = (b + (0.55 * (ft1[n] - b) * keep[0] + 0.45 * (ft2[n] - b) * keep[1]) / 0.7).astype(np.float32)
    half = linear(0.5)
    return {"org/base": base, "org/ft1": ft1, "org/ft2": ft2, "org/lin": half, "org/lin-b": linear(0.3),
            "org/lin-c": linear(0.65), "org/lin-ft": tune(half, 0.03), "org/dare": dare}


@pytest.mark.parametrize("order", ["upload", "newest first", 0])
def test_a_merge_is_explained_by_models_that_are_no_merges_in_both_paths(tmp_path: Path, order: str | int) -> None:
    """Merges of merges (bench/merge_methods.py): a re-merge of two fine-tunes sits nearer their earlier
    merges (and a merge's fine-tune) than the fine-tunes; it is a merge of the fine-tunes, the merges'
    parents join its pool, and the merge's fine-tune stays no merge -- the same rows from the index in
    every arrival order as from batch."""
    models = merges_of_merges()
    created = {r: T0 + timedelta(hours=i) for i, r in enumerate(models)}
    x = models["org/dare"]
    nearest = sorted((r for r in models if r != "org/dare"), key=lambda r: pair_stats(x, models[r]).d2)  # type: ignore[union-attr]
    assert {"org/ft1", "org/ft2"} & set(nearest[:4]) == set()  # the case the rule is for
    batch = find_merges([sorted(models)], models, {r: t.timestamp() for r, t in created.items()})
    assert set(batch) == {"org/lin", "org/lin-b", "org/lin-c", "org/dare"}
    assert all({p for p, _ in links} == {"org/ft1", "org/ft2"} for links in batch.values())
    assert [w for _, w in batch["org/dare"]] == [0.55, 0.45]
    index_in_order(tmp_path, models, created, order)
    edges = {e.repo_id: e for e in read_records(tmp_path, "edges")}  # type: ignore[union-attr]
    merges = {r: tuple(e.parents) for r, e in edges.items() if e.relation == "merge"}  # type: ignore[attr-defined]
    assert merges == batch


def test_the_pool_holds_the_parents_of_the_merges_it_takes() -> None:
    models = merges_of_merges()
    created = {r: float(i) for i, r in enumerate(models)}
    x = models["org/dare"]
    relatives = {r: (created[r], pair_stats(x, a)) for r, a in models.items() if r != "org/dare"}
    plain = merge_pool(created["org/dare"], relatives, lambda a, b: False)  # type: ignore[arg-type]
    known = {m: ["org/ft1", "org/ft2"] for m in ("org/lin", "org/lin-b", "org/lin-c")}
    expanded = merge_pool(created["org/dare"], relatives, lambda a, b: False, known)  # type: ignore[arg-type]
    assert {"org/ft1", "org/ft2"} <= set(expanded) and set(plain) <= set(expanded)
    assert merge_parents_of("org/lin", known | {"org/ft1": ["org/base"]}) == ["org/ft1", "org/ft2", "org/base"]
