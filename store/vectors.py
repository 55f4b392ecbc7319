"""One FAISS index of sketch vectors per architecture family, with stable int64 ids per repo.

Files, under `home/vectors/` (the family name is percent-quoted to make a file name)::

    <family>.faiss        faiss.write_index of IndexIDMap2(IndexFlatL2(dim))
    <family>.ids.parquet  id int64 | repo_id str | revision str, sorted by id; schema metadata carries
                          the format version, the family and the dimension

Why exact L2 (`IndexFlatL2`): sketches are not normalised and their norm is signal (a parent sits
closer to initialisation than its children), so inner product / cosine would throw it away; a flat
index needs no training, is exact and deterministic, and k-NN over a family of 1e5 x 512 float32 is
~200 MB and milliseconds. Distances are *squared* L2, FAISS's convention.

Ids: the first 8 bytes of blake2b(repo_id) with the sign bit cleared. They never change for a repo
(stable across processes, rebuilds and machines, unlike Python's hash()); a collision between two
repos of one family (p ~ n^2 / 2^64) is detected and refused rather than silently merged.

Crash safety: both files are written temp + fsync + rename, the id map first. `load` checks that
the two agree exactly, and `load_or_rebuild` also checks them against the `sketches` table: after a
crash between a Parquet write and the FAISS write, or between the two files, the index is rebuilt from
`sketches` (`rebuild_from_sketches`), which is the source of truth.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from errors import BadInputError, FormatVersionError, StoreError
from store.atomic import atomic_open, atomic_write_with
from store.format import FORMAT_VERSION
from store.schema import SEQ
from store.tables import VECTORS_DIR, read_table

logger = logging.getLogger(__name__)

IDS_SCHEMA = pa.schema([pa.field("id", pa.int64()), pa.field("repo_id", pa.string()),
                        pa.field("revision", pa.string())])


def repo_to_id(repo_id: str) -> int:
    digest = hashlib.blake2b(repo_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFF_FFFF_FFFF_FFFF  # FAISS ids are signed; -1 = none


@contextmanager
def _one_thread() -> Iterator[None]:
    """FAISS searches on one OpenMP thread. Why: our searches are small (one arrival, or one family's
    share of a batch) and share the cores with torch; with 2 threads FAISS spent 2.3 ms per 5-query
    search on the 2-core box against 0.43 ms with 1 (OpenMP spin-waits), and 500 queries over 20,000
    vectors took 59 ms against 42 ms."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _paths(home: Path, family: str) -> tuple[Path, Path]:
    if not family:
        raise BadInputError("family", "an empty family name has no vector index")
    stem = quote(family, safe="")
    folder = Path(home) / VECTORS_DIR
    return folder / f"{stem}.faiss", folder / f"{stem}.ids.parquet"


class VectorIndex:
    """The k-NN index of one family. Mutations are in memory until `save(home)`."""

    def __init__(self, family: str, dim: int) -> None:
        if dim < 1:
            raise BadInputError(f"vector index {family!r}", f"dimension must be positive, got {dim}")
        self.family = family
        self.dim = dim
        self._index = faiss.IndexIDMap2(faiss.IndexFlatL2(dim))
        self._repos: dict[int, tuple[str, str]] = {}  # id -> (repo_id, revision)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def __contains__(self, repo_id: object) -> bool:
        return isinstance(repo_id, str) and repo_to_id(repo_id) in self._repos

    def _matrix(self, vectors: np.ndarray | Sequence[Sequence[float]], what: str) -> np.ndarray:
        arr = np.asarray(vectors, dtype=np.float32)
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise BadInputError(
                f"{what} for family {self.family!r}",
                f"got shape {arr.shape}, but this index holds vectors of dimension {self.dim}",
            )
        return np.ascontiguousarray(arr)

    def _id_for(self, repo_id: str) -> int:
        ident = repo_to_id(repo_id)
        owner = self._repos.get(ident)
        if owner is not None and owner[0] != repo_id:
            raise StoreError(f"id collision in family {self.family!r}: {repo_id!r} and {owner[0]!r}")
        return ident

    def upsert(self, items: Sequence[tuple[str, str, np.ndarray | Sequence[float]]]) -> int:
        """Add or replace (repo_id, revision, vector) entries; returns how many were given."""
        if not items:
            return 0
        by_repo = {repo: (rev, vec) for repo, rev, vec in items}  # last one per repo wins
        repos = sorted(by_repo)  # deterministic insertion order
        matrix = self._matrix([by_repo[r][1] for r in repos], "vectors")
        ids = np.array([self._id_for(r) for r in repos], dtype=np.int64)
        held = np.array([i for i in ids.tolist() if i in self._repos], dtype=np.int64)
        if len(held):  # replacing: drop the old vectors first (remove_ids scans the whole index: only when needed)
            self._index.remove_ids(held)
        self._index.add_with_ids(matrix, ids)
        self._repos.update({int(i): (r, by_repo[r][0]) for i, r in zip(ids, repos, strict=True)})
        return len(repos)

    def remove(self, repo_ids: Sequence[str]) -> int:
        ids = [repo_to_id(r) for r in sorted(set(repo_ids)) if r in self]
        if not ids:
            return 0
        removed = int(self._index.remove_ids(np.array(ids, dtype=np.int64)))
        for ident in ids:
            del self._repos[ident]
        return removed

    def search(self, vectors: np.ndarray | Sequence[Sequence[float]], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, squared L2 distances), each of shape (n, k); missing neighbours have id -1."""
        if k < 1:
            raise BadInputError("k", f"must be at least 1, got {k}")
        with _one_thread():
            distances, ids = self._index.search(self._matrix(vectors, "query vectors"), k)
        return ids, distances

    def nearest(self, vector: np.ndarray | Sequence[float], k: int) -> list[tuple[str, float]]:
        """The k nearest repos to one vector, nearest first, as (repo_id, squared L2 distance)."""
        ids, distances = self.search(vector, k)
        return [(self._repos[int(i)][0], float(d)) for i, d in zip(ids[0], distances[0], strict=True) if i >= 0]

    def nearest_in_order(self, repos: Sequence[str], vectors: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """For a batch of arrivals in order: row i's k nearest among the index and the rows before it.

        The same nominees as searching and upserting the rows one by one (up to float rounding of the
        distances), but one FAISS search for the whole batch: a family of 50,000 vectors costs 1.3 ms
        per single search on the dev box and a fraction of that per row in a batch. Rows are not added."""
        matrix = self._matrix(vectors, "query vectors")
        if k < 1:
            raise BadInputError("k", f"must be at least 1, got {k}")
        found: list[list[tuple[str, float]]] = [[] for _ in repos]
        if len(self):
            ids, dists = self.search(matrix, k)
            for row, (ir, dr) in enumerate(zip(ids, dists, strict=True)):
                found[row] = [(self._repos[int(i)][0], float(d)) for i, d in zip(ir, dr, strict=True) if i >= 0]
        sq = (matrix.astype(np.float64) ** 2).sum(axis=1)
        within = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (matrix.astype(np.float64) @ matrix.T.astype(np.float64)), 0.0)
        for row in range(1, len(repos)):
            earlier = [(repos[j], float(within[row, j])) for j in np.argsort(within[row, :row], kind="stable")[:k]]
            found[row] = sorted(found[row] + earlier, key=lambda rd: rd[1])[:k]
        return found

    def repo_of(self, ident: int) -> str:
        return self._repos[int(ident)][0]

    def entries(self) -> list[tuple[str, str]]:
        """(repo_id, revision) of every vector held, sorted."""
        return sorted(self._repos.values())

    def save(self, home: Path) -> None:
        index_path, ids_path = _paths(home, self.family)
        index_path.parent.mkdir(parents=True, exist_ok=True)
        order = sorted(self._repos)
        table = pa.table({
            "id": pa.array(order, pa.int64()),
            "repo_id": [self._repos[i][0] for i in order],
            "revision": [self._repos[i][1] for i in order],
        }, schema=IDS_SCHEMA).replace_schema_metadata({
            "model-graph-index.format": str(FORMAT_VERSION),
            "family": self.family, "dim": str(self.dim),
        })
        with atomic_open(ids_path) as fh:  # the id map first: see the module docstring
            pq.write_table(table, fh)
        atomic_write_with(index_path, lambda tmp: faiss.write_index(self._index, str(tmp)))

    @classmethod
    def load(cls, home: Path, family: str) -> VectorIndex:
        """Reload a saved index; StoreError if missing or if its two files disagree."""
        index_path, ids_path = _paths(home, family)
        if not index_path.exists() or not ids_path.exists():
            raise StoreError(f"no vector index for family {family!r} under {index_path.parent}; "
                             f"rebuild it with store.vectors.rebuild_from_sketches")
        ids_table = pq.read_table(ids_path)
        meta = ids_table.schema.metadata or {}
        version = int(meta.get(b"model-graph-index.format", b"0"))
        if version > FORMAT_VERSION:
            raise FormatVersionError(f"{ids_path} has format version {version}, newer than {FORMAT_VERSION}; "
                                     f"upgrade model-graph-index")
        index = faiss.read_index(str(index_path))
        out = cls(family, int(index.d))
        out._index = index
        ids = ids_table.column("id").to_pylist()
        out._repos = dict(zip(ids, zip(ids_table.column("repo_id").to_pylist(),
                                       ids_table.column("revision").to_pylist(), strict=True), strict=True))
        held = set(faiss.vector_to_array(index.id_map).tolist())
        if held != set(ids):
            raise StoreError(f"vector index of family {family!r} disagrees with its id map "
                             f"({len(held)} vs {len(ids)} ids); rebuild it from the sketches table")
        return out


def _latest_sketches(home: Path, family: str) -> pa.Table:
    """The newest live sketch per repo of `family` (a repo may have several revisions)."""
    rows = read_table(home, "sketches", with_meta=True, where={"family": family},
                      columns=["repo_id", "revision", "vector", SEQ])
    if rows.num_rows == 0:
        return rows
    rows = rows.sort_by([("repo_id", "ascending"), (SEQ, "descending")])
    repos = rows.column("repo_id").to_pylist()
    keep = [i for i, r in enumerate(repos) if i == 0 or repos[i - 1] != r]
    return rows.take(pa.array(keep, pa.int64()))


def rebuild_from_sketches(home: Path, family: str, *, save: bool = True) -> VectorIndex:
    """Build the family's index from the `sketches` table alone (the recovery path), and save it."""
    rows = _latest_sketches(home, family)
    if rows.num_rows == 0:
        raise StoreError(f"no sketches of family {family!r} in {home}; nothing to build an index from")
    flat = pc.list_flatten(rows.column("vector")).to_numpy(zero_copy_only=False).astype(np.float32)
    dim = flat.size // rows.num_rows
    index = VectorIndex(family, dim)
    index.upsert(list(zip(rows.column("repo_id").to_pylist(), rows.column("revision").to_pylist(),
                          flat.reshape(rows.num_rows, dim), strict=True)))
    if save:
        index.save(home)
    logger.info("rebuilt the %r vector index from %d sketches", family, len(index))
    return index


def load_or_rebuild(home: Path, family: str) -> VectorIndex:
    """Load the saved index if it matches the sketches table exactly, else rebuild and save it."""
    rows = _latest_sketches(home, family)
    wanted = sorted(zip(rows.column("repo_id").to_pylist(), rows.column("revision").to_pylist(), strict=True))
    try:
        index = VectorIndex.load(home, family)
    except (StoreError, RuntimeError) as exc:  # RuntimeError: faiss could not parse the file
        if isinstance(exc, FormatVersionError):
            raise
        logger.warning("%s; rebuilding from sketches", exc)
        return rebuild_from_sketches(home, family)
    if index.entries() != wanted:
        logger.warning("vector index of %r is behind the sketches table; rebuilding", family)
        return rebuild_from_sketches(home, family)
    return index
