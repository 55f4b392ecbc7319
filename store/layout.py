"""The store's files as the read side sees them: table folders, part names, key columns, SQL column types.

Imports nothing heavy (no pyarrow, no numpy): `index query` goes through this module and DuckDB only,
because pyarrow (with the numpy it loads) was 116 ms and pyarrow.compute 40 ms of a whole `index query`
process whose target is 300 ms (measured with `python -X importtime`). `store.schema` holds the same
tables as pyarrow schemas and records; tests/test_store_tables.py checks that the two agree.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, get_args

from errors import BadInputError

TABLES_DIR = "tables"
TableName = Literal["models", "sketches", "candidates", "edges", "crawl_state"]
TABLES: tuple[TableName, ...] = get_args(TableName)
SEQ, DELETED, HASH = "_seq", "_deleted", "_hash"
PART = re.compile(r"^part-(\d{12})-[0-9a-f]{8}\.parquet$")

KEYS: dict[str, tuple[str, ...]] = {
    "models": ("repo_id", "revision"), "sketches": ("repo_id", "revision"),
    "candidates": ("family", "parent", "child"), "edges": ("repo_id",), "crawl_state": ("endpoint",),
}
_META = ((SEQ, "BIGINT"), (DELETED, "BOOLEAN"), (HASH, "VARCHAR"))
_V, _TS, _D = "VARCHAR", "TIMESTAMPTZ", "DOUBLE"
PARENTS_SQL = "STRUCT(repo_id VARCHAR, weight DOUBLE)[]"  # edges.parents (format v2)
COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {  # stored order, the bookkeeping columns last
    "models": (("repo_id", _V), ("revision", _V), ("family", _V), ("status", _V), ("indexed_at", _TS),
               ("created_at", _TS), ("last_modified", _TS), ("reason", _V), ("declared_base_model", _V),
               ("declared_relation", _V), ("library", _V), ("pipeline_tag", _V), ("n_parameters", "BIGINT"),
               ("bytes_read", "BIGINT"), ("source", _V), ("weights_format", _V), ("details", _V), *_META),
    "sketches": (("repo_id", _V), ("revision", _V), ("family", _V), ("sketch_version", "INTEGER"),
                 ("vector", "FLOAT[]"), ("kurtosis", "DOUBLE[]"), ("norms", "DOUBLE[]"), ("layer_names", "VARCHAR[]"),
                 ("stats", _V), *_META),
    "candidates": (("family", _V), ("parent", _V), ("child", _V), ("distance", _D), ("direction", _D),
                   ("weight", _D), *_META),
    "edges": (("repo_id", _V), ("revision", _V), ("family", _V), ("cluster", _V), ("parent", _V), ("root", _V),
              ("depth", "INTEGER"), ("distance", _D), ("direction_score", _D), ("confidence", _D),
              ("updated_at", _TS), ("relation", _V), ("parents", PARENTS_SQL), *_META),
    "crawl_state": (("endpoint", _V), ("cursor_created_at", _TS), ("cursor_id", _V), ("updated_at", _TS),
                    ("run_id", _V), *_META),
}


def check_table(table: str) -> str:
    if table not in TABLES:
        raise BadInputError(f"table {table!r}", f"expected one of {', '.join(TABLES)}")
    return table


def table_dir(home: Path, table: str) -> Path:
    return Path(home) / TABLES_DIR / check_table(table)


def list_parts(home: Path, table: str) -> list[tuple[int, Path]]:
    """(seq, path) of every complete part, oldest first. Temp files never match the pattern."""
    folder = table_dir(home, table)
    if not folder.is_dir():
        return []
    parts = [(int(m.group(1)), p) for p in folder.iterdir() if (m := PART.match(p.name))]
    return sorted(parts)  # deterministic


def _quote(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def parquet_source(paths: Sequence[Path]) -> str:
    """A DuckDB table expression over the given parts (old parts may lack newer columns)."""
    files = ", ".join(_quote(p) for p in paths)
    return f"read_parquet([{files}], union_by_name=true)"


def latest_sql(table: str, source: str, *, live_only: bool = True) -> str:
    """SQL for the latest version of each key of `source`; tombstones removed when `live_only`."""
    keys = ", ".join(KEYS[check_table(table)])
    latest = f"SELECT * FROM {source} QUALIFY row_number() OVER (PARTITION BY {keys} ORDER BY {SEQ} DESC) = 1"
    return f"SELECT * FROM ({latest}) WHERE NOT {DELETED}" if live_only else latest


def empty_select(table: str) -> str:
    """A typed, empty table as plain SQL (no Arrow table registered: DuckDB would import pandas for it)."""
    columns = ", ".join(f"CAST(NULL AS {sql}) AS {name}" for name, sql in COLUMNS[check_table(table)])
    return f"SELECT {columns} WHERE false"
