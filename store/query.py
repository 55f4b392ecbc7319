"""The read side: DuckDB over the Parquet parts, for `index query`, `index export` and `index stats`.

Imports only duckdb, pyarrow, numpy and the stdlib (never torch nor faiss) so `index query` starts fast.
Takes no lock: parts are immutable and complete once visible (see `store.tables`). If a compaction
deletes parts under a running query, the query is retried on a fresh listing.

Views built per call, one per table, each holding the latest live row per key (`store.tables.latest_sql`),
plus `latest_models`: one row per repo_id, the most recently indexed revision (ties: the later write).
A model's place in the forest comes from `edges` (one node per repo). "Agrees with declared" is
null when the card declares nothing or the model is not in the forest, true when the recovered parent
is one of the declared bases (";"-joined for merges), false otherwise (a recovered root included).
The relation is audited the same way: the declared one is `base_model_relation`, else "merge" when the
card lists several bases (the Hub's own inference); "relation agrees" is null when neither says
anything or the model is not in the forest, true when it equals the recovered edge's relation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import duckdb

from errors import NoIndexError, StoreError, UnknownModelError
from store.atomic import atomic_write_with
from store.format import check_readable
from store.layout import DELETED, SEQ, TABLES, TABLES_DIR, empty_select, latest_sql, list_parts, parquet_source

logger = logging.getLogger(__name__)

T = TypeVar("T")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# A compaction that removes parts under a reader makes it start over. Under a loaded 2-core box a reader
# lost 5 races in a row once (tests/test_reliability_readers.py during a zoo build); 20, with a short
# growing pause between tries, rides out a compaction burst.
_RETRIES = 20
_RETRY_PAUSE_S = 0.01
_MAX_SUGGESTIONS = 5
_SIMILARITY = 0.8  # jaro-winkler; 0.8 keeps typos and org/name swaps, drops unrelated ids

_DECLARED = "[trim(x) for x in string_split(m.declared_base_model, ';') if trim(x) <> '']"
_AGREES_SQL = (
    "CASE WHEN coalesce(m.declared_base_model, '') = '' OR e.repo_id IS NULL THEN NULL "
    f"ELSE e.parent <> '' AND list_contains({_DECLARED}, e.parent) END"
)
_DECLARED_RELATION_SQL = (
    "CASE WHEN coalesce(m.declared_relation, '') <> '' THEN lower(m.declared_relation) "
    f"WHEN len({_DECLARED}) > 1 THEN 'merge' ELSE '' END"
)
_RELATION_AGREES_SQL = (
    f"CASE WHEN ({_DECLARED_RELATION_SQL}) = '' OR e.repo_id IS NULL THEN NULL "
    f"ELSE coalesce(e.relation, '') = ({_DECLARED_RELATION_SQL}) END"
)


@dataclass(frozen=True)
class AncestryStep:
    """One edge of a chain: `child` was derived from `parent`."""

    child: str
    parent: str
    distance: float | None
    direction_score: float | None
    confidence: float | None
    relation: str = "finetune"  # finetune | adapter | quantized | merge | duplicate
    parents: tuple[tuple[str, float], ...] = ()  # (repo_id, weight), heaviest first; several for a merge

    def __post_init__(self) -> None:
        if not self.parents and self.parent:  # one parent: itself, weight 1 (as store.schema.EdgeRecord)
            object.__setattr__(self, "parents", ((self.parent, 1.0),))


@dataclass(frozen=True)
class ModelReport:
    repo_id: str
    revision: str
    family: str
    status: str
    reason: str
    source: str
    created_at: datetime | None
    indexed_at: datetime
    in_forest: bool
    cluster: str | None
    root: str | None
    depth: int | None
    parent: str | None  # "" for a root, None when the model is not in the forest
    ancestry: tuple[AncestryStep, ...]  # from the model up to its root
    children: tuple[str, ...]
    siblings: tuple[str, ...]
    declared_base_model: str
    declared_relation: str
    agrees_with_declared: bool | None
    relation: str | None = None  # of the edge to `parent`: "" for a root, None when not in the forest
    parents: tuple[tuple[str, float], ...] = ()  # (repo_id, weight): several for a merge
    relation_agrees_with_declared: bool | None = None  # see the module docstring
    child_relations: tuple[str, ...] = ()  # the relation of each of `children`, in the same order
    weights_format: str = ""  # safetensors | adapter | gguf | gptq | awq | bnb-int8 | bnb-4bit | fp8 | ...
    details: str = "{}"  # JSON: an adapter's base / r / alpha / targets / verdict, a quantization scheme

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (timestamps as ISO 8601 strings) for `index query --json`."""
        out = asdict(self)
        for name in ("created_at", "indexed_at"):
            value = out[name]
            out[name] = value.isoformat() if value is not None else None
        out["ancestry"] = [dict(step, parents=[list(p) for p in step["parents"]]) for step in out["ancestry"]]
        out["children"], out["siblings"] = list(self.children), list(self.siblings)
        out["child_relations"] = list(self.child_relations)
        out["parents"] = [list(p) for p in self.parents]
        return out


def agrees_with_declared(declared_base_model: str, parent: str | None) -> bool | None:
    """The Python twin of `_AGREES_SQL`, for one model."""
    declared = [d.strip() for d in declared_base_model.split(";") if d.strip()]
    if not declared or parent is None:
        return None
    return parent != "" and parent in declared


def declared_relation(declared_base_model: str, declared_relation_: str) -> str:
    """The Python twin of `_DECLARED_RELATION_SQL`."""
    if declared_relation_:
        return declared_relation_.lower()
    return "merge" if len([d for d in declared_base_model.split(";") if d.strip()]) > 1 else ""


def relation_agrees_with_declared(declared_base_model: str, declared_relation_: str, relation: str | None) -> bool | None:
    """The Python twin of `_RELATION_AGREES_SQL`, for one model."""
    declared = declared_relation(declared_base_model, declared_relation_)
    if not declared or relation is None:
        return None
    return relation == declared


def _relation(edge: dict[str, Any]) -> str:
    """An edge's relation; a row written before relations existed (format v1, unmigrated parts never
    reach a reader, but a union_by_name NULL might) is a fine-tune when it has a parent."""
    return str(edge.get("relation") or ("finetune" if edge.get("parent") else ""))


def _parents(edge: dict[str, Any]) -> tuple[tuple[str, float], ...]:
    links = edge.get("parents") or ([{"repo_id": edge["parent"], "weight": 1.0}] if edge.get("parent") else [])
    return tuple((str(p["repo_id"]), float(p["weight"])) for p in links)


def _connect(home: Path) -> duckdb.DuckDBPyConnection:
    check_readable(Path(home))
    con = duckdb.connect()
    con.execute("SET TimeZone='UTC'")
    for table in TABLES:
        parts = [p for _, p in list_parts(home, table)]
        if parts:
            source = parquet_source(parts)
        else:
            source = f"({empty_select(table)})"
        con.execute(f"CREATE VIEW {table} AS {latest_sql(table, source)}")
        con.execute(f"CREATE VIEW {table}_parts AS SELECT * FROM {source}")  # every version: point lookups
    con.execute(
        "CREATE VIEW latest_models AS SELECT * FROM models "
        "QUALIFY row_number() OVER (PARTITION BY repo_id ORDER BY indexed_at DESC, _seq DESC) = 1"
    )
    try:  # models rows are never tombstoned: one live row anywhere means a non-empty index
        empty = _scalar(con, "SELECT count(*) FROM (SELECT 1 FROM models_parts WHERE NOT _deleted LIMIT 1)") == 0
    except BaseException:
        con.close()
        raise
    if empty:
        con.close()
        raise NoIndexError(str(home))
    return con


def _scalar(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> Any:
    rows = con.execute(sql, params or []).fetchall()  # fetchall: DuckDB 2 refuses unfinished results
    return rows[0][0] if rows else None


def _rows(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
    """Rows as dicts. Timestamps travel as epoch microseconds: DuckDB's own conversion of TIMESTAMPTZ
    needs pytz, which we do not ship, and Arrow's imports pandas (240 ms of a query)."""
    rel = con.sql(sql, params=params or [])
    stamps = {name for name, kind in zip(rel.columns, rel.types, strict=True) if str(kind).startswith("TIMESTAMP")}
    if stamps:
        rel = rel.project(", ".join(f'epoch_us("{c}") AS "{c}"' if c in stamps else f'"{c}"' for c in rel.columns))
    out = [dict(zip(rel.columns, row, strict=True)) for row in rel.fetchall()]
    for row in out:
        for name in stamps:
            if row[name] is not None:
                row[name] = _EPOCH + timedelta(microseconds=row[name])
    return out


def _gone_or_raise(home: Path, exc: duckdb.IOException) -> None:
    """Return when parts vanished under the query (a compaction: retry), else raise a StoreError."""
    if not any(sign in str(exc) for sign in ("No files found", "No such file", "does not exist")):
        raise StoreError(f"{home}: cannot read the index ({exc})") from exc
    logger.debug("parts changed under a query (compaction); retrying")


def _with_store(home: Path, work: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
    """Run `work` on a fresh connection; retry when a compaction removed parts mid-query."""
    for attempt in range(_RETRIES):
        if attempt:
            time.sleep(_RETRY_PAUSE_S * attempt)
        try:
            # _connect reads the parts too (it counts the models): a compaction can remove them there as well
            # (regression: tests/test_reliability_readers.py saw a raw duckdb IOException escape here).
            con = _connect(Path(home))
        except duckdb.IOException as exc:
            _gone_or_raise(home, exc)
            continue
        try:
            return work(con)
        except duckdb.IOException as exc:
            _gone_or_raise(home, exc)
        finally:
            con.close()
    raise StoreError(f"{home}: the index kept changing while reading; try again")


# --- query -----------------------------------------------------------------------------------------


def _suggest(con: duckdb.DuckDBPyConnection, repo_id: str) -> tuple[str, ...]:
    rows = con.execute(
        "SELECT repo_id, jaro_winkler_similarity(lower(repo_id), lower(?)) AS s FROM latest_models "
        "WHERE s >= ? ORDER BY s DESC, repo_id LIMIT ?",
        [repo_id, _SIMILARITY, _MAX_SUGGESTIONS],
    ).fetchall()
    return tuple(r[0] for r in rows)


# Point lookups filter the parts on a key column *before* picking the latest version of each key, so
# DuckDB prunes row groups by their min/max statistics (parts are written sorted by key) instead of
# ranking every version of every row: on a 1,000,000-model store the whole `index query` process went
# from 4.0 s to the figure in bench/RESULTS.md. Filtering on a non-key column (a parent) first finds
# the keys that ever had that value, then re-checks their latest version.

_LATEST_EDGES = (f"SELECT * FROM edges_parts WHERE repo_id IN ({{keys}}) "
                 f"QUALIFY row_number() OVER (PARTITION BY repo_id ORDER BY {SEQ} DESC) = 1")


def _edge_rows(con: duckdb.DuckDBPyConnection, keys_sql: str, params: list[Any]) -> list[dict[str, Any]]:
    """The live latest edges rows of the repo ids `keys_sql` selects."""
    rows = _rows(con, _LATEST_EDGES.format(keys=keys_sql), params)
    return [r for r in rows if not r[DELETED]]


def _edge_of(con: duckdb.DuckDBPyConnection, repo_id: str) -> dict[str, Any] | None:
    found = _edge_rows(con, "?", [repo_id])
    return found[0] if found else None


def _cluster_of(con: duckdb.DuckDBPyConnection, cluster: str) -> dict[str, dict[str, Any]]:
    """The live edges rows of one cluster (a tree), by repo id: its ancestry, children and siblings in one read."""
    rows = _edge_rows(con, "SELECT DISTINCT repo_id FROM edges_parts WHERE cluster = ?", [cluster])
    return {r["repo_id"]: r for r in rows if r["cluster"] == cluster}


def _latest_model(con: duckdb.DuckDBPyConnection, repo_id: str) -> dict[str, Any] | None:
    rows = _rows(con, f"SELECT * FROM models_parts WHERE repo_id = ? "
                      f"QUALIFY row_number() OVER (PARTITION BY repo_id, revision ORDER BY {SEQ} DESC) = 1", [repo_id])
    live = [r for r in rows if not r[DELETED]]
    return max(live, key=lambda r: (r["indexed_at"], r[SEQ])) if live else None


def _ancestry(con: duckdb.DuckDBPyConnection, edge: dict[str, Any], tree: dict[str, dict[str, Any]]) -> tuple[AncestryStep, ...]:
    steps: list[AncestryStep] = []
    seen = {edge["repo_id"]}
    while edge is not None and edge["parent"]:
        steps.append(AncestryStep(edge["repo_id"], edge["parent"], edge["distance"], edge["direction_score"],
                                  edge["confidence"], _relation(edge), _parents(edge)))
        if edge["parent"] in seen:
            logger.warning("cycle in the stored forest at %s; the chain stops there", edge["parent"])
            break
        seen.add(edge["parent"])
        edge = tree.get(edge["parent"]) or _edge_of(con, edge["parent"])  # a parent outside the tree: stored mid-update
    return tuple(steps)


def _report(con: duckdb.DuckDBPyConnection, repo_id: str) -> ModelReport:
    m = _latest_model(con, repo_id)
    if m is None:
        raise UnknownModelError(repo_id, _suggest(con, repo_id))
    e = _edge_of(con, repo_id)
    parent = e["parent"] if e else None
    tree = _cluster_of(con, e["cluster"]) if e else {}
    children = tuple(sorted(r for r, row in tree.items() if row["parent"] == repo_id))
    siblings = tuple(sorted(r for r, row in tree.items() if parent and row["parent"] == parent and r != repo_id))
    declared = m["declared_base_model"] or ""
    relation = _relation(e) if e else None
    return ModelReport(
        # the edge's family first, as `export` takes it: an adapter that arrived before its base has none
        # in its models row, and joins the base's family when the base comes
        repo_id=repo_id, revision=e["revision"] if e else m["revision"], family=(e or {}).get("family") or m["family"] or "",
        status=m["status"], reason=m["reason"] or "", source=m["source"] or "",
        created_at=m["created_at"], indexed_at=m["indexed_at"], in_forest=e is not None,
        cluster=e["cluster"] if e else None, root=e["root"] if e else None, depth=e["depth"] if e else None,
        parent=parent, ancestry=_ancestry(con, e, tree) if e else (), children=children, siblings=siblings,
        declared_base_model=declared, declared_relation=m["declared_relation"] or "",
        agrees_with_declared=agrees_with_declared(declared, parent),
        relation=relation, parents=_parents(e) if e else (),
        relation_agrees_with_declared=relation_agrees_with_declared(declared, m["declared_relation"] or "", relation),
        child_relations=tuple(_relation(tree[c]) for c in children),
        weights_format=m.get("weights_format") or "", details=m.get("details") or "{}",
    )


def query_model(home: Path, repo_id: str) -> ModelReport:
    """Everything the index knows about one repo. UnknownModelError (with near matches) if none."""
    return _with_store(home, lambda con: _report(con, repo_id))


# --- export ----------------------------------------------------------------------------------------

EXPORT_SQL = f"""
SELECT m.repo_id, coalesce(e.revision, m.revision) AS revision, coalesce(e.family, m.family) AS family,
       e.cluster, e.parent, e.relation, e.parents, e.root, e.depth, e.distance, e.direction_score, e.confidence,
       m.declared_base_model, m.declared_relation, {_AGREES_SQL} AS agrees_with_declared,
       {_RELATION_AGREES_SQL} AS relation_agrees_with_declared, m.weights_format,
       m.created_at, m.indexed_at
FROM latest_models m LEFT JOIN edges e ON e.repo_id = m.repo_id
WHERE m.status = 'indexed' OR e.repo_id IS NOT NULL
ORDER BY family, e.cluster NULLS LAST, e.depth NULLS LAST, m.repo_id
"""


def export_forest(home: Path, out_path: Path) -> int:
    """Write the forest (one row per indexed model) to `out_path` as Parquet; returns the row count.

    Columns: repo_id, revision, family, cluster, parent, relation, parents (a list of struct<repo_id,
    weight>), root, depth, distance, direction_score, confidence, declared_base_model, declared_relation,
    agrees_with_declared, relation_agrees_with_declared, weights_format, created_at, indexed_at.
    Models never placed (e.g. failed) are left out; `index stats` counts them. Rows are sorted by
    (family, cluster, depth, repo_id) and written by one thread, so equal stores give equal bytes.
    """
    out = Path(out_path)
    if out.is_dir():
        raise StoreError(f"{out} is a folder; give a file name such as {out / 'forest.parquet'}")
    out.parent.mkdir(parents=True, exist_ok=True)

    def work(con: duckdb.DuckDBPyConnection) -> int:
        con.execute("SET threads = 1")  # one writer thread: row groups in a fixed order
        count = int(_scalar(con, f"SELECT count(*) FROM ({EXPORT_SQL})"))
        atomic_write_with(out, lambda tmp: con.execute(
            f"COPY ({EXPORT_SQL}) TO '{str(tmp).replace(chr(39), chr(39) * 2)}' (FORMAT parquet)"))
        return count

    count = _with_store(home, work)
    logger.info("exported %d models to %s", count, out)
    return count


# --- stats -----------------------------------------------------------------------------------------


def _counts(con: duckdb.DuckDBPyConnection, sql: str) -> dict[str, int]:
    return {str(k): int(v) for k, v in con.execute(sql).fetchall()}


def _bytes_on_disk(home: Path) -> int:
    return sum(p.stat().st_size for p in sorted(Path(home).rglob("*")) if p.is_file())


def _stats(con: duckdb.DuckDBPyConnection, home: Path) -> dict[str, Any]:
    cursors = _rows(con, "SELECT endpoint, cursor_created_at, cursor_id FROM crawl_state ORDER BY endpoint")
    return {
        "home": str(home),
        "models": int(_scalar(con, "SELECT count(*) FROM latest_models")),
        "by_status": _counts(con, "SELECT status, count(*) FROM latest_models GROUP BY 1 ORDER BY 1"),
        "by_family": _counts(con, "SELECT family, count(*) FROM latest_models GROUP BY 1 ORDER BY 1"),
        "failures_by_reason": _counts(con, "SELECT reason, count(*) FROM latest_models "
                                           "WHERE status <> 'indexed' GROUP BY 1 ORDER BY 2 DESC, 1"),
        "edges": int(_scalar(con, "SELECT count(*) FROM edges WHERE parent <> ''")),
        "edges_by_relation": _counts(con, "SELECT coalesce(relation, 'finetune'), count(*) FROM edges "
                                          "WHERE parent <> '' GROUP BY 1 ORDER BY 1"),
        "roots": int(_scalar(con, "SELECT count(*) FROM edges WHERE parent = ''")),
        "clusters": int(_scalar(con, "SELECT count(DISTINCT (family, cluster)) FROM edges")),
        "clusters_by_family": _counts(con, "SELECT family, count(DISTINCT cluster) FROM edges GROUP BY 1 ORDER BY 1"),
        "sketches": int(_scalar(con, "SELECT count(*) FROM sketches")),
        "candidates": int(_scalar(con, "SELECT count(*) FROM candidates")),
        "crawl_cursors": {r["endpoint"]: {"created_at": r["cursor_created_at"].isoformat(), "id": r["cursor_id"]}
                          for r in cursors},
        "parts": {t: len(list_parts(home, t)) for t in TABLES},
        "bytes_on_disk": _bytes_on_disk(home),
        "bytes_in_tables": _bytes_on_disk(Path(home) / TABLES_DIR),
    }


def store_stats(home: Path) -> dict[str, Any]:
    """Counts for `index stats` (a JSON-ready dict with sorted keys inside each count)."""
    return _with_store(home, lambda con: _stats(con, Path(home)))
