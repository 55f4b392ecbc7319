"""Relations in the store (format v2): edges carry `relation` and weighted `parents`; the v1 -> v2 migration;
`index export` / `index query` show and audit them. Real Parquet parts, real DuckDB, pandas."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import store.migrations as migrations
from errors import BadInputError
from store.format import read_format, write_format
from store.layout import table_dir
from store.query import export_forest, query_model, store_stats
from store.schema import EdgeRecord, ModelRecord, ParentLink, spec_of
from store.tables import Store, read_records

T0 = datetime(2024, 5, 1, tzinfo=UTC)
SHA = "1" * 40

# (repo, parent, relation, parents, declared base, declared relation)
EDGES = [
    ("org/base", "", "", (), "", ""),
    ("org/ft", "org/base", "finetune", (), "org/base", "finetune"),
    ("org/ft-q8", "org/ft", "quantized", (), "org/ft", "finetune"),  # the card says finetune: disagrees
    ("org/ft-copy", "org/ft", "duplicate", (), "", ""),
    ("org/lora", "org/base", "adapter", (), "org/base", "adapter"),
    ("org/merged", "org/ft", "merge", (("org/ft", 0.6), ("org/base", 0.4)), "org/ft;org/base", ""),  # inferred merge
]


def _model(repo: str, declared: str, relation: str, day: int) -> ModelRecord:
    return ModelRecord(repo, SHA, "vit", "indexed", T0 + timedelta(days=day), created_at=T0 + timedelta(days=day),
                       declared_base_model=declared, declared_relation=relation,
                       weights_format="gguf" if repo.endswith("q8") else "safetensors")


def _edge(repo: str, parent: str, relation: str, parents: tuple[tuple[str, float], ...]) -> EdgeRecord:
    return EdgeRecord(repo, SHA, "vit", "org/base", parent, "org/base", 0 if not parent else 1 + (parent != "org/base"),
                      0.1, 0.0, 0.9, T0, relation=relation, parents=parents)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    with Store.open(tmp_path / "idx") as store:
        store.append("models", [_model(r, d, dr, i) for i, (r, _, _, _, d, dr) in enumerate(EDGES)])
        store.append("edges", [_edge(r, p, rel, ps) for r, p, rel, ps, _, _ in EDGES])
    return tmp_path / "idx"


def test_an_edge_without_a_relation_is_a_finetune_with_its_parent_at_weight_one() -> None:
    edge = EdgeRecord("org/a", SHA, "vit", "c", "org/b", "org/b", 1, 0.1, 0.0, 1.0, T0)
    assert edge.relation == "finetune" and edge.parents == (ParentLink("org/b", 1.0),)
    root = EdgeRecord("org/b", SHA, "vit", "c", "", "org/b", 0, 0.0, 0.0, 0.0, T0)
    assert root.relation == "" and root.parents == ()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"relation": "sibling"}, "expected one of finetune, adapter"),
    ({"parents": (("org/c", 0.5), ("org/b", 0.5))}, "must be the first of parents"),
    ({"parents": (("org/b", 0.5), ("org/b", 0.5))}, "distinct"),
    ({"parents": (("org/b", -1.0),)}, "weight must be a finite number >= 0"),
    ({"parents": (("org/b",),)}, "a parent is \\(repo_id, weight\\)"),
])
def test_bad_relations_are_refused_naming_the_edge(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        EdgeRecord("org/a", SHA, "vit", "c", "org/b", "org/b", 1, 0.1, 0.0, 1.0, T0, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(BadInputError, match="a root has no relation"):
        EdgeRecord("org/a", SHA, "vit", "c", "", "org/a", 0, 0.0, 0.0, 0.0, T0, relation="finetune")


def test_relations_and_merge_parents_round_trip(home: Path) -> None:
    got = {e.repo_id: e for e in read_records(home, "edges")}  # type: ignore[union-attr]
    assert got["org/merged"].relation == "merge"  # type: ignore[union-attr]
    assert got["org/merged"].parents == (("org/ft", 0.6), ("org/base", 0.4))  # type: ignore[union-attr]
    assert got["org/lora"].parents == (("org/base", 1.0),) and got["org/base"].parents == ()  # type: ignore[union-attr]
    with Store.open(home) as store:  # unchanged rows: nothing written
        assert store.append("edges", [_edge(r, p, rel, ps) for r, p, rel, ps, _, _ in EDGES]) == 0


def test_export_has_relation_and_a_parents_list_readable_by_duckdb_and_pandas(home: Path, tmp_path: Path) -> None:
    out = tmp_path / "forest.parquet"
    assert export_forest(home, out) == len(EDGES)
    rows = duckdb.sql(f"SELECT repo_id, relation, parents, relation_agrees_with_declared, weights_format "
                      f"FROM read_parquet('{out}') ORDER BY repo_id").fetchall()
    by = {r[0]: r[1:] for r in rows}
    assert by["org/merged"][:2] == ("merge", [{"repo_id": "org/ft", "weight": 0.6}, {"repo_id": "org/base", "weight": 0.4}])
    assert by["org/base"][:2] == ("", [])
    # unnest works on it: one row per (child, parent) for a merge-aware graph
    pairs = duckdb.sql(f"SELECT repo_id, unnest(parents).repo_id AS p FROM read_parquet('{out}') "
                       "WHERE relation = 'merge' ORDER BY p").fetchall()
    assert pairs == [("org/merged", "org/base"), ("org/merged", "org/ft")]
    assert by["org/ft-q8"][2:] == (False, "gguf") and by["org/lora"][2] is True and by["org/merged"][2] is True
    assert by["org/ft-copy"][2] is None  # nothing declared: nothing to audit
    frame = pd.read_parquet(out)
    merged = frame.set_index("repo_id").loc["org/merged"]
    assert [dict(p) for p in merged["parents"]] == [{"repo_id": "org/ft", "weight": 0.6},
                                                    {"repo_id": "org/base", "weight": 0.4}]


def test_query_shows_relations_children_relations_and_audits_the_declared_one(home: Path) -> None:
    q8 = query_model(home, "org/ft-q8")
    assert q8.relation == "quantized" and q8.declared_relation == "finetune"
    assert q8.relation_agrees_with_declared is False and q8.agrees_with_declared is True
    assert [(s.relation, s.parent) for s in q8.ancestry] == [("quantized", "org/ft"), ("finetune", "org/base")]
    merged = query_model(home, "org/merged")
    assert merged.parents == (("org/ft", 0.6), ("org/base", 0.4)) and merged.relation_agrees_with_declared is True
    ft = query_model(home, "org/ft")
    assert dict(zip(ft.children, ft.child_relations, strict=True)) == {
        "org/ft-copy": "duplicate", "org/ft-q8": "quantized", "org/merged": "merge"}
    assert query_model(home, "org/base").relation == "" and ft.to_dict()["parents"] == [["org/base", 1.0]]
    assert store_stats(home)["edges_by_relation"] == {
        "adapter": 1, "duplicate": 1, "finetune": 1, "merge": 1, "quantized": 1}


# --- the v1 -> v2 migration ------------------------------------------------------------------------------


def _v1_schema(table: str) -> pa.Schema:
    new = {"relation", "parents", "weights_format", "details"}
    return pa.schema([f for f in spec_of(table).stored_schema if f.name not in new])


def _write_v1_part(home: Path, table: str, seq: int, rows: list[dict[str, object]]) -> None:
    folder = table_dir(home, table)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"_seq": seq, "_deleted": False, "_hash": "v1-hash"}
    pq.write_table(pa.Table.from_pylist([r | meta for r in rows], schema=_v1_schema(table)),
                   folder / f"part-{seq:012d}-0000000{seq}.parquet")


def _v1_store(home: Path) -> None:
    write_format(home, 1)
    model = {"repo_id": "org/a", "revision": SHA, "family": "vit", "status": "indexed", "indexed_at": T0,
             "created_at": None, "last_modified": None, "reason": "", "declared_base_model": "",
             "declared_relation": "", "library": "", "pipeline_tag": "", "n_parameters": 0, "bytes_read": 0,
             "source": "local"}
    _write_v1_part(home, "models", 1, [model, model | {"repo_id": "org/b"}])
    edge = {"repo_id": "org/a", "revision": SHA, "family": "vit", "cluster": "org/a", "parent": "", "root": "org/a",
            "depth": 0, "distance": float("nan"), "direction_score": 0.0, "confidence": 0.0, "updated_at": T0}
    _write_v1_part(home, "edges", 1, [edge])
    _write_v1_part(home, "edges", 2, [edge | {"repo_id": "org/b", "parent": "org/a", "depth": 1, "distance": 0.3}])


def test_a_v1_store_is_migrated_in_place_and_reads_as_finetunes(tmp_path: Path) -> None:
    _v1_store(tmp_path)
    with Store.open(tmp_path) as store:
        assert read_format(tmp_path) == 2
        edges = {e.repo_id: e for e in store.records("edges")}  # type: ignore[union-attr]
        assert edges["org/b"].relation == "finetune" and edges["org/b"].parents == (("org/a", 1.0),)
        assert edges["org/a"].relation == "" and edges["org/a"].parents == ()
        assert {m.weights_format for m in store.records("models")} == {"safetensors"}  # type: ignore[union-attr]
        # the hashes were recomputed: the same edge saved again is a no-op, not a rewrite
        assert store.append("edges", list(edges.values())) == 0
    assert query_model(tmp_path, "org/b").relation == "finetune"


def test_a_migration_cut_short_resumes_at_the_part_it_did_not_finish(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _v1_store(tmp_path)
    real, done = migrations._rewrite_part, []

    def crash_on_second(path: Path, spec: object, fill: object) -> bool:
        if done:
            raise RuntimeError("killed mid-migration")
        done.append(path)
        return real(path, spec, fill)  # type: ignore[arg-type]

    monkeypatch.setattr(migrations, "_rewrite_part", crash_on_second)
    with pytest.raises(RuntimeError):
        Store.open(tmp_path)
    assert read_format(tmp_path) == 1  # FORMAT moves only after the whole step
    monkeypatch.setattr(migrations, "_rewrite_part", real)
    with Store.open(tmp_path) as store:
        assert sorted(e.relation for e in store.records("edges")) == ["", "finetune"]  # type: ignore[union-attr]
    assert read_format(tmp_path) == 2
