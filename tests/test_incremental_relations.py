"""Relations in the incremental index: duplicates, quantized copies, adapters (real store, real FAISS)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from indexer.incremental.index import LineageIndex
from store.tables import read_records

T0 = datetime(2024, 1, 1, tzinfo=UTC)
FAMILY = "vit-rel"


def _tune(rng: np.random.Generator, arrays: dict[str, np.ndarray], step: float) -> dict[str, np.ndarray]:
    return {n: (np.sign(a) * np.abs(a) ** 0.995 + step * rng.normal(size=a.shape)).astype(np.float32)
            for n, a in arrays.items()}


def tree(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    root = {f"enc.{b}.attention.output.dense.weight": rng.standard_t(3, size=(32, 32)).astype(np.float32) for b in range(2)}
    root["enc.0.mlp.weight"] = rng.standard_t(3, size=(64, 32)).astype(np.float32)
    kid = _tune(rng, root, 0.08)
    return {"org/root": root, "org/kid": kid, "org/kid-2": _tune(rng, root, 0.08), "org/grand": _tune(rng, kid, 0.05)}


def _edges(home: Path) -> dict[str, object]:
    return {e.repo_id: e for e in read_records(home, "edges")}  # type: ignore[union-attr]


def test_a_bit_identical_later_copy_is_a_duplicate_and_survives_a_reopen(tmp_path: Path) -> None:
    models = tree()
    models["org/kid-reupload"] = {n: a.copy() for n, a in models["org/kid"].items()}
    with LineageIndex.open(tmp_path, device="cpu") as index:
        for hours, (rid, arrays) in enumerate(models.items()):
            index.add(rid, f"local:{hours}", FAMILY, arrays, T0 + timedelta(hours=hours))
    edges = _edges(tmp_path)
    assert edges["org/kid-reupload"].parent == "org/kid"  # type: ignore[attr-defined]
    assert edges["org/kid-reupload"].relation == "duplicate"  # type: ignore[attr-defined]
    assert edges["org/kid"].relation == "finetune" and edges["org/grand"].relation == "finetune"  # type: ignore[attr-defined]
    with LineageIndex.open(tmp_path, device="cpu") as index:  # the identical pairs are known again after a restart
        state = index.family(FAMILY)
        rows = {r.repo_id: r.relation for r in index._edge_rows(state, sorted(state.views))}
    assert rows == {r: e.relation for r, e in edges.items()}  # type: ignore[attr-defined]


def test_a_copy_read_with_more_rows_is_compared_on_the_common_row_prefix(tmp_path: Path) -> None:
    """Plans depend on the item size: an F32 source reads fewer rows than a copy planned as BF16. Regression:
    no common layer made the exact step fail on the whole batch; now both are cut to the common prefix."""
    from indexer.readers import QuantInfo

    models = tree(3)
    source = models["org/kid"]
    rng = np.random.default_rng(9)
    copy = {n: (a + 0.006 * a.std() * rng.standard_normal(a.shape)).astype(np.float32) for n, a in source.items()}
    with LineageIndex.open(tmp_path, device="cpu") as index:
        for hours, (rid, arrays) in enumerate(models.items()):
            cut = {n: a[:16] for n, a in arrays.items()}  # the F32 models: half the rows
            index.add(rid, f"local:{hours}", FAMILY, cut, T0 + timedelta(hours=hours))
        from indexer.incremental.index import Arrival

        (res,) = index.add_many([Arrival("org/kid-Q8", "local:9", FAMILY, copy, T0 + timedelta(days=1),
                                         QuantInfo("gguf-Q8_0", 0.0054))])
        assert res.parent == "org/kid" and res.exact > 0
    edges = _edges(tmp_path)
    assert edges["org/kid-Q8"].relation == "quantized"  # type: ignore[attr-defined]
    assert not any(e.parent == "org/kid-Q8" for e in edges.values())  # type: ignore[attr-defined]
