"""The five tables of the store: their records (frozen dataclasses), Arrow schemas and keys.

Every table is a folder of immutable Parquet part files (see `store.tables`). A *logical* row is the
latest stored version of its key; a tombstone (``_deleted = true``) hides the key. Columns, in file
order (every user column is nullable only so that tombstones can leave it empty):

``models`` -- key (repo_id, revision); one row per model revision we looked at, whatever happened.
    repo_id str | revision str (40 hex, or "local:<hash>") | family str ("" when unknown) |
    status str ("indexed" | "skipped" | "failed") | indexed_at timestamp[us, UTC] |
    created_at timestamp[us, UTC] (null if unknown) | last_modified timestamp[us, UTC] (null) |
    reason str ("" when indexed) | declared_base_model str ("" if none; ";"-joined for merges) |
    declared_relation str | library str | pipeline_tag str | n_parameters int64 | bytes_read int64 |
    source str (the endpoint URL, or "local") | weights_format str ("safetensors" | "adapter" | "gguf" |
    "gptq" | "awq" | "bnb-int8" | "bnb-4bit" | "fp8" | "compressed-tensors"; "" when unknown or not read) |
    details str (a JSON object: an adapter's base, r, alpha, targets, modules_to_save; a quantized
    model's scheme and predicted error).  [format v2]
    Failures live here too: a row with status "failed" or "skipped" and the reason. No separate
    failures table: one key space means a later success simply supersedes the failure.
``sketches`` -- key (repo_id, revision).
    repo_id str | revision str | family str | sketch_version int32 | vector list<float32> (one length
    per family) | kurtosis list<float64> (per selected layer) | norms list<float64> |
    layer_names list<str> | stats str (a JSON object for extras).
``candidates`` -- key (family, parent, child): the candidate graph lineage runs the MDST on.
    family str | parent str (repo_id) | child str (repo_id) | distance float64 | direction float64 |
    weight float64.
``edges`` -- key (repo_id): the current forest, one node per repo (a new revision replaces the old).
    repo_id str | revision str | family str | cluster str | parent str ("" for roots) | root str |
    depth int32 | distance float64 | direction_score float64 | confidence float64 |
    updated_at timestamp[us, UTC] | relation str (RELATIONS; "" for roots) |
    parents list<struct<repo_id str, weight float64>> (every parent with its estimated weight, heaviest
    first: one for finetune / adapter / quantized / duplicate, several for a merge; `parent` is the first;
    empty for roots).  [format v2]
    A parent that is not indexed (an adapter's declared base that is not on this index) is kept by name:
    `parent` names it, and no edges row of its own exists.
``crawl_state`` -- key (endpoint): the crawl high-water mark.
    endpoint str | cursor_created_at timestamp[us, UTC] | cursor_id str | updated_at timestamp[us, UTC] |
    run_id str.

Hidden columns appended to every part: ``_seq`` int64 (the part's sequence number: larger wins),
``_deleted`` bool (tombstone), ``_hash`` str (blake2b-128 hex of the row's non-volatile columns,
"" for tombstones; equal hash == nothing to write). *Volatile* columns (timestamps of our own
bookkeeping: models.indexed_at, edges.updated_at, crawl_state.updated_at) are left out of the hash,
so re-indexing the same revision, or re-saving an unchanged edge, is a no-op.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple, get_args

import numpy as np
import pyarrow as pa

from errors import BadInputError
from store.layout import DELETED, HASH, SEQ, TABLES, TableName  # noqa: F401 -- re-exported

Status = Literal["indexed", "skipped", "failed"]
STATUSES: tuple[Status, ...] = get_args(Status)
# The Hub's model-tree relations (`base_model_relation`) plus `duplicate` (bit-identical compared weights).
Relation = Literal["finetune", "adapter", "quantized", "merge", "duplicate"]
RELATIONS: tuple[Relation, ...] = get_args(Relation)


class ParentLink(NamedTuple):
    """One parent of an edge and its estimated share of the child (1.0 for a single parent)."""

    repo_id: str
    weight: float

META_FIELDS = (pa.field(SEQ, pa.int64()), pa.field(DELETED, pa.bool_()), pa.field(HASH, pa.string()))

_REVISION = re.compile(r"^(?:[0-9a-f]{40}|local:[0-9A-Za-z]+)$")
_TS = pa.timestamp("us", tz="UTC")


def _utc(name: str, value: datetime | None, *, required: bool) -> datetime | None:
    if value is None:
        if required:
            raise BadInputError(name, "a timestamp is required")
        return None
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise BadInputError(name, f"{value!r} must be a timezone-aware datetime (use UTC)")
    return value.astimezone(UTC)


def _floats32(value: Any) -> tuple[float, ...]:
    """Round to float32 now, so that what the caller holds equals what a reader gets back."""
    return tuple(float(x) for x in np.asarray(value, dtype=np.float32).ravel())


def _floats64(value: Any) -> tuple[float, ...]:
    return tuple(float(x) for x in np.asarray(value, dtype=np.float64).ravel())


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)  # frozen dataclass: normalise in __post_init__ only


def _check_json(thing: str, column: str, value: str) -> None:
    try:
        ok = isinstance(json.loads(value), dict)
    except (TypeError, ValueError) as exc:
        raise BadInputError(thing, f"{column} must be a JSON string ({exc})") from None
    if not ok:
        raise BadInputError(thing, f"{column} must be a JSON object, got {value!r:.40}")


def _parent_links(thing: str, value: Any) -> tuple[ParentLink, ...]:
    """Tuples, mappings (what Arrow gives back) or ParentLinks -> ParentLinks, validated."""
    links = []
    for item in value or ():
        try:
            repo, weight = (item.get("repo_id"), item.get("weight")) if isinstance(item, Mapping) else tuple(item)
        except (TypeError, ValueError):
            raise BadInputError(thing, f"a parent is (repo_id, weight), got {item!r:.60}") from None
        if not isinstance(repo, str) or not repo:
            raise BadInputError(thing, f"a parent needs a repo id, got {item!r:.60}")
        if not isinstance(weight, int | float) or not math.isfinite(weight) or weight < 0:
            raise BadInputError(thing, f"parent {repo}: weight must be a finite number >= 0, got {weight!r}")
        links.append(ParentLink(repo, float(weight)))
    return tuple(links)


def _check_revision(revision: str) -> None:
    if not isinstance(revision, str) or not _REVISION.match(revision):
        raise BadInputError(f"revision {revision!r}", 'expected a 40-hex commit sha or "local:<hash>"')


@dataclass(frozen=True)
class ModelRecord:
    repo_id: str
    revision: str
    family: str
    status: Status
    indexed_at: datetime
    created_at: datetime | None = None
    last_modified: datetime | None = None
    reason: str = ""
    declared_base_model: str = ""
    declared_relation: str = ""
    library: str = ""
    pipeline_tag: str = ""
    n_parameters: int = 0
    bytes_read: int = 0
    source: str = "local"
    weights_format: str = ""
    details: str = "{}"

    def __post_init__(self) -> None:
        _check_revision(self.revision)
        _check_json(self.repo_id, "details", self.details)
        if self.status not in STATUSES:
            raise BadInputError(f"status {self.status!r}", f"expected one of {', '.join(STATUSES)}")
        if self.status != "indexed" and not self.reason:
            raise BadInputError(self.repo_id, f"a {self.status} model needs a reason")
        _set(self, "indexed_at", _utc("indexed_at", self.indexed_at, required=True))
        _set(self, "created_at", _utc("created_at", self.created_at, required=False))
        _set(self, "last_modified", _utc("last_modified", self.last_modified, required=False))


@dataclass(frozen=True)
class SketchRecord:
    repo_id: str
    revision: str
    family: str
    sketch_version: int
    vector: tuple[float, ...]
    kurtosis: tuple[float, ...] = ()
    norms: tuple[float, ...] = ()
    layer_names: tuple[str, ...] = ()
    stats: str = "{}"

    def __post_init__(self) -> None:
        _check_revision(self.revision)
        _set(self, "vector", _floats32(self.vector))
        if not self.vector:
            raise BadInputError(self.repo_id, "a sketch needs a non-empty vector")
        _set(self, "kurtosis", _floats64(self.kurtosis))
        _set(self, "norms", _floats64(self.norms))
        _set(self, "layer_names", tuple(str(n) for n in self.layer_names))
        _check_json(self.repo_id, "stats", self.stats)


@dataclass(frozen=True)
class CandidateRecord:
    family: str
    parent: str
    child: str
    distance: float
    direction: float
    weight: float


@dataclass(frozen=True)
class EdgeRecord:
    repo_id: str
    revision: str
    family: str
    cluster: str
    parent: str  # "" for a root
    root: str
    depth: int
    distance: float
    direction_score: float
    confidence: float
    updated_at: datetime
    relation: str = ""  # filled in below: "finetune" when there is a parent and no relation was given
    parents: tuple[ParentLink, ...] = ()  # filled in below: ((parent, 1.0),) when there is a parent

    def __post_init__(self) -> None:
        _check_revision(self.revision)
        if self.parent == self.repo_id:
            raise BadInputError(self.repo_id, "a model cannot be its own parent")
        _set(self, "updated_at", _utc("updated_at", self.updated_at, required=True))
        _set(self, "parents", _parent_links(self.repo_id, self.parents))
        if not self.parent:
            if self.relation or self.parents:
                raise BadInputError(self.repo_id, "a root has no relation and no parents")
            return
        _set(self, "relation", self.relation or "finetune")
        _set(self, "parents", self.parents or (ParentLink(self.parent, 1.0),))
        if self.relation not in RELATIONS:
            raise BadInputError(f"relation {self.relation!r}", f"expected one of {', '.join(RELATIONS)}")
        if self.parents[0].repo_id != self.parent:
            raise BadInputError(self.repo_id, f"parent {self.parent} must be the first of parents "
                                f"{[p.repo_id for p in self.parents]}")
        if len({p.repo_id for p in self.parents}) != len(self.parents) or self.repo_id in {p.repo_id for p in self.parents}:
            raise BadInputError(self.repo_id, "parents must be distinct and not the model itself")


@dataclass(frozen=True)
class CrawlStateRecord:
    endpoint: str
    cursor_created_at: datetime
    cursor_id: str
    updated_at: datetime
    run_id: str = ""

    def __post_init__(self) -> None:
        _set(self, "cursor_created_at", _utc("cursor_created_at", self.cursor_created_at, required=True))
        _set(self, "updated_at", _utc("updated_at", self.updated_at, required=True))


Record = ModelRecord | SketchRecord | CandidateRecord | EdgeRecord | CrawlStateRecord


@dataclass(frozen=True)
class TableSpec:
    name: TableName
    record: type
    schema: pa.Schema  # user columns only, in record field order
    key: tuple[str, ...]
    volatile: frozenset[str]  # left out of the content hash

    @property
    def stored_schema(self) -> pa.Schema:
        return pa.schema(list(self.schema) + list(META_FIELDS))


def _spec(name: TableName, record: type, types: dict[str, pa.DataType], key: tuple[str, ...],
          volatile: frozenset[str] = frozenset()) -> TableSpec:
    fields = [f.name for f in dataclasses.fields(record)]
    assert fields == list(types), f"{name}: schema and record disagree"  # a programming error
    schema = pa.schema([pa.field(n, t) for n, t in types.items()])
    return TableSpec(name, record, schema, key, volatile)


_S, _I64, _F64 = pa.string(), pa.int64(), pa.float64()
PARENTS_TYPE = pa.list_(pa.struct([pa.field("repo_id", _S), pa.field("weight", _F64)]))
SPECS: dict[TableName, TableSpec] = {
    "models": _spec("models", ModelRecord, {
        "repo_id": _S, "revision": _S, "family": _S, "status": _S, "indexed_at": _TS,
        "created_at": _TS, "last_modified": _TS, "reason": _S, "declared_base_model": _S,
        "declared_relation": _S, "library": _S, "pipeline_tag": _S, "n_parameters": _I64,
        "bytes_read": _I64, "source": _S, "weights_format": _S, "details": _S,
    }, ("repo_id", "revision"), frozenset({"indexed_at"})),
    "sketches": _spec("sketches", SketchRecord, {
        "repo_id": _S, "revision": _S, "family": _S, "sketch_version": pa.int32(),
        "vector": pa.list_(pa.float32()), "kurtosis": pa.list_(_F64), "norms": pa.list_(_F64),
        "layer_names": pa.list_(_S), "stats": _S,
    }, ("repo_id", "revision")),
    "candidates": _spec("candidates", CandidateRecord, {
        "family": _S, "parent": _S, "child": _S, "distance": _F64, "direction": _F64, "weight": _F64,
    }, ("family", "parent", "child")),
    "edges": _spec("edges", EdgeRecord, {
        "repo_id": _S, "revision": _S, "family": _S, "cluster": _S, "parent": _S, "root": _S,
        "depth": pa.int32(), "distance": _F64, "direction_score": _F64, "confidence": _F64,
        "updated_at": _TS, "relation": _S, "parents": PARENTS_TYPE,
    }, ("repo_id",), frozenset({"updated_at"})),
    "crawl_state": _spec("crawl_state", CrawlStateRecord, {
        "endpoint": _S, "cursor_created_at": _TS, "cursor_id": _S, "updated_at": _TS, "run_id": _S,
    }, ("endpoint",), frozenset({"updated_at"})),
}


def spec_of(table: str) -> TableSpec:
    if table not in SPECS:
        raise BadInputError(f"table {table!r}", f"expected one of {', '.join(TABLES)}")
    return SPECS[table]  # type: ignore[index]


def to_record(spec: TableSpec, row: Record | Mapping[str, Any]) -> Record:
    """Accept a record or a mapping of its fields; validation happens in the record's __post_init__."""
    if isinstance(row, spec.record):
        return row  # type: ignore[return-value]
    if isinstance(row, Mapping):
        try:
            return spec.record(**row)  # type: ignore[no-any-return]
        except TypeError as exc:
            raise BadInputError(f"{spec.name} row", str(exc)) from None
    raise BadInputError(f"{spec.name} row", f"expected {spec.record.__name__} or a mapping, got {type(row).__name__}")


def key_of(spec: TableSpec, record: Record) -> tuple[Any, ...]:
    return tuple(getattr(record, k) for k in spec.key)


def _canonical(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, tuple | list):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # JSON has no inf/nan; the repr is unambiguous
    return value


def content_hash(spec: TableSpec, record: Record) -> str:
    payload = {
        f.name: _canonical(getattr(record, f.name))
        for f in dataclasses.fields(record)
        if f.name not in spec.volatile
    }
    data = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.blake2b(data.encode("utf-8"), digest_size=16).hexdigest()


def _cell(value: Any) -> Any:
    if isinstance(value, ParentLink):
        return value._asdict()
    return [_cell(v) for v in value] if isinstance(value, tuple) else value


def record_to_row(record: Record) -> dict[str, Any]:
    return {f.name: _cell(getattr(record, f.name)) for f in dataclasses.fields(record)}


def rows_to_records(spec: TableSpec, table: pa.Table) -> list[Record]:
    """Arrow rows (user columns) back to records, lists as tuples; meta columns are ignored."""
    names = [f.name for f in spec.schema]
    out: list[Record] = []
    for row in table.select(names).to_pylist():
        out.append(spec.record(**{k: tuple(v) if isinstance(v, list) else v for k, v in row.items()}))
    return out
