"""The steps of `store.format.MIGRATIONS` that rewrite Parquet parts (pyarrow: kept out of `store.format`,
which the light read side imports).

v1 -> v2 (relations): `edges` gains `relation` and `parents`, `models` gains `weights_format` and
`details`. Every v1 edge with a parent was a plain fine-tune (relations did not exist), so it becomes
relation "finetune", parents [(parent, 1.0)]; a root gets "" and []. v1 models read safetensors only:
weights_format "safetensors" for an indexed row, "" otherwise; details "{}". Each part is rewritten in
place (same name, same `_seq`, temp file + fsync + rename), and the content hash of each live row is
recomputed over the new columns, so re-saving an unchanged edge after the migration still writes
nothing. A part that already has the columns is left alone: a crash mid-way resumes at the next part.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from store.atomic import atomic_open
from store.layout import DELETED, HASH, list_parts
from store.schema import TableSpec, content_hash, spec_of
from store.tables import ROW_GROUP_ROWS

logger = logging.getLogger(__name__)

Fill = Callable[[dict[str, Any]], dict[str, Any]]  # a v1 row (user columns) -> its new columns


def _edges_v2(row: dict[str, Any]) -> dict[str, Any]:
    parent = row.get("parent") or ""
    return {"relation": "finetune" if parent else "",
            "parents": [{"repo_id": parent, "weight": 1.0}] if parent else []}


def _models_v2(row: dict[str, Any]) -> dict[str, Any]:
    return {"weights_format": "safetensors" if row.get("status") == "indexed" else "", "details": "{}"}


def _rewrite_part(path: Path, spec: TableSpec, fill: Fill) -> bool:
    """Add the missing columns to one part; False when it already has them (a resumed migration)."""
    old = pq.read_table(path)
    if set(spec.stored_schema.names) <= set(old.column_names):
        return False
    user = [f.name for f in spec.schema]
    rows = []
    for row in old.to_pylist():
        if not row[DELETED]:
            row |= fill(row)
            record = spec.record(**{k: tuple(v) if isinstance(v, list) else v for k, v in row.items() if k in user})
            row[HASH] = content_hash(spec, record)  # the hash covers the new columns too
        rows.append(row)
    meta = dict(old.schema.metadata or {}) | {b"model-graph-index.format": b"2"}
    table = pa.Table.from_pylist(rows, schema=spec.stored_schema).replace_schema_metadata(meta)
    with atomic_open(path) as fh:  # same name: a reader sees the old part or the new one, whole
        pq.write_table(table, fh, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    return True


def v1_to_v2(home: Path) -> None:
    """Format v1 -> v2: relations on edges, weights format and details on models (module docstring)."""
    for table, fill in (("edges", _edges_v2), ("models", _models_v2)):
        spec = spec_of(table)
        done = sum(_rewrite_part(path, spec, fill) for _, path in list_parts(home, table))
        logger.info("%s: %d parts given the format v2 columns", table, done)
