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


def _bf16(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import torch

    return {n: torch.as_tensor(a).to(torch.bfloat16).to(torch.float32).numpy() for n, a in arrays.items()}


def test_an_exact_16_bit_cast_is_a_quantized_child_of_its_source_in_either_order(tmp_path: Path) -> None:
    """batch mother labels an exact F16 / BF16 cast `quantized` (methods._cast_sources); the index must too,
    whichever of the two arrives first, and after a reopen."""
    models = tree(5)
    models["org/kid-bf16"] = _bf16(models["org/kid"])
    later = {**models}
    first = {"org/kid-bf16": later.pop("org/kid-bf16"), **later}  # the cast arrives before its source
    for name, order in (("source-first", models), ("cast-first", first)):
        home = tmp_path / name
        with LineageIndex.open(home, device="cpu") as index:
            for hours, (rid, arrays) in enumerate(order.items()):
                index.add(rid, f"local:{hours}", FAMILY, arrays, T0 + timedelta(hours=hours))
        edges = _edges(home)
        assert edges["org/kid-bf16"].parent == "org/kid", name  # type: ignore[attr-defined]
        assert edges["org/kid-bf16"].relation == "quantized", name  # type: ignore[attr-defined]
        assert edges["org/grand"].relation == "finetune", name  # type: ignore[attr-defined]
        with LineageIndex.open(home, device="cpu") as index:  # the cast pair is known again after a restart
            state = index.family(FAMILY)
            assert ("org/kid", "org/kid-bf16") in state.casts
            rows = {r.repo_id: r.relation for r in index._edge_rows(state, sorted(state.views))}
        assert rows == {r: e.relation for r, e in edges.items()}  # type: ignore[attr-defined]


def test_the_cast_test_reads_the_common_rows_and_refuses_an_upcast() -> None:
    from indexer.lineage.methods import cast_dtype

    rng = np.random.default_rng(2)
    source = {"w": rng.standard_normal((8, 4)).astype(np.float32)}
    copy = {"w": _bf16(source)["w"][:6]}  # planned with fewer rows
    assert cast_dtype(source, copy) == "BF16"
    assert cast_dtype(copy, source) == ""  # the copy is no source of the wider model
    assert cast_dtype(copy, {"w": copy["w"].copy()}) == ""  # values that already fit: an upcast, no cast
    assert cast_dtype(source, {"w": copy["w"][:, :3]}) == ""  # other columns: not comparable


def test_heads_are_not_cut_to_the_jobs_fewest_rows() -> None:
    """A pair's heads distance must not depend on the other nominees of the job: a shorter classifier of a
    third model once cut the new model's, and a re-save of the root read nearer than the root itself."""
    from indexer.incremental.exact import ModelView, heads_distance
    from indexer.incremental.index import _aligned

    rng = np.random.default_rng(1)
    body = rng.standard_normal((8, 8)).astype(np.float32)

    def view(rid: str, **heads: np.ndarray) -> ModelView:
        return ModelView(rid, {"enc.0.attention.output.dense.weight": body, **heads}, {}, {}, None, ())

    new = view("new", **{"classifier.weight": rng.standard_normal((10, 8)).astype(np.float32)})
    root = view("root")
    alone = heads_distance(new.arrays, root.arrays)
    short = view("other", **{"classifier.weight": rng.standard_normal((4, 8)).astype(np.float32)})
    cut_new, (cut_root, _) = _aligned(new, [root, short])
    assert cut_new.arrays["classifier.weight"].shape == (10, 8)
    assert heads_distance(cut_new.arrays, cut_root.arrays) == alone


def test_a_sources_copies_count_once_among_a_late_bases_nominees(tmp_path: Path) -> None:
    """A newest-first crawl: eight Q8 copies of a fine-tune, its child, a sibling, the fine-tune, then the base.
    The base's k = 4 nominees hold one copy standing for the eight and the fine-tune they hang under, not four copies
    (`_copies_once`); every copy ends under the fine-tune and the fine-tune under the base. Regression: with
    26 formats per model (bench/formats.py), a base's 16 nominees were all copies and its fine-tune hung
    under a merge of itself."""
    from indexer.incremental.index import Arrival, _copies_once
    from indexer.readers import QuantInfo

    models = tree(7)
    rng = np.random.default_rng(11)
    kid = models["org/kid"]
    copies = {f"org/kid-Q8-{i}": {n: (a + 0.006 * a.std() * rng.standard_normal(a.shape)).astype(np.float32)
                                   for n, a in kid.items()} for i in range(8)}
    arrivals = [Arrival(rid, f"local:c{i}", FAMILY, arrays, T0 + timedelta(days=2, hours=-i), QuantInfo("gguf-Q8_0", 0.0054))
                for i, (rid, arrays) in enumerate(copies.items())]
    arrivals += [Arrival(rid, f"local:m{i}", FAMILY, models[rid], T0 + timedelta(days=1, hours=-i))
                 for i, rid in enumerate(("org/grand", "org/kid-2", "org/kid"))]
    arrivals.append(Arrival("org/root", "local:r", FAMILY, models["org/root"], T0))
    with LineageIndex.open(tmp_path, device="cpu", k=4, expand=2) as index:
        results = [index.add_many([a])[0] for a in arrivals]
        state = index.family(FAMILY)
        assert all(state.forest.parent(c) == "org/kid" for c in copies)
        near = [*sorted(copies), "org/kid", "org/root"]
        assert _copies_once(state, near, 4) == ["org/kid-Q8-0", "org/kid", "org/root", "org/kid-Q8-1"]
        assert _copies_once(state, ["org/kid", "org/root"], 4) == ["org/kid", "org/root"]  # no copy: unchanged
    root = results[-1]
    assert "org/kid" in root.nominees and len(set(root.nominees) & set(copies)) == 1
    edges = _edges(tmp_path)
    assert edges["org/kid"].parent == edges["org/kid-2"].parent == "org/root"  # type: ignore[attr-defined]
    assert edges["org/grand"].parent == "org/kid"  # type: ignore[attr-defined]
    assert {edges[c].parent for c in copies} == {"org/kid"}  # type: ignore[attr-defined]
    assert {edges[c].relation for c in copies} == {"quantized"}  # type: ignore[attr-defined]
