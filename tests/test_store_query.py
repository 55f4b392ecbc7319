"""store.query: DuckDB over a hand-built two-tree store; exports read back by pandas and DuckDB."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pandas as pd
import pytest

import store.query as query_mod
from errors import FormatVersionError, NoIndexError, UnknownModelError
from store.format import write_format
from store.query import AncestryStep, export_forest, query_model, store_stats
from store.schema import CandidateRecord, CrawlStateRecord, EdgeRecord, ModelRecord
from store.tables import Store

REPO_ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2024, 5, 1, tzinfo=UTC)
SHA, SHA2 = "1" * 40, "2" * 40

# (repo, family, cluster, parent, root, depth, declared base)
FOREST = [
    ("org/base-a", "vit", "vit-0", "", "org/base-a", 0, "org/ancestor"),
    ("org/a1", "vit", "vit-0", "org/base-a", "org/base-a", 1, "org/base-a"),
    ("org/a2", "vit", "vit-0", "org/base-a", "org/base-a", 1, "org/a1"),
    ("org/a11", "vit", "vit-0", "org/a1", "org/base-a", 2, ""),
    ("org/base-b", "llama", "llama-0", "", "org/base-b", 0, ""),
    ("org/b1", "llama", "llama-0", "org/base-b", "org/base-b", 1, "org/x; org/base-b"),
]


def _model(repo: str, family: str, declared: str, *, rev: str = SHA, day: int = 0, **kw: object) -> ModelRecord:
    return ModelRecord(repo, rev, family, kw.pop("status", "indexed"), T0 + timedelta(days=day),  # type: ignore[arg-type]
                       created_at=T0 - timedelta(days=30 - day), declared_base_model=declared,
                       declared_relation="finetune" if declared else "", **kw)  # type: ignore[arg-type]


def build_store(home: Path, *, compact_after: int = 64) -> None:
    with Store.open(home, compact_after=compact_after) as store:
        store.append("models", [_model(r, f, d, day=i) for i, (r, f, _, _, _, _, d) in enumerate(FOREST)])
        # org/a1 was re-indexed at a newer revision: the newer one is "the" model
        store.append("models", [_model("org/a1", "vit", "org/base-a", rev=SHA2, day=10)])
        store.append("models", [
            _model("org/broken", "vit", "", status="failed", reason="HTTP 500 from the Hub"),
            _model("org/broken2", "vit", "", status="failed", reason="HTTP 500 from the Hub"),
            _model("org/pickle", "", "", status="skipped", reason="pickled weights only"),
        ])
        store.append("edges", [
            EdgeRecord(r, SHA2 if r == "org/a1" else SHA, f, c, p, root, depth, 0.1 * depth, 0.5, 0.9 - 0.1 * depth, T0)
            for r, f, c, p, root, depth, _ in FOREST
        ])
        store.append("candidates", [CandidateRecord("vit", "org/base-a", "org/a1", 0.1, 1.0, 0.1)])
        store.append("crawl_state", [CrawlStateRecord("http://hub", T0, "org/b1", T0, "run-7")])


@pytest.fixture
def home(tmp_path: Path) -> Path:
    build_store(tmp_path / "idx")
    return tmp_path / "idx"


def test_query_walks_the_ancestry_to_the_root(home: Path) -> None:
    report = query_model(home, "org/a11")
    assert report.family == "vit" and report.cluster == "vit-0" and report.root == "org/base-a"
    assert report.depth == 2 and report.parent == "org/a1" and report.in_forest
    assert [(s.child, s.parent) for s in report.ancestry] == [("org/a11", "org/a1"), ("org/a1", "org/base-a")]
    assert report.ancestry[0] == AncestryStep("org/a11", "org/a1", pytest.approx(0.2), 0.5, pytest.approx(0.7))
    assert report.children == () and report.siblings == ()
    assert report.agrees_with_declared is None  # nothing declared
    assert report.indexed_at == T0 + timedelta(days=3)


def test_query_children_siblings_and_declared_agreement(home: Path) -> None:
    a1 = query_model(home, "org/a1")
    assert a1.revision == SHA2 and a1.indexed_at == T0 + timedelta(days=10)
    assert a1.children == ("org/a11",) and a1.siblings == ("org/a2",)
    assert a1.agrees_with_declared is True
    assert query_model(home, "org/a2").agrees_with_declared is False  # declares org/a1, we found base-a
    root = query_model(home, "org/base-a")
    assert root.parent == "" and root.ancestry == () and root.children == ("org/a1", "org/a2")
    assert root.agrees_with_declared is False  # it declares a base; we found none
    assert query_model(home, "org/b1").agrees_with_declared is True  # one of a merge's bases
    doc = json.loads(json.dumps(query_model(home, "org/b1").to_dict()))
    assert doc["ancestry"][0]["parent"] == "org/base-b" and doc["indexed_at"].startswith("2024-05-")


def test_a_failed_model_reports_its_reason_and_no_place(home: Path) -> None:
    report = query_model(home, "org/broken")
    assert report.status == "failed" and report.reason == "HTTP 500 from the Hub"
    assert not report.in_forest and report.parent is None and report.agrees_with_declared is None


def test_unknown_repo_suggests_near_matches(home: Path) -> None:
    with pytest.raises(UnknownModelError, match="did you mean") as caught:
        query_model(home, "org/a-1")
    assert "org/a1" in caught.value.suggestions
    with pytest.raises(UnknownModelError, match="not in the index; run `index add zzz/qqq`"):
        query_model(home, "zzz/qqq")


def test_missing_empty_and_newer_stores_are_clear_errors(tmp_path: Path) -> None:
    for call in (lambda h: query_model(h, "x/y"), store_stats, lambda h: export_forest(h, h / "o.parquet")):
        with pytest.raises(NoIndexError, match="no index at .*run `index crawl` or `index add` first"):
            call(tmp_path / "missing")
    with Store.open(tmp_path / "empty"):
        pass
    with pytest.raises(NoIndexError):
        store_stats(tmp_path / "empty")
    build_store(tmp_path / "new")
    write_format(tmp_path / "new", 99)
    with pytest.raises(FormatVersionError, match="version 99"):
        query_model(tmp_path / "new", "org/a1")


def test_export_is_one_row_per_placed_model_and_readable_everywhere(home: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "forest.parquet"
    assert export_forest(home, out) == 6
    frame = pd.read_parquet(out)
    assert list(frame.columns) == [
        "repo_id", "revision", "family", "cluster", "parent", "relation", "parents", "root", "depth", "distance",
        "direction_score", "confidence", "declared_base_model", "declared_relation",
        "agrees_with_declared", "relation_agrees_with_declared", "weights_format", "created_at", "indexed_at",
    ]
    assert sorted(frame["repo_id"]) == sorted(r for r, *_ in FOREST)  # failures are not in the forest
    agrees = dict(zip(frame["repo_id"], frame["agrees_with_declared"], strict=True))
    assert agrees["org/a1"] == True  # noqa: E712 (a numpy bool, not the singleton)
    assert agrees["org/a2"] == False and pd.isna(agrees["org/a11"])  # noqa: E712
    rows = duckdb.sql(f"SELECT repo_id, revision, depth FROM read_parquet('{out}') WHERE family = 'vit' "
                      "ORDER BY depth, repo_id").fetchall()
    assert rows == [("org/base-a", SHA, 0), ("org/a1", SHA2, 1), ("org/a2", SHA, 1), ("org/a11", SHA, 2)]
    again = tmp_path / "again.parquet"
    export_forest(home, again)
    assert again.read_bytes() == out.read_bytes()  # same store, same bytes
    assert not list(out.parent.glob(".tmp-*"))


def test_export_agreement_matches_the_query_for_every_model(home: Path, tmp_path: Path) -> None:
    export_forest(home, tmp_path / "f.parquet")
    for row in pd.read_parquet(tmp_path / "f.parquet").to_dict("records"):
        expected = query_model(home, row["repo_id"]).agrees_with_declared
        got = None if pd.isna(row["agrees_with_declared"]) else bool(row["agrees_with_declared"])
        assert got == expected, row["repo_id"]


def test_stats_count_families_clusters_statuses_and_failures(home: Path) -> None:
    stats = store_stats(home)
    assert stats["models"] == 9
    assert stats["by_status"] == {"failed": 2, "indexed": 6, "skipped": 1}
    assert stats["by_family"] == {"": 1, "llama": 2, "vit": 6}
    assert stats["failures_by_reason"] == {"HTTP 500 from the Hub": 2, "pickled weights only": 1}
    assert stats["clusters"] == 2 and stats["clusters_by_family"] == {"llama": 1, "vit": 1}
    assert stats["edges"] == 4 and stats["roots"] == 2 and stats["candidates"] == 1
    assert stats["parts"] == {"models": 3, "sketches": 0, "candidates": 1, "edges": 1, "crawl_state": 1}
    assert stats["crawl_cursors"] == {"http://hub": {"created_at": T0.isoformat(), "id": "org/b1"}}
    files = sum(p.stat().st_size for p in home.rglob("*") if p.is_file())
    assert stats["bytes_on_disk"] == files and 0 < stats["bytes_in_tables"] < files
    json.dumps(stats)  # JSON-ready for `index stats --json`


def test_a_compaction_during_a_query_is_retried(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_connect = query_mod._connect
    calls = {"n": 0}

    def connect_then_compact(h: Path) -> duckdb.DuckDBPyConnection:
        con = real_connect(h)  # views now name the current parts...
        calls["n"] += 1
        if calls["n"] == 1:
            with Store.open(h) as store:  # ...which a writer then compacts away
                store.compact("models", force=True)
        return con

    monkeypatch.setattr(query_mod, "_connect", connect_then_compact)
    assert query_model(home, "org/a1").revision == SHA2
    assert calls["n"] == 2


def test_query_module_imports_neither_faiss_nor_torch() -> None:
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import store.query; "
            "print(sorted(m for m in ('faiss', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(REPO_ROOT)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
