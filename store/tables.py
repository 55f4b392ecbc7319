"""Parquet tables as folders of immutable part files, with latest-wins rows, tombstones and compaction.

Layout under `home` (format v1, see `store.format`)::

    FORMAT                         {"format": "model-graph-index", "version": 1}
    .lock                          the writer's flock + pid (store.lock)
    tables/<table>/part-<seq:012d>-<8 hex>.parquet    immutable parts (schemas: store.schema)
    tables/<table>/.tmp-*          a killed writer's leftovers: never read, removed on the next open
    vectors/                       FAISS per family (store.vectors); its .tmp-* are cleaned here too

Writes (`Store.append`): 1. drop rows whose content hash equals the stored row for their key
(idempotent: an unchanged re-write writes nothing); 2. write the rest, sorted by key, to one temp file
in the table folder, flush + fsync; 3. `os.replace` it to `part-<seq>-...` with seq = max existing + 1;
4. fsync the folder. Readers list `part-*.parquet` only, so they see a part completely or not at all.

Reads: the row with the largest `_seq` per key wins; a winning tombstone (`_deleted`) hides the key.
Within one part a key appears once (the writer keeps the last occurrence of a batch).

Compaction (more than `compact_after` parts, default 64): write the latest row per key (tombstoned
keys dropped) as a new part with seq = max + 1, keeping each row's original `_seq`; then delete the
old parts in *ascending* seq order. A crash in between leaves duplicates that carry the same `_seq`
and content (harmless), and deleting oldest-first means the newest version of every key, tombstones
included, is the last old copy to go: no deleted key can come back.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from errors import BadInputError, StoreError
from store.atomic import TMP_PREFIX, atomic_open, fsync_dir, remove_temp_leftovers
from store.format import FORMAT_VERSION, MIGRATIONS, Migration, ensure_format
from store.layout import TABLES_DIR, latest_sql, list_parts, parquet_source, table_dir  # noqa: F401 -- re-exported
from store.lock import WriteLock
from store.schema import (
    DELETED,
    HASH,
    SEQ,
    TABLES,
    Record,
    TableName,
    TableSpec,
    content_hash,
    key_of,
    record_to_row,
    rows_to_records,
    spec_of,
    to_record,
)

logger = logging.getLogger(__name__)

VECTORS_DIR = "vectors"  # owned by store.vectors; named here so the writer can clean its temp files
DEFAULT_COMPACT_AFTER = 64  # parts; a crawl appends ~1 part per batch, so compaction runs rarely
ROW_GROUP_ROWS = 8192  # parts are sorted by key: small row groups let a point lookup skip the rest by min/max
# (a 200,000-row part as one row group: 65 ms per lookup on the 1M-model store; as 8,192-row groups: 15 ms)
_READ_RETRIES = 5  # a reader racing a compaction re-lists the parts and tries again


def empty_table(spec: TableSpec) -> pa.Table:
    return spec.stored_schema.empty_table()


def _query_parts(spec: TableSpec, paths: Sequence[Path], *, live_only: bool, columns: Sequence[str] | None,
                 where: Mapping[str, Any] | None) -> pa.Table:
    select = ", ".join(columns) if columns else "*"
    sql = f"SELECT {select} FROM ({latest_sql(spec.name, parquet_source(paths), live_only=live_only)})"
    params: list[Any] = []
    if where:
        sql += " WHERE " + " AND ".join(f"{name} = ?" for name in sorted(where))
        params = [where[name] for name in sorted(where)]
    sql += " ORDER BY " + ", ".join(spec.key)  # deterministic
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone='UTC'")
        return con.sql(sql, params=params).to_arrow_table()
    finally:
        con.close()


def read_table(
    home: Path,
    table: str,
    *,
    with_meta: bool = False,
    live_only: bool = True,
    columns: Sequence[str] | None = None,
    where: Mapping[str, Any] | None = None,
) -> pa.Table:
    """The logical table: latest row per key, sorted by key. Needs no lock and sees whole parts only.

    `where` filters on equality (after deduplication); `columns` picks columns (default: the user
    columns, plus `_seq`, `_deleted`, `_hash` when `with_meta`).
    """
    spec = spec_of(table)
    wanted = list(columns) if columns else [f.name for f in (spec.stored_schema if with_meta else spec.schema)]
    for _ in range(_READ_RETRIES):
        parts = [p for _, p in list_parts(home, table)]
        if not parts:
            return empty_table(spec).select(wanted)
        try:
            result = _query_parts(spec, parts, live_only=live_only, columns=wanted, where=where)
        except duckdb.IOException as exc:
            if all(p.exists() for p in parts):
                raise StoreError(f"{table_dir(home, table)}: cannot read parts ({exc})") from exc
            logger.debug("parts of %s changed under us (compaction); re-listing", table)
            continue
        target = pa.schema([spec.stored_schema.field(n) for n in wanted])
        return result.cast(target)
    raise StoreError(f"{table_dir(home, table)}: parts kept changing while reading; try again")


def read_records(home: Path, table: str, **where: Any) -> list[Record]:
    """The live rows as records (see `store.schema`), sorted by key."""
    return rows_to_records(spec_of(table), read_table(home, table, where=where or None))


def _write_part(folder: Path, spec: TableSpec, seq: int, rows: list[dict[str, Any]]) -> Path:
    table = pa.Table.from_pylist(rows, schema=spec.stored_schema)
    table = table.replace_schema_metadata(
        {"model-graph-index.format": str(FORMAT_VERSION), "model-graph-index.table": spec.name}
    )
    target = folder / f"part-{seq:012d}-{uuid.uuid4().hex[:8]}.parquet"
    with atomic_open(target) as fh:
        pq.write_table(table, fh, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    return target


class Store:
    """The writer side. Holds the store's write lock from `open()` to `close()`.

    >>> with Store.open(home) as store:
    ...     store.append("models", [record])
    """

    def __init__(self, home: Path, *, compact_after: int = DEFAULT_COMPACT_AFTER) -> None:
        if compact_after < 1:
            raise BadInputError("compact_after", f"must be at least 1, got {compact_after}")
        self.home = Path(home)
        self.compact_after = compact_after
        self._lock = WriteLock(self.home)
        # key -> (content hash, is tombstone): lets append skip unchanged rows without re-reading.
        self._state: dict[str, dict[tuple[Any, ...], tuple[str, bool]]] = {}
        self._dims: dict[str, int] | None = None  # family -> sketch vector length

    @classmethod
    def open(
        cls,
        home: Path,
        *,
        compact_after: int = DEFAULT_COMPACT_AFTER,
        target_version: int = FORMAT_VERSION,
        migrations: Mapping[int, Migration] = MIGRATIONS,
    ) -> Store:
        """Take the lock (StoreLockedError if taken), create or migrate, clean temp leftovers."""
        store = cls(home, compact_after=compact_after)
        store._lock.acquire()
        try:
            ensure_format(store.home, target=target_version, migrations=migrations)
            for table in TABLES:
                folder = table_dir(store.home, table)
                folder.mkdir(parents=True, exist_ok=True)
                remove_temp_leftovers(folder)
            remove_temp_leftovers(store.home / VECTORS_DIR)
        except BaseException:
            store._lock.release()
            raise
        return store

    def close(self) -> None:
        self._lock.release()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _require_lock(self) -> None:
        if not self._lock.held:
            raise StoreError(f"{self.home}: store is closed; open it with Store.open() to write")

    def _table_state(self, table: str) -> dict[tuple[Any, ...], tuple[str, bool]]:
        if table not in self._state:
            spec = spec_of(table)
            current = read_table(self.home, table, live_only=False, columns=[*spec.key, HASH, DELETED])
            keys = zip(*(current.column(k).to_pylist() for k in spec.key), strict=True)
            states = zip(current.column(HASH).to_pylist(), current.column(DELETED).to_pylist(), strict=True)
            self._state[table] = {tuple(k): (h, bool(d)) for k, (h, d) in zip(keys, states, strict=True)}
        return self._state[table]

    def _next_seq(self, table: str) -> int:
        parts = list_parts(self.home, table)
        return parts[-1][0] + 1 if parts else 1

    def append(self, table: TableName, rows: Iterable[Record | Mapping[str, Any]]) -> int:
        """Write the rows that differ from what is stored as one part; returns how many were written."""
        self._require_lock()
        spec = spec_of(table)
        batch: dict[tuple[Any, ...], Record] = {}
        for row in rows:
            record = to_record(spec, row)
            batch[key_of(spec, record)] = record  # the last occurrence of a key wins
        if table == "sketches":
            self._check_dims(batch.values())
        state = self._table_state(table)
        changed: list[tuple[tuple[Any, ...], str, Record]] = []
        for key in sorted(batch):  # deterministic part contents
            digest = content_hash(spec, batch[key])
            if state.get(key) != (digest, False):
                changed.append((key, digest, batch[key]))
        if not changed:
            logger.debug("%s: %d rows unchanged, nothing written", table, len(batch))
            return 0
        seq = self._next_seq(table)
        rows_out = [record_to_row(r) | {SEQ: seq, DELETED: False, HASH: d} for _, d, r in changed]
        path = _write_part(table_dir(self.home, table), spec, seq, rows_out)
        state.update({key: (digest, False) for key, digest, _ in changed})
        logger.info("%s: wrote %d rows to %s", table, len(changed), path.name)
        self.compact(table)
        return len(changed)

    def delete(self, table: TableName, keys: Iterable[tuple[Any, ...]]) -> int:
        """Tombstone the live keys among `keys` (e.g. an edge that left the forest); returns how many."""
        self._require_lock()
        spec = spec_of(table)
        state = self._table_state(table)
        doomed = sorted({tuple(k) for k in keys if (s := state.get(tuple(k))) is not None and not s[1]})
        if not doomed:
            return 0
        seq = self._next_seq(table)
        rows = [dict(zip(spec.key, k, strict=True)) | {SEQ: seq, DELETED: True, HASH: ""} for k in doomed]
        _write_part(table_dir(self.home, table), spec, seq, rows)
        state.update({k: ("", True) for k in doomed})
        self.compact(table)
        return len(doomed)

    def contains(self, table: TableName, key: tuple[Any, ...]) -> bool:
        state = self._table_state(table).get(tuple(key))
        return state is not None and not state[1]

    def get(self, table: TableName, key: tuple[Any, ...]) -> Record | None:
        spec = spec_of(table)
        if not self.contains(table, key):
            return None
        found = read_records(self.home, table, **dict(zip(spec.key, key, strict=True)))
        return found[0] if found else None

    def read(self, table: TableName) -> pa.Table:
        return read_table(self.home, table)

    def records(self, table: TableName) -> list[Record]:
        return read_records(self.home, table)

    def compact(self, table: TableName, *, force: bool = False) -> bool:
        """Merge all parts into one when there are more than `compact_after` (or `force`)."""
        self._require_lock()
        parts = list_parts(self.home, table)
        if len(parts) <= 1 or (len(parts) <= self.compact_after and not force):
            return False
        spec = spec_of(table)
        merged = read_table(self.home, table, with_meta=True)  # live rows, original _seq and hash
        folder = table_dir(self.home, table)
        if merged.num_rows:
            _write_part(folder, spec, parts[-1][0] + 1, merged.to_pylist())
        for _, old in parts:  # ascending seq: see the module docstring for why the order matters
            old.unlink()
        fsync_dir(folder)
        logger.info("%s: compacted %d parts into %d", table, len(parts), 1 if merged.num_rows else 0)
        return True

    def _check_dims(self, records: Iterable[Record]) -> None:
        if self._dims is None:
            self._dims = sketch_dims(self.home)
        dims = dict(self._dims)  # committed only if the whole batch agrees
        for record in sorted(records, key=lambda r: (r.family, r.repo_id)):  # type: ignore[union-attr]
            dim = len(record.vector)  # type: ignore[union-attr]
            known = dims.setdefault(record.family, dim)  # type: ignore[union-attr]
            if dim != known:
                raise BadInputError(
                    f"sketch of {record.repo_id}",  # type: ignore[union-attr]
                    f"vector has {dim} values but family {record.family!r} uses {known}; "  # type: ignore[union-attr]
                    f"bump sketch_version and rebuild the family instead of mixing lengths",
                )
        self._dims = dims


def sketch_dims(home: Path) -> dict[str, int]:
    """family -> vector length over the live sketches (a family uses one length)."""
    table = read_table(home, "sketches", columns=["family", "vector"])
    dims: dict[str, int] = {}
    lengths = pc.list_value_length(table.column("vector")).to_pylist()
    for family, n in zip(table.column("family").to_pylist(), lengths, strict=True):
        dims.setdefault(family, n)
    return dict(sorted(dims.items()))


def open_store(home: Path, **kwargs: Any) -> Store:
    """Shorthand for `Store.open(home, ...)`; use as a context manager."""
    return Store.open(home, **kwargs)


__all__ = [
    "DEFAULT_COMPACT_AFTER", "TABLES_DIR", "TMP_PREFIX", "VECTORS_DIR", "Store", "empty_table", "latest_sql",
    "list_parts", "open_store", "parquet_source", "read_records", "read_table", "sketch_dims",
    "table_dir",
]
