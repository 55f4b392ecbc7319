"""The lineage index: sketch -> k nominees (FAISS) -> exact pairs -> candidate edges -> cluster MDST update.

Per arrival (`LineageIndex.add`):
    1. sketch the selected tensors (sketches.sketch); same repo and revision already here: nothing to do;
       same repo at a new revision: its old node and edges leave first (its cluster may split);
    2. nominees: the k nearest sketches of its family (default k = 16: the true parent is among them on
       every zoo order we measured, bench/incremental.py);
    3. exact comparisons (indexer.incremental.exact), at most k per arrival, counted: the k - expand
       nearest nominees, then up to `expand` forest neighbours (parent, children) of those found related
       (second hop), then the remaining nominees in sketch order while the budget of k lasts; past k only
       while it takes children, k more a round (`_late_children`: a parent arriving after its children);
    4. related pairs become candidate edges in both directions, weighted distance + direction penalty
       (upload time; none between two models of one time, such as the Hub's pre-2022 repos);
    5. the forest update (indexer.incremental.forest): leaf attach proven by Edmonds' dual, or Edmonds
       on the one merged cluster; the rows show the forest's parents, except that the models sharing their
       cluster root's upload time are shown rooted at the centre of their subtree (`_shown_parents`);
    6. persist, in this order: candidates, edges rows of the touched cluster, sketches (Parquet, atomic; the
       sketch last, as the arrival's commit mark), then the family's FAISS index. A crash before the FAISS
       save leaves it behind the sketches table; `store.vectors.load_or_rebuild` rebuilds it on the next start.
`flush_every` batches step 6 (1 = every arrival, the crash-safe default; the crawler's batch size is 16).

On start a family's state is read back: sketches (kurtosis, norms, times), candidates -> the forest,
one Edmonds per cluster (equal to the incremental result by the invariant).

Adapters (`add_adapter`) are satellites (indexer.incremental.satellites): placed under their declared
base (indexer.relations.adapters), or under another adapter of that base whose LoRA update they continue,
with at most k exact update comparisons per arrival; their edges rows follow the base's cluster.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import networkx as nx
import numpy as np

from errors import BadInputError, StoreError
from indexer.incremental.exact import (
    COPY_TIE,
    DEFAULT_PENALTY,
    DENSE_COMPATIBLE_RULES,
    PAIR_RULE,
    TIER_GAP,
    ModelView,
    PairMeasure,
    common_layers,
    edge_weights,
    measure,
    measure_many,
)
from indexer.incremental.forest import Candidate, IncrementalForest, Path_
from indexer.incremental.satellites import (
    EXTERNAL_PREFIX,
    AdapterArrival,
    Satellite,
    chain_depth,
)
from indexer.lineage.confidence import calibrated
from indexer.lineage.methods import cast_dtype, fits_f8
from indexer.lineage.orient import norm_t_votes, regime_parent, with_nearest
from indexer.lineage.ties import copy_order
from indexer.readers import QuantInfo, config_from_details, lora_arrays
from indexer.relations.adapters import (
    CHAIN_RATIO,
    Bases,
    Peer,
    base_confidence,
    base_magnitudes,
    base_verdict,
    chain_ratio,
    earlier,
    family_by_shapes,
    nearest_peers,
    resolve_base,
    total_norm,
    verdict_details,
)
from indexer.relations.merges import (
    PairCache,
    fit,
    heaviest_parent,
    merge_row_parents,
    set_aside_undated,
)
from indexer.relations.pool import (
    PairStats,
    declared_relatives,
    fit_order,
    identical,
    merge_parents_of,
    merge_pool,
    pair_stats,
)
from indexer.relations.rules import (
    LEAF_PENALTY,
    copy_relative,
    within_quantization_error,
)
from sketches.adapter import LoraUpdate, lora_updates
from sketches.distances import Device
from sketches.experts import expert_alias
from sketches.layers import is_head, normalise_name, select_layers
from sketches.sketch import DEFAULT_DIM, SKETCH_VERSION, Sketch, sketch_model
from store.cache import CACHE_DIR, TensorCache
from store.families import FamilyRegistry
from store.schema import CandidateRecord, EdgeRecord, SketchRecord
from store.tables import Store, open_store, read_table
from store.vectors import VectorIndex, load_or_rebuild

logger = logging.getLogger(__name__)

DEFAULT_K = 16
# Second-hop comparisons per arrival (0 = off): forest neighbours of its related nominees that were not
# nominated. Why: in random orders 1-7 of 100 true pairs were never compared (recall@16 0.93-0.97 on the
# vthr zoos): a parent arriving after its child whose LoRA update is large (L2 12-27 against 0.9-1.4 to
# its nearest relative) ranks that child 16th-18th among its neighbours. With 8: every random order we
# ran compares >= 0.99 of the true pairs and matches batch mother within 0.01 (vthr-lora-f order 0:
# 0.96 -> 1.00, vthr-ft order 1: 0.86 -> 0.88), for 15.1-15.9 exact computations per arrival (max 20
# measured; bound k + 8).
DEFAULT_EXPAND = 8
# Rounds of k more comparisons for an arrival that keeps taking children (`_late_children`): 16 x k = 256
# at the default k, a base arriving after a few hundred of its own models; its cost grows with the children
# found, and its arrays come from memory or the cache (a re-read by range past that).
LATE_ROUNDS = 16
# How far down the sketch ranking nomination reads to fill k nominees once the copies under one model count
# as one (`_copies_once`): past NOMINEE_DEPTH x k copies of one source, its relatives are left to the hop.
NOMINEE_DEPTH = 4
# A cast to BF16 moves each value by at most half an ulp, 2^-8 of it (F16: 2^-11), so the pair's relative
# distance is below 2^-8 too; pairs farther apart than twice that are not read for the cast test.
CAST_RELATIVE = 2.0**-7
# An F8 cast (no scale) moves a value by up to 2^-4 of it (E4M3; E5M2 2^-3), more for the subnormals small
# weights fall in (E4M3 below 2^-6): 3-11 % relative on weights of RMS 0.02-0.005. Read within this when one
# side's arrays, at hand, fit an F8 type: the arrival's, or a nominee's still in memory (never read for it)
F8_CAST_RELATIVE = 0.25
DEFAULT_ARRAY_BYTES = 1 << 30  # in-memory arrays of recent models (nominees' exact step); then the cache
DEFAULT_RECALL_BYTES = 768 << 20  # older models' arrays read back from the cache, kept a while (`_recalled`):
# one arrival's working set, its nominees and merge pool, about 20 7B models at the default read
# LEAF_PENALTY, MERGE_CANDIDATES and the `quantized` label's bound: indexer.relations.rules (shared with batch)


@dataclass(frozen=True)
class ArrivalResult:
    repo_id: str
    family: str
    nominees: tuple[str, ...]  # nearest first
    exact: int  # exact pair computations made for this arrival (<= k)
    related: tuple[str, ...]  # nominees that became candidate edges, sorted
    path: Path_ | None  # None: already indexed at this revision
    parent: str
    cluster: str  # the cluster's key (its smallest member id)
    second_hop: tuple[str, ...] = ()  # compared beyond the nominees (`expand`), in that order
    late: tuple[str, ...] = ()  # compared beyond k while it took children (`_late_children`), in that order


Refetch = Callable[[str, str], Mapping[str, np.ndarray]]  # (repo_id, revision) -> selected tensors, float32


@dataclass(frozen=True)
class Arrival:
    """One model to index: its selected tensors (float32) and upload time (None: unknown)."""

    repo_id: str
    revision: str
    family: str
    arrays: Mapping[str, np.ndarray]
    created_at: datetime | None
    quant: QuantInfo | None = None  # a quantized copy (dequantized arrays): a leaf unless nothing else fits
    declared: tuple[str, ...] = ()  # the base models its card names: its merge pool takes them first
    copy_rank: tuple[int, int] = (0, 0)  # indexer.crawl.ModelRead.copy_rank


@dataclass
class _Pending:
    """An arrival between its sketch and its place in the forest (`LineageIndex.add_many`)."""

    index: int
    arrival: Arrival
    sketch: Sketch
    view: ModelView  # no arrays: what the family keeps
    mine: ModelView  # with the selected arrays: what the exact step compares
    nominees: list[str] = field(default_factory=list)
    first: list[str] = field(default_factory=list)  # the nominees compared before the second hop
    # the body layers the first comparisons used (`exact.measure_many`: common to the arrival and all of
    # them); None: no nominee. Its later comparisons use these, or fewer (`_measure_later`)
    layers: frozenset[str] | None = None


def _children(forest: IncrementalForest, node: str) -> list[str]:
    """The children `node` has in the forest now (none for "")."""
    return [c for c in forest._out.get(node, {}) if forest.parent(c) == node] if node else []


def _leaves(state: _Family) -> set[str]:
    """The family's known copies: quantized copies and casts, leaves under whatever they hang."""
    return set(state.quant) | {copy for _, copy in state.casts}


def _copies_once(state: _Family, near: Sequence[str], k: int) -> list[str]:
    """The k nominees from `near` (nearest first), the known copies hanging under one model counted once.

    Copies under one parent are interchangeable as nominees: nearly one point by sketch, and leaves, so
    never the arrival's parent. One stands for them all, followed by the model they hang under (their
    source, or the nearest full-precision relative while it has not come); if the arrival takes the one
    as a child, `_late_children` compares its siblings. Why: a newest-first crawl brings a popular base
    after its quantized copies; with the 26 formats of bench/formats.py, a base's and a fine-tune's
    16 nearest were all their own copies, the fine-tune was never compared with its base and hung under
    a merge of itself (bench/RESULTS.md session 20: 0.971 against batch 1.000)."""
    leaves, out, groups = _leaves(state), [], set()
    for r in near:
        under = state.forest.parent(r) if r in leaves and r in state.forest else ""
        if r in out or (under and under in groups):
            continue
        out.append(r)
        if under:
            groups.add(under)
            if under not in out:
                out.append(under)
        if len(out) >= k:
            break
    return (out + [r for r in near if r not in out])[:k]  # fewer groups than k: the other copies fill up


def _prepare(index: int, arrival: Arrival, dim: int, seed: int, content: Hashable = None) -> _Pending:
    sketch = sketch_model(arrival.arrays, family=arrival.family, dim=dim, seed=seed)  # 1.
    view = _make_view(arrival.repo_id, arrival.arrays, sketch, arrival.created_at, arrival.copy_rank)
    arrays = {n: arrival.arrays[n] for n in sketch.layer_names}
    arrays |= {n: a for n, a in arrival.arrays.items() if is_head(n)}  # heads break ties of identical bodies
    mine = replace(view, arrays=arrays, content=content)
    return _Pending(index, arrival, sketch, view, mine)


@dataclass
class _Family:
    name: str
    forest: IncrementalForest
    vectors: VectorIndex | None
    views: dict[str, ModelView]  # arrays left empty: they live in LineageIndex._arrays / the cache
    revisions: dict[str, str]
    depth: dict[str, int] = field(default_factory=dict)
    # the measured distance of each candidate pair (both directions), what an edge row reports: the forest
    # holds weights (tier offset + log distance + direction penalty), which mean nothing to a reader
    distance: dict[tuple[str, str], float] = field(default_factory=dict)
    # candidate pairs (both directions) whose compared layers are bit-identical: a child placed under
    # such a parent after it is a `duplicate`, not a fine-tune (PairMeasure.identical)
    identical: set[tuple[str, str]] = field(default_factory=set)
    quant: dict[str, QuantInfo] = field(default_factory=dict)  # the quantized copies among the models
    # whole-model relative distance of the candidate pairs that involve a quantized copy (both directions):
    # what the `quantized` label is judged on, against the scheme's predicted error
    relative: dict[tuple[str, str], float] = field(default_factory=dict)
    merges: dict[str, tuple[tuple[str, float], ...]] = field(default_factory=dict)  # merge -> (parent, weight)
    # the merge pool rule's statistic of each related pair ((a, rev a, b, rev b), a < b), measured once with
    # both models' arrays at hand (indexer.relations.pool.pair_stats); a new revision is a new key
    pair_stats: dict[tuple[str, str, str, str], PairStats | None] = field(default_factory=dict)
    # model -> last pool fitted ((id, rev, its merge parents when a known merge), ...)
    pools: dict[str, tuple[tuple[str, str, tuple[str, ...]], ...]] = field(default_factory=dict)
    # (source, copy) pairs where the copy is the source cast to F16 / BF16, bit for bit (batch mother's
    # `_cast_sources`; indexer.lineage.methods.cast_dtype): the edge source -> copy is `quantized`
    casts: set[tuple[str, str]] = field(default_factory=set)
    declared: dict[str, tuple[str, ...]] = field(default_factory=dict)  # model -> its card's base models
    # the parent each edges row shows ("" a root): the forest's, but for the models that share their
    # cluster root's upload time (the Hub's pre-2022 repos), oriented from the centre of their subtree
    # (`_shown_parents`); and the root each cluster shows
    shown: dict[str, str] = field(default_factory=dict)
    shown_root: dict[int, str] = field(default_factory=dict)
    dated: Counter[float | None] = field(default_factory=Counter)  # upload time -> models with it
    moved: set[str] = field(default_factory=set)  # the models whose shown parent is not the forest's


class LineageIndex:
    """The incremental lineage of every family in one store (see the module docstring)."""

    def __init__(self, store: Store, *, k: int = DEFAULT_K, device: Device = "auto", penalty: float = DEFAULT_PENALTY,
                 dim: int = DEFAULT_DIM, seed: int = 0, flush_every: int = 1, cache: TensorCache | None = None,
                 array_bytes: int = DEFAULT_ARRAY_BYTES, recall_bytes: int = DEFAULT_RECALL_BYTES,
                 expand: int = DEFAULT_EXPAND,
                 refetch: Refetch | None = None, keep_arrays: bool = True,
                 bases: Bases | None = None) -> None:
        if k < 1:
            raise BadInputError("k", f"must be at least 1 nominee, got {k}")
        self.store, self.k, self.device, self.penalty = store, k, device, penalty
        self.dim, self.seed, self.flush_every = dim, seed, max(1, flush_every)
        self.expand = max(0, expand)
        self.cache = cache if cache is not None else TensorCache(Path(store.home) / CACHE_DIR)
        self.refetch = refetch  # re-reads a nominee's selected tensors by range when the cache lost them
        # write each arrival's tensors to the cache; off under the crawler, which caches the same planned
        # blocks under the same keys itself (writing them twice doubled the cache I/O: 128 MiB a 7B model)
        self.keep_arrays = keep_arrays
        self.not_compared = 0  # nominees skipped because their tensors could not be had (logged)
        self._families: dict[str, _Family] = {}
        self._registry = FamilyRegistry(store.home)
        self._arrays: OrderedDict[str, Mapping[str, np.ndarray]] = OrderedDict()
        self._array_bytes, self._held = array_bytes, 0
        self._recall: OrderedDict[tuple[str, str], Mapping[str, np.ndarray]] = OrderedDict()  # `_recalled`
        self._recall_bytes, self._recall_held = recall_bytes, 0
        self._pair_cache = PairCache()  # what merge fits learn about pairs, by `_content`
        self._token = uuid.uuid4().hex  # this index's part of `_content`
        self._pending: dict[str, list[object]] = {"sketches": [], "candidates": [], "edges": []}
        self._dirty: set[str] = set()
        self._since_flush = 0
        self.exact_total = 0
        self.bases = bases  # an adapter's base (crawl: by range from the Hub): its header and DoRA rows, for its verdict
        self._sats: dict[str, Satellite] | None = None  # loaded on first use (_satellites)
        self._updates: OrderedDict[str, Mapping[str, LoraUpdate]] = OrderedDict()  # adapters' factors, bounded
        self._update_bytes = 0
        self._homes: dict[str, str] | None = None  # forest repo id -> its family (_home_of)

    @classmethod
    @contextmanager
    def open(cls, home: Path, **kwargs: object) -> Iterator[LineageIndex]:
        """Open the store at `home` (write lock) and the index over it; flushes on exit."""
        with open_store(Path(home)) as store:
            index = cls(store, **kwargs)  # type: ignore[arg-type]
            try:
                yield index
            finally:
                index.flush()

    # --- family state --------------------------------------------------------------------------------

    def family(self, family: str) -> _Family:
        if family not in self._families:
            self._families[family] = self._load(family)
        return self._families[family]

    def _load(self, family: str) -> _Family:
        sketches = [r for r in self.store.records("sketches") if r.family == family]  # type: ignore[union-attr]
        stats = [json.loads(r.stats) for r in sketches]  # type: ignore[union-attr]  -- parsed once, used twice
        layouts = len({frozenset(n for n in r.layer_names if not is_head(n)) for r in sketches})  # type: ignore[union-attr]
        _check_pair_rule(family, stats, self._registry.families.get(family, {}), layouts)
        views, revisions = {}, {}
        for r, st in zip(sketches, stats, strict=True):
            views[r.repo_id] = _view_of(r, st)  # type: ignore[arg-type]
            revisions[r.repo_id] = r.revision  # type: ignore[union-attr]
        # Candidate rows are written before their model's sketch (see `flush`): rows of a model whose sketch
        # never landed belong to an arrival cut short by a crash; it is added again, rows and all.
        rows = [c for c in self.store.records("candidates")
                if c.family == family and c.parent in views and c.child in views]  # type: ignore[union-attr]
        edges = [Candidate(c.parent, c.child, c.weight) for c in rows]  # type: ignore[union-attr]
        casts = {(source, copy) for st in stats for source, copy in st.get("casts") or ()  # type: ignore[union-attr]
                 if source in views and copy in views}
        # stores before the forest's leaf penalties hold casts' known at arrival in their candidate weights
        # too: counted twice there, which orders nothing differently (either one outweighs any distance)
        forest = IncrementalForest.load(sorted(views), edges, {copy: LEAF_PENALTY for _, copy in casts})
        vectors = load_or_rebuild(self.store.home, family) if views else None
        state = _Family(family, forest, vectors, views, revisions)
        state.casts = casts
        state.distance = {(c.parent, c.child): c.distance for c in rows}  # type: ignore[union-attr]
        # an identical pair is stored as distance TIER_GAP exactly (full-rank tier, zero tail): the only
        # pairs that measure exactly 0 there have no difference in any compared layer
        state.identical = {pair for pair, d in state.distance.items() if d == TIER_GAP}
        merged = read_table(self.store.home, "edges", where={"family": family, "relation": "merge"},
                            columns=["repo_id", "parents"]).to_pylist()
        state.merges = {m["repo_id"]: tuple((p["repo_id"], p["weight"]) for p in m["parents"])
                        for m in merged if m["repo_id"] in views}
        for r, st in zip(sketches, stats, strict=True):
            if isinstance(q := st.get("quantized"), dict):
                state.quant[r.repo_id] = QuantInfo(str(q["scheme"]), float(q["predicted_error"]))  # type: ignore[union-attr]
            if declared := st.get("declared"):
                state.declared[r.repo_id] = tuple(declared)  # type: ignore[arg-type]
            for other, rel in (st.get("relative") or {}).items():
                state.relative[(r.repo_id, other)] = state.relative[(other, r.repo_id)] = float(rel)  # type: ignore[union-attr]
        state.dated.update(v.created for v in views.values())
        for cid in sorted({state.forest.cluster_id(m) for m in views}):
            _reshow(state, cid, state.forest.members(cid))
        _all_depths(state)
        logger.info("family %s: %d models, %d candidate edges loaded", family, len(views), len(edges))
        return state

    # --- one arrival ---------------------------------------------------------------------------------

    def add(self, repo_id: str, revision: str, family: str, arrays: Mapping[str, np.ndarray],
            created_at: datetime | None) -> ArrivalResult:
        """Index one model (see the module docstring for the steps)."""
        return self.add_many([Arrival(repo_id, revision, family, arrays, created_at)])[0]

    def add_many(self, arrivals: Sequence[Arrival]) -> list[ArrivalResult]:
        """Index several models in arrival order: the same results as `add` on each in turn, but the
        nominees of each family come from one FAISS search and the first exact comparisons of all of them
        from one `measure_many` call (batched on the device). The second hop and the forest updates still
        run one arrival at a time, as they depend on the arrivals before."""
        results: list[ArrivalResult | None] = [None] * len(arrivals)
        chunk: list[_Pending] = []
        for i, arrival in enumerate(arrivals):
            arrival = replace(arrival, family=self._registry.resolve(  # the family of its core (store.families)
                arrival.family, {n: tuple(np.shape(a)) for n, a in arrival.arrays.items()}))
            state = self.family(arrival.family)
            repeat = any(p.arrival.repo_id == arrival.repo_id for p in chunk)
            if repeat or arrival.repo_id in state.views:  # a new revision: what came before is placed first
                self._place_all(chunk, results)
                chunk = []
            if state.revisions.get(arrival.repo_id) == arrival.revision:  # 1.
                forest = state.forest
                results[i] = ArrivalResult(arrival.repo_id, arrival.family, (), 0, (), None, forest.parent(arrival.repo_id),
                                           forest.cluster_key(forest.cluster_id(arrival.repo_id)))
                continue
            if arrival.repo_id in state.views:
                self._forget(state, arrival.repo_id)
            chunk.append(_prepare(i, arrival, self.dim, self.seed, self._content(arrival.repo_id, arrival.revision)))
        self._place_all(chunk, results)
        return results  # type: ignore[return-value]

    def _place_all(self, chunk: Sequence[_Pending], results: list[ArrivalResult | None]) -> None:
        if not chunk:
            return
        self._nominate(chunk)  # 2.
        batch = {p.mine.repo_id: p for p in chunk}
        jobs = [_aligned(p.mine, self._views(self.family(p.arrival.family), p.first, batch)) for p in chunk]
        for p, (new, views) in zip(chunk, jobs, strict=True):
            p.layers = _job_layers(new, views)
        for p, pairs in zip(chunk, measure_many(jobs, device=self.device, strangers=False), strict=True):  # 3. (first part)
            results[p.index] = self._place(p, pairs)

    def _nominate(self, chunk: Sequence[_Pending]) -> None:
        """The k nearest sketches of each arrival among its family and the chunk's earlier arrivals."""
        for family in sorted({p.arrival.family for p in chunk}):
            state = self.family(family)
            mine = [p for p in chunk if p.arrival.family == family]
            if state.vectors is None:
                state.vectors = VectorIndex(family, len(mine[0].sketch.vector))
            vectors = np.stack([p.sketch.vector for p in mine])
            found = state.vectors.nearest_in_order([p.mine.repo_id for p in mine], vectors, NOMINEE_DEPTH * self.k)
            for p, near in zip(mine, found, strict=True):
                p.nominees = _copies_once(state, [r for r, _ in near], self.k)
                p.first = p.nominees[: max(1, self.k - self.expand)] if self.expand else p.nominees

    def _place(self, p: _Pending, pairs: list[PairMeasure]) -> ArrivalResult:
        """Steps 3 (second hop and the rest of the budget) to 6 for one prepared arrival."""
        arrival, state = p.arrival, self.family(p.arrival.family)
        repo_id, family = arrival.repo_id, arrival.family
        hop = self._second_hop(state, p.sketch, p.first, pairs)[: self.k - len(p.first)]
        rest = [n for n in p.nominees[len(p.first):] if n not in hop][: max(0, self.k - len(p.first) - len(hop))]
        pairs = self._measure_later(state, p, pairs, self._views(state, hop + rest))[0]
        before = len(pairs)
        pairs = self._late_children(state, p, pairs)
        late = pairs[before:]
        self.exact_total += len(pairs)
        if arrival.quant is not None:
            state.quant[repo_id] = arrival.quant
        state.declared.pop(repo_id, None)  # a new revision's card may name none
        if arrival.declared:
            state.declared[repo_id] = arrival.declared
        casts = self._casts(state, p.mine, pairs)  # before the edges: a cast copy is no parent
        # a cast that arrived before its source (a newest-first crawl) is a leaf from now: its cluster re-solved
        recast = [m for _, copy in casts for m in state.forest.set_leaf(copy, LEAF_PENALTY)]
        candidates, rows, relative = self._edges(family, p.view, state, pairs, p.mine.arrays)  # 4.
        update = state.forest.add(repo_id, candidates)  # 5.
        if repo_id in state.views:
            state.dated[state.views[repo_id].created] -= 1
        state.views[repo_id], state.revisions[repo_id] = p.view, arrival.revision
        state.dated[p.view.created] += 1
        # before the merge fits: a refit writes the edge rows of the models it reaches, the newcomer among
        # them when an equal upload time (the Hub's pre-2022 repos) orders it before an earlier arrival
        touched = sorted({*update.touched, *recast})
        if _reshow(state, state.forest.cluster_id(repo_id), sorted({repo_id, *touched})):
            touched = state.forest.members(state.forest.cluster_id(repo_id))  # re-rooted: every depth moves
        _update_depths(state, touched)
        self._remember(repo_id, p.mine.arrays)
        if self.keep_arrays:
            self._persist_arrays(repo_id, arrival.revision, p.mine.arrays)
        state.vectors.upsert([(repo_id, arrival.revision, p.sketch.vector)])  # type: ignore[union-attr]
        self._merges(state, p.mine, [q for q in pairs if q.related])
        self._queue(family, state, repo_id, arrival.revision, p.sketch, p.view, rows, touched,  # 6.
                    quant=arrival.quant, relative=relative, casts=casts, declared=arrival.declared)
        if self._homes is not None:
            self._homes[repo_id] = family
        self._reanchor(repo_id, family)
        if len(state.views) == 1:
            self._adopt_orphans(family)
        cid = state.forest.cluster_id(repo_id)
        return ArrivalResult(repo_id, family, tuple(p.nominees), len(pairs), tuple(sorted(q.other for q in pairs if q.related)),
                             update.path, state.forest.parent(repo_id), state.forest.cluster_key(cid), tuple(hop),
                             tuple(q.other for q in late))

    def _late_children(self, state: _Family, p: _Pending, pairs: list[PairMeasure]) -> list[PairMeasure]:
        """More comparisons for a parent that arrives after its children, while it keeps taking them.

        A first crawl lists newest first, so a popular base comes after hundreds of its copies and
        fine-tunes, each hung meanwhile under whatever was there; its k comparisons reach only k of them
        (bench/RESULTS.md session 12: 13 copies before their source, the AWQ-folded one, far by sketch,
        never compared). While the last round found models that would hang under the arrival at less than
        their present parent edge, with time (or kurtosis) pointing its way, compare k more: the siblings
        of those under their present parents, then the next sketch neighbours. Bounded by the children it
        finds, not by k (at most LATE_ROUNDS rounds): an arrival that takes none costs nothing more.
        Returns every comparison of the arrival, these included."""
        if not self.expand or state.vectors is None or p.arrival.quant is not None:  # a copy is a leaf
            return pairs
        seen, found = {q.other for q in pairs} | {p.mine.repo_id}, self._takers(state, p, pairs)
        depth = 2
        while found and depth <= LATE_ROUNDS + 1:
            forest = state.forest
            siblings = {c for r in found for c in _children(forest, forest.parent(r))} - seen
            ranked = [r for r, _ in state.vectors.nearest(p.sketch.vector, depth * self.k + len(siblings))]
            place = {r: i for i, r in enumerate(ranked)}
            near = [r for r in ranked[: depth * self.k] if r not in seen]
            # full-precision siblings before quantized copies and casts (leaves: they stay under their sources),
            # then the nearest the arrival by sketch: a merge of two fine-tunes, uploaded before both's copies,
            # holds them all on a newest-first crawl; by id, the first fine-tune's copies filled the round, none
            # took, and the rounds stopped before the arrival's own copies (relations + formats, 8 of 17 missed);
            # in random order a fine-tune's 20 copies filled its base's round and left the fine-tune out
            leaves = _leaves(state)
            by_sketch = sorted(siblings, key=lambda r: (place.get(r, len(place)), r))
            batch = sorted(dict.fromkeys(by_sketch + near), key=lambda r: r in leaves)[: self.k]  # stable
            if not batch:
                break
            seen |= set(batch)
            pairs, more = self._measure_later(state, p, pairs, self._views(state, batch))
            found, depth = self._takers(state, p, more), depth + 1
        return pairs

    def _measure_later(self, state: _Family, p: _Pending, done: list[PairMeasure], views: Sequence[ModelView]
                       ) -> tuple[list[PairMeasure], list[PairMeasure]]:
        """The arrival's comparisons after its first (second hop, late children): (all of them, the new ones).

        Every comparison of one arrival is measured on one set of body layers, those common to it and all
        the models it is compared with (the first job's rule, `exact.measure_many`). A later model lacking
        some of them (a MoE beside dense models: attention, no dense MLP) shrinks the set, and the earlier
        comparisons are measured again on it. Why: relx, order 0, b-ft2 hung under its sibling b-ft1,
        measured on attention beside a MoE in the second hop, against its base measured on attention and
        MLP in the first job; batch, on the family's common layers, kept the base. Unrelated pairs are read
        for their test only (`_edges`)."""
        new, kept = _aligned(p.mine, views)
        if not kept:
            return done, []
        shared = _job_layers(new, kept) or frozenset()
        layers = shared if p.layers is None else p.layers & shared
        if done and p.layers is not None and layers != p.layers:
            again = self._views(state, [q.other for q in done])
            redone = {q.other: q for q in measure(*_aligned(_restricted(p.mine, layers), again), device=self.device,
                                                  strangers=False)}
            logger.info("%s: %d comparisons measured again on %d layers (a later nominee lacks %d)", p.mine.repo_id,
                        len(redone), len(layers), len(p.layers - layers))
            done = [redone.get(q.other, q) for q in done]
        p.layers = layers
        more = measure(*_aligned(_restricted(p.mine, layers), kept), device=self.device, strangers=False)
        return done + more, more

    def _takers(self, state: _Family, p: _Pending, pairs: Sequence[PairMeasure]) -> list[str]:
        """The compared models that would rather hang under the arrival than where they hang now."""
        found = []
        for pair in pairs:
            other = state.views.get(pair.other)
            if not pair.related or other is None:
                continue
            _, (towards, weight) = edge_weights(pair, p.view.created, other.created, penalty=self.penalty,
                                                heads_new=p.view.heads, heads_other=other.heads)
            weight += _copy_tie(state, pair, p.view, other)[1]
            parent = state.forest.parent(pair.other)
            if towards == 0 and weight < (state.forest.weight(parent, pair.other) if parent else math.inf):
                found.append(pair.other)
        return found

    def _views(self, state: _Family, repos: Sequence[str], batch: Mapping[str, _Pending] | None = None) -> list[ModelView]:
        """The nominees' views with their arrays: the chunk's own arrivals first, else memory or the cache."""
        batch = batch or {}
        found = (batch[r].mine if r in batch else self._with_arrays(state, r) for r in repos)
        return [v for v in found if v is not None]

    def _second_hop(self, state: _Family, sketch: Sketch, nominees: Sequence[str], pairs: Sequence[object]) -> list[str]:
        """Up to `expand` forest parents/children of the related compared nominees, not yet compared
        (nominees ranked below the first k - expand included), the most weakly placed first: roots, then
        by the weight of their current parent edge, heaviest first; then nearest sketch, then id. With
        budget left, the parents and children of those, in the same order.

        Why weakest first: the pair this hop exists for is a child that arrived before its parent and
        whose update is large (a big LoRA), so it ranks past k among the parent's sketch neighbours and
        hangs, for now, under a grandparent or sibling by a heavy edge. Nearest-sketch-first cut it off
        when the hop had to fit in the budget of k (vthr-lora-f, order 0: 2 true pairs never compared)."""
        if not self.expand or state.vectors is None:
            return []
        forest, seen = state.forest, set(nominees)
        hop: set[str] = set()
        for pair in pairs:
            if pair.related:  # type: ignore[attr-defined]
                r = pair.other  # type: ignore[attr-defined]
                hop |= {forest.parent(r), *_children(forest, r)}
        hop -= seen | {""}
        near = {r: i for i, (r, _) in enumerate(state.vectors.nearest(sketch.vector, 4 * self.k))}

        def placed(r: str) -> float:  # weight of the current parent edge; a root: none, weakest of all
            parent = forest.parent(r)
            return forest.weight(parent, r) if parent else math.inf

        def rank(rs: set[str]) -> list[str]:  # deterministic
            return sorted(rs, key=lambda r: (-placed(r), near.get(r, len(near)), r))

        chosen = rank(hop)[: self.expand]
        # budget left: the hop's own parents and children. A far-drifted model that arrived before its
        # parent is a root, or hangs under a cousin, one step beyond the parent's relatives (wild-conv-s2,
        # order 0: the long high-lr run, equally far by sketch from its whole family, was the root above a
        # cousin the parent's hop held, and was never compared with its parent)
        further = {n for r in chosen for n in (forest.parent(r), *_children(forest, r))}
        return chosen + rank(further - seen - set(chosen) - {""})[: self.expand - len(chosen)]

    def _copy_relative(self, state: _Family, repo_id: str, mine: Mapping[str, np.ndarray], other: str,
                       plain: float) -> float:
        """indexer.relations.rules.copy_relative of a pair with a quantized side: the other side's arrays are
        recalled (memory, else the cache) only when the plain distance is over the smaller predicted error."""
        predicted = min(state.quant[r].predicted_error for r in (repo_id, other) if r in state.quant)
        if within_quantization_error(plain, predicted):
            return plain
        held = self._with_arrays(state, other)
        return copy_relative(plain, mine, held.arrays, predicted) if held is not None else plain

    def _edges(self, family: str, view: ModelView, state: _Family, pairs: Sequence[object],
               mine: Mapping[str, np.ndarray]) -> tuple[list[Candidate], list[CandidateRecord], dict[str, float]]:
        candidates, rows, relative = [], [], {}
        for pair in sorted(pairs, key=lambda p: p.other):  # type: ignore[attr-defined]
            if not pair.related:  # type: ignore[attr-defined]
                continue
            other = state.views[pair.other]  # type: ignore[attr-defined]
            (t_in, w_in), (t_out, w_out) = edge_weights(pair, view.created, other.created, penalty=self.penalty,  # type: ignore[arg-type]
                                                        heads_new=view.heads, heads_other=other.heads)
            tie_in, tie_out = _copy_tie(state, pair, view, other)  # type: ignore[arg-type]
            w_in, w_out = w_in + tie_in, w_out + tie_out
            # a quantized copy is a parent only when nothing else relates (Hub: quantized models are leaves in
            # 99.41 %); pair-local, so the forest's batch == incremental invariant holds. An exact 16-bit cast
            # counts as one (batch sets casts aside as leaves whatever the upload times say), from whenever it
            # is known: the forest adds that penalty itself (`IncrementalForest.set_leaf`, in `add` and `_load`)
            w_in += LEAF_PENALTY if other.repo_id in state.quant else 0.0
            w_out += LEAF_PENALTY if view.repo_id in state.quant else 0.0
            if other.repo_id in state.quant or view.repo_id in state.quant:  # the copy's label is judged on it
                rel = self._copy_relative(state, view.repo_id, mine, other.repo_id, float(pair.relative))  # type: ignore[attr-defined]
                relative[other.repo_id] = rel
                state.relative[(other.repo_id, view.repo_id)] = state.relative[(view.repo_id, other.repo_id)] = rel
            candidates += [Candidate(other.repo_id, view.repo_id, w_in), Candidate(view.repo_id, other.repo_id, w_out)]
            dist = pair.distance  # type: ignore[attr-defined]
            state.distance[(other.repo_id, view.repo_id)] = state.distance[(view.repo_id, other.repo_id)] = dist
            if pair.identical:  # type: ignore[attr-defined]
                state.identical |= {(other.repo_id, view.repo_id), (view.repo_id, other.repo_id)}
            rows += [CandidateRecord(family, other.repo_id, view.repo_id, dist, t_in, w_in),
                     CandidateRecord(family, view.repo_id, other.repo_id, dist, t_out, w_out)]
        return candidates, rows, relative

    def _casts(self, state: _Family, mine: ModelView, pairs: Sequence[PairMeasure]) -> list[tuple[str, str]]:
        """The (source, copy) cast pairs between the arrival and its related nominees, both ways, recorded in
        the state. Only pairs within CAST_RELATIVE are read (CAST_RELATIVE's comment)."""
        found = []
        mine_f8 = fits_f8(mine.arrays)
        for pair in pairs:
            at_hand = self._arrays.get(pair.other)
            bound = F8_CAST_RELATIVE if mine_f8 or (at_hand is not None and fits_f8(at_hand)) else CAST_RELATIVE
            if not pair.related or pair.relative > bound:
                continue
            view = self._with_arrays(state, pair.other)  # memory first, then the cache or a re-read
            if view is None:
                continue
            other = view.arrays
            if cast_dtype(other, mine.arrays):
                found.append((pair.other, mine.repo_id))
            elif cast_dtype(mine.arrays, other):
                found.append((mine.repo_id, pair.other))
        state.casts.update(found)
        return sorted(found)

    def _forget(self, state: _Family, repo_id: str) -> None:
        """A new revision replaces the old node: drop it, its edges (tombstones) and its vector."""
        fam = state.name
        keys = [(fam, p, repo_id) for p in sorted(state.forest._in[repo_id])]
        keys += [(fam, repo_id, c) for c in sorted(state.forest._out[repo_id])]
        self.flush()
        self.store.delete("candidates", keys)
        for _, parent, child in keys:
            state.distance.pop((parent, child), None)
            state.identical.discard((parent, child))
            state.relative.pop((parent, child), None)
        state.quant.pop(repo_id, None)
        sourced = {copy for source, copy in state.casts if source == repo_id}
        state.casts = {c for c in state.casts if repo_id not in c}
        parts = state.forest.remove(repo_id)
        for copy in sorted(sourced - {c for _, c in state.casts}):  # a cast of nothing here any more
            state.forest.set_leaf(copy, 0.0)
            parts.append(state.forest.cluster_id(copy))
        parts = sorted(set(parts))
        state.dated[state.views[repo_id].created] -= 1
        del state.views[repo_id], state.revisions[repo_id]
        if state.vectors is not None:
            state.vectors.remove([repo_id])
        for cid in parts:
            _reshow(state, cid, state.forest.members(cid))
        _all_depths(state)
        for cid in parts:
            self._pending["edges"] += self._edge_rows(state, state.forest.members(cid))

    # --- arrays of nominees ------------------------------------------------------------------------

    def _remember(self, repo_id: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Hold a model's arrays in memory, least recently used dropped first past `array_bytes`."""
        kept = {n: np.asarray(a, dtype=np.float32) for n, a in sorted(arrays.items())}
        if (old := self._arrays.pop(repo_id, None)) is not None:  # a new revision, or read again: count it once
            self._held -= sum(a.nbytes for a in old.values())
        self._arrays[repo_id] = kept
        self._held += sum(a.nbytes for a in kept.values())
        while self._held > self._array_bytes and len(self._arrays) > 1:
            _, old = self._arrays.popitem(last=False)
            self._held -= sum(a.nbytes for a in old.values())

    def _persist_arrays(self, repo_id: str, revision: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Keep the tensors in the on-disk cache (block 0 = whole tensor) for nominee comparisons after a restart."""
        for name in sorted(arrays):
            key = (repo_id, revision, name, 0)
            if key not in self.cache:
                self.cache.put(key, np.asarray(arrays[name], dtype=np.float32))

    def _with_arrays(self, state: _Family, repo_id: str) -> ModelView | None:
        view = state.views[repo_id]
        arrays = self._arrays.get(repo_id)
        if arrays is None:
            # from the disk cache or the network, and not held with the latest arrivals: that memory keeps
            # them first in, first out, the disk cache (least recently used out) also the older ones read
            # since. Holding re-read ones there too, least recently used out, made both hold the same
            # models: 63 nominees read again over the network in 80 virtual 7B models instead of 27
            # (bench/crawl_rate.py, bench/RESULTS.md). A second, smaller memory keeps them a while (`_recalled`)
            arrays = self._recalled(repo_id, state.revisions[repo_id], tuple(view.norms), view.head_names)
            if arrays is None:
                self.not_compared += 1
                return None
        return replace(view, arrays=arrays, content=self._content(repo_id, state.revisions[repo_id]))

    def _recalled(self, repo_id: str, revision: str, names: tuple[str, ...],
                  heads: tuple[str, ...] = ()) -> Mapping[str, np.ndarray] | None:
        """An older model's arrays from the disk cache or the network, kept a while in a second, bounded
        memory (least recently used out past `recall_bytes`), apart from the latest arrivals.

        Why: one arrival reads the same older relatives many times -- its exact step's nominees, the cast
        test, then each merge fit over its pool and its relatives' refits (about 7 fits of up to 17 models).
        From the disk cache that was 4 ms of loading and decoding a 7B model each time; on 1,000 virtual 7B
        models in interleaved families the merge step and the rest of the lineage step went from 0.15 to
        0.29 CPU s a model as arrivals' relatives left the recent-arrivals memory (bench/crawl_rate.py).
        The values are the cache's, so nothing compared changes."""
        key = (repo_id, revision)
        if (arrays := self._recall.get(key)) is not None:
            self._recall.move_to_end(key)
            return arrays
        arrays = self._cached_or_refetched(repo_id, revision, names, heads)
        if arrays is None:
            return None
        self._recall[key] = arrays
        self._recall_held += sum(np.asarray(a).nbytes for a in arrays.values())
        while self._recall_held > self._recall_bytes and self._recall:
            _, old = self._recall.popitem(last=False)
            self._recall_held -= sum(np.asarray(a).nbytes for a in old.values())
        return arrays

    def _content(self, repo_id: str, revision: str) -> tuple[str, str, str]:
        """What names a model's arrays for the caches that outlive them (ModelView.content, the merge fits'
        PairCache): this index's token (two indexes may read one repo at different budgets), the repo and
        its revision."""
        return (self._token, repo_id, revision)

    def _cached_or_refetched(self, repo_id: str, revision: str, names: tuple[str, ...],
                             heads: tuple[str, ...] = ()) -> Mapping[str, np.ndarray] | None:
        """The nominee's selected tensors from the on-disk cache, else read again by range (the cache is
        bounded: at the default 1 GiB it holds 8 models' 7B-shaped selections) and cached again. `heads`:
        its head tensors too, where the cache or the read has them; they break ties of identical bodies
        (`heads_distance`), and one side without them reads as wholly different heads, so a store reopened
        for the next night's crawl once put a duplicate under its original's frozen-backbone sibling."""
        found = {n: self.cache.get((repo_id, revision, n, 0)) for n in names}
        if all(a is not None for a in found.values()):
            held = {n: self.cache.get((repo_id, revision, n, 0)) for n in heads}
            return found | {n: a for n, a in held.items() if a is not None}  # type: ignore[return-value]
        if self.refetch is None:
            logger.warning("%s: its tensors are neither in memory nor in the cache, and there is no source to "
                           "read them again from; not compared", repo_id)
            return None
        try:
            fresh = self.refetch(repo_id, revision)
        except Exception as exc:  # noqa: BLE001 -- one unreadable nominee must not stop the arrival
            logger.warning("%s: reading its tensors again failed (%s); not compared", repo_id, exc)
            return None
        if any(n not in fresh for n in names):
            logger.warning("%s: read again, it no longer has the tensors it was sketched from; not compared", repo_id)
            return None
        kept = {n: np.asarray(fresh[n], dtype=np.float32) for n in (*names, *heads) if n in fresh}
        self._persist_arrays(repo_id, revision, kept)
        return kept

    # --- persistence ---------------------------------------------------------------------------------

    def _queue(self, family: str, state: _Family, repo_id: str, revision: str, sketch: Sketch, view: ModelView,
               rows: list[CandidateRecord], touched: Sequence[str], *, quant: QuantInfo | None = None,
               relative: Mapping[str, float] | None = None, casts: Sequence[tuple[str, str]] = (),
               declared: Sequence[str] = ()) -> None:
        stats: dict[str, object] = {"created": view.created, "direction": list(view.direction_layers),
                                    "seed": sketch.seed, "pair_rule": PAIR_RULE, "head_values": view.head_values,
                                    "copy_rank": list(view.copy_rank), "head_names": list(view.head_names)}
        if quant is not None:
            stats["quantized"] = {"scheme": quant.scheme, "predicted_error": quant.predicted_error}
        if relative:
            stats["relative"] = dict(sorted(relative.items()))
        if casts:
            stats["casts"] = [list(c) for c in casts]
        if declared:
            stats["declared"] = list(declared)
        self._pending["sketches"].append(SketchRecord(
            repo_id, revision, family, SKETCH_VERSION, tuple(sketch.vector.tolist()), sketch.kurtosis, sketch.norms,
            sketch.layer_names, json.dumps(stats, sort_keys=True)))
        self._pending["candidates"] += rows
        cid = state.forest.cluster_id(repo_id)
        # the cluster's key is its smallest member: when the newcomer is it, every row's key changes
        members = state.forest.members(cid) if state.forest.cluster_key(cid) == repo_id or len(touched) > 1 else [repo_id]
        self._pending["edges"] += self._edge_rows(state, members)
        self._dirty.add(family)
        self._since_flush += 1
        if self._since_flush >= self.flush_every:
            self.flush()

    def _edge_rows(self, state: _Family, members: Sequence[str]) -> list[EdgeRecord]:
        now, forest, out = datetime.now(UTC), state.forest, []
        for m in members:
            cid = forest.cluster_id(m)
            parent = state.shown[m]
            dist = _reported(state.distance.get((parent, m), math.nan)) if parent else math.nan
            relation, parents = (_relation(state, parent, m), ()) if parent else ("", ())
            merge = _merge_parents(state, m)
            if merge:
                parent, parents, relation = merge[0][0], merge, "merge"
                dist = _reported(state.distance.get((parent, m), math.nan))
            out.append(EdgeRecord(m, state.revisions[m], state.name,
                                  forest.cluster_key(cid), parent, state.shown_root[cid], state.depth[m], dist,
                                  _ku_all(state.views[m]), _confidence(forest, m, parent, timed=_timed(state, parent, m)),
                                  now,
                                  relation=relation, parents=parents))
        return out + self._satellite_rows(set(members), now)

    def flush(self) -> None:
        """Write queued rows (candidates, edges, then sketches), then save the touched families' FAISS indexes.

        The sketch row goes last because it is what marks an arrival as done (`add` returns at once for a
        known revision): written first, a crash before the candidates lost that model's edges for good
        (regression: tests/test_reliability_crash.py::test_kill_between_sketch_and_candidates_loses_no_edge)."""
        for table in ("candidates", "edges", "sketches"):
            rows, self._pending[table] = self._pending[table], []
            if rows:
                self.store.append(table, rows)  # type: ignore[arg-type]
        for family in sorted(self._dirty):
            vectors = self._families[family].vectors
            if vectors is not None:
                vectors.save(self.store.home)
        self._dirty.clear()
        self._since_flush = 0

    # --- adapters (satellites) ------------------------------------------------------------------------

    def add_adapter(self, arrival: AdapterArrival) -> tuple[str, dict[str, object]]:
        """Place one adapter (module docstring); returns (its family, details for its models row)."""
        sats, read = self._satellites(), arrival.adapter
        updates = lora_updates(read.config, lora_arrays(arrival.arrays))  # AdapterError: a recorded failure
        declared = read.config.base_model.strip()
        anchor = resolve_base(declared, self._home_of)
        name = anchor or declared
        family = self._home_families()[anchor] if anchor else family_by_shapes(updates, read.saved, self._registry.families)
        shapes, source = self._shapes_for(name, family)
        compat = base_verdict(updates, read.saved, shapes, layout=read.config.layout)
        magnitudes = base_magnitudes(compat, updates, self.bases, name)
        norm = total_norm(updates)
        created = arrival.created_at.timestamp() if arrival.created_at is not None else None
        parent, ratio, touched = self._chain(arrival.repo_id, name, created, norm, updates)
        confidence = base_confidence(compat, magnitudes)
        if parent != name:
            confidence = 1.0 - ratio / CHAIN_RATIO
        sats[arrival.repo_id] = Satellite(arrival.repo_id, arrival.revision, family, name, anchor is None, parent,
                                          "adapter", ratio, confidence, created, norm, read.config,
                                          tuple(sorted(arrival.arrays)))
        self._keep_updates(arrival.repo_id, updates)
        self._pending["edges"] += self._group_rows(name, datetime.now(UTC))
        self._since_flush += 1
        if self._since_flush >= self.flush_every:
            self.flush()
        # where it hangs (base, external or not, chain parent) is the edges row's: it moves as models arrive
        details: dict[str, object] = {"update_norm": round(norm, 6), "chain_compared": touched}
        return family, details | verdict_details(compat, source=source, magnitudes=magnitudes)

    def _chain(self, repo_id: str, anchor: str, created: float | None, norm: float,
               updates: Mapping[str, LoraUpdate]) -> tuple[str, float, int]:
        """(parent, its update ratio or NaN, adapters compared): at most k adapters of the same anchor,
        nearest in update norm; later related ones whose current parent is farther move under the newcomer."""
        sats = self._satellites()
        new = Peer(repo_id, created, norm)
        group = [Peer(s.repo_id, s.created, s.norm) for s in sats.values() if s.anchor == anchor]
        compared = nearest_peers(new, group, self.k)
        ratios: dict[str, float] = {}
        for peer in compared:
            other = self._adapter_updates(sats[peer.repo_id])
            ratio = chain_ratio(updates, other) if other is not None else None
            if ratio is not None and ratio < CHAIN_RATIO:
                ratios[peer.repo_id] = ratio
        self.exact_total += len(compared)
        before = sorted((r, p.repo_id) for p in compared if p.repo_id in ratios and earlier(p, new) for r in [ratios[p.repo_id]])
        for peer in compared:  # the newcomer may be the missing link of an adapter that arrived before it
            sat = sats[peer.repo_id]
            current = sat.distance if sat.parent != sat.anchor else CHAIN_RATIO
            if peer.repo_id in ratios and earlier(new, peer) and ratios[peer.repo_id] < current:
                sat.parent, sat.distance = repo_id, ratios[peer.repo_id]
                sat.confidence = 1.0 - sat.distance / CHAIN_RATIO
        if before:
            return before[0][1], before[0][0], len(compared)
        return anchor, math.nan, len(compared)

    def _satellites(self) -> dict[str, Satellite]:
        """Every satellite, loaded from the store on first use (edges rows of relation `adapter` and the
        adapters' models rows, whose details hold the config their update scales need)."""
        if self._sats is None:
            self._sats = _load_satellites(self.store.home)
        return self._sats

    def _home_families(self) -> dict[str, str]:
        """Forest repo id -> family: every committed sketch, and every model placed by this session."""
        if self._homes is None:
            table = read_table(self.store.home, "sketches", columns=["repo_id", "family"])
            self._homes = dict(zip(table.column("repo_id").to_pylist(), table.column("family").to_pylist(), strict=True))
            for state in self._families.values():
                self._homes.update({r: state.name for r in state.views})
        return self._homes

    def _home_of(self, repo_id: str) -> str | None:
        """The forest repo id `repo_id` names: exact, else case-insensitive (the Hub's ids are)."""
        homes = self._home_families()
        if repo_id in homes:
            return repo_id
        lowered = repo_id.lower()
        matches = sorted(r for r in homes if r.lower() == lowered)
        return matches[0] if matches else None

    def _shapes_for(self, name: str, family: str) -> tuple[Mapping[str, tuple[int, ...]] | None, str]:
        """The base's tensor shapes: its header (crawl) when readable, else its family's shapes."""
        shapes = None
        if self.bases is not None:
            try:
                shapes = self.bases.shapes(name)
            except Exception as exc:  # noqa: BLE001 -- an unreadable base leaves the verdict to the family
                logger.warning("base %s: header not read (%s)", name, exc)
        if shapes is not None:
            return shapes, "base header"
        if family and family in self._registry.families:
            return self._registry.families[family], "family shapes"
        return None, ""

    def _keep_updates(self, repo_id: str, updates: Mapping[str, LoraUpdate]) -> None:
        if repo_id in self._updates:
            self._update_bytes -= _factor_bytes(self._updates.pop(repo_id))
        self._updates[repo_id] = updates
        self._update_bytes += _factor_bytes(updates)
        while self._update_bytes > self._array_bytes and len(self._updates) > 1:
            _, old = self._updates.popitem(last=False)
            self._update_bytes -= _factor_bytes(old)

    def _adapter_updates(self, sat: Satellite) -> Mapping[str, LoraUpdate] | None:
        """An adapter's updates: memory, else its factors from the cache, else read again by range."""
        if sat.repo_id in self._updates:
            return self._updates[sat.repo_id]
        found = {n: self.cache.get((sat.repo_id, sat.revision, n, 0)) for n in sat.tensors}
        arrays: Mapping[str, np.ndarray] | None = found if sat.tensors and all(a is not None for a in found.values()) else None  # type: ignore[assignment]
        if arrays is None and self.refetch is not None:
            try:
                arrays = self.refetch(sat.repo_id, sat.revision)
            except Exception as exc:  # noqa: BLE001 -- one unreadable peer must not stop the arrival
                logger.warning("%s: reading its LoRA factors again failed (%s); not compared", sat.repo_id, exc)
        if arrays is None or sat.config is None:
            self.not_compared += 1
            return None
        updates = lora_updates(sat.config, lora_arrays(arrays))
        self._keep_updates(sat.repo_id, updates)
        return updates

    def _group_rows(self, anchor: str, now: datetime) -> list[EdgeRecord]:
        """The rows of every satellite under `anchor` (a chain change moves the depths below it)."""
        sats = self._satellites()
        return [self._satellite_row(sats[r], now) for r in sorted(sats) if sats[r].anchor == anchor]

    def _satellite_rows(self, members: set[str], now: datetime) -> list[EdgeRecord]:
        if self._sats is None and not self._maybe_satellites():
            return []
        sats = self._satellites()
        return [self._satellite_row(sats[r], now) for r in sorted(sats) if sats[r].anchor in members and not sats[r].external]

    def _maybe_satellites(self) -> bool:
        """Load the satellites only when the store has any: a store without adapters pays one small query."""
        if self._sats is None:
            self._sats = _load_satellites(self.store.home)
        return bool(self._sats)

    def _satellite_row(self, sat: Satellite, now: datetime) -> EdgeRecord:
        cluster, root, depth = EXTERNAL_PREFIX + sat.anchor, sat.anchor, 0
        if not sat.external and sat.family in self._families and sat.anchor in self._families[sat.family].views:
            state = self._families[sat.family]
            cid = state.forest.cluster_id(sat.anchor)
            cluster, root, depth = state.forest.cluster_key(cid), state.shown_root[cid], state.depth.get(sat.anchor, 0)
        elif not sat.external:
            state = self.family(sat.family)  # loads the family: its forest places the anchor
            return self._satellite_row(sat, now) if sat.anchor in state.views else self._external_row(sat, now)
        return EdgeRecord(sat.repo_id, sat.revision, sat.family, cluster, sat.parent, root,
                          depth + chain_depth(self._satellites(), sat.repo_id), sat.distance, 0.0, sat.confidence, now,
                          relation=sat.relation)

    def _external_row(self, sat: Satellite, now: datetime) -> EdgeRecord:
        sat.external = True  # its anchor left the forest
        return self._satellite_row(sat, now)

    def _reanchor(self, repo_id: str, family: str) -> None:
        """A model that external satellites name as their base has arrived: they hang under it now."""
        if self._sats is None and not self._maybe_satellites():
            return
        lowered = repo_id.lower()
        if not any(s.external and lowered in _names_of(s.anchor) for s in self._satellites().values()):
            return
        waiting = [s for s in self._satellites().values()
                   if s.external and resolve_base(s.anchor, lambda n: repo_id if n.lower() == lowered else None)]
        anchors = {sat.anchor for sat in waiting}
        for sat in self._satellites().values():
            if sat.anchor in anchors:
                sat.external, sat.family = False, family
                sat.anchor = repo_id
                if sat.parent in anchors:
                    sat.parent = repo_id
        if anchors:
            logger.info("%d adapter(s) of %s now hang under the indexed repo", len(waiting), repo_id)
            self._pending["edges"] += self._group_rows(repo_id, datetime.now(UTC))

    # --- merges --------------------------------------------------------------------------------------

    def _merges(self, state: _Family, new: ModelView, related: Sequence[PairMeasure]) -> None:
        """Is the newcomer a merge of its related relatives, and does it change the pool of one of them (a
        merge listed before its parents: the crawl lists newest first)? Each model is fitted over the pool
        `indexer.relations.pool.merge_pool` draws from every related model measured so far (the rule batch
        applies to a tree), and fitted again whenever that pool changes, the result replacing the last one:
        once every model has arrived, each has been fitted over the pool of its whole related set, in any
        arrival order. A change of a model's merge status refits the models after it (`fit_order`) that
        had it among their relatives or in their pool: their fits read its status. At most k + 1 fits per
        arrival, each over at most MERGE_CANDIDATES + 1 models and the parents of the merges among them,
        and a refit per model a changed status reaches."""
        if new.repo_id in state.quant:
            return
        others = sorted({q.other for q in related} - set(state.quant))
        for other in others:  # the arrival's arrays are at hand now: measure its pairs once
            self._pair_stats(state, other, new.repo_id, new)
        changed = [new.repo_id] if self._fit_merge(state, new.repo_id, new) else []
        for other in others:
            if self._fit_merge(state, other):
                self._pending["edges"] += self._edge_rows(state, [other])
                changed.append(other)
        while changed:
            m = changed.pop(0)
            for y in self._readers_of(state, m):
                if self._fit_merge(state, y):
                    self._pending["edges"] += self._edge_rows(state, [y])
                    changed.append(y)

    def _readers_of(self, state: _Family, m: str) -> list[str]:
        """The models whose fit reads m's merge status: after m in `fit_order`, with m among their measured
        relatives or in their last pool."""
        after = fit_order(state.views[m].created, m)
        near = set(state.forest._out.get(m, {})) | set(state.forest._in.get(m, {}))
        near |= {y for y, key in state.pools.items() if any(r == m for r, *_ in key)}
        return sorted(y for y in near if y in state.views and y not in state.quant
                      and fit_order(state.views[y].created, y) > after)

    def _pair_stats(self, state: _Family, a: str, b: str, view: ModelView | None = None) -> PairStats | None:
        """The pool statistic of the pair, measured on first use (`view`: b's, when at hand; after a restart
        the arrays come from memory or the cache); None while either's arrays cannot be had."""
        first, second = sorted((a, b))
        key = (first, state.revisions.get(first, ""), second, state.revisions.get(second, ""))
        if key not in state.pair_stats:
            views = {r: view if view is not None and r == view.repo_id else self._with_arrays(state, r) for r in (a, b)}
            if views[a] is None or views[b] is None:
                return None  # asked again next time
            state.pair_stats[key] = pair_stats(views[first].arrays, views[second].arrays)  # type: ignore[union-attr]
        return state.pair_stats[key]

    def _fit_merge(self, state: _Family, repo_id: str, view: ModelView | None = None) -> bool:
        """Fit a model over its pool (`_merges`) when the pool or the merge status of a member changed;
        record it as a merge or as none; True when its merge parents changed. The pool leaves out relatives
        uploaded after it, which also keeps a merge's own parents from being read as merges of it: a TIES
        merge shares bit-equal entries with its parents as much as with its base. A known merge's parents
        are its relatives too (batch has them in the tree), measured now when never compared with it, and so
        are the relatives its card names (`indexer.relations.pool.declared_relatives`)."""
        created = view.created if view is not None else state.views[repo_id].created
        mine = fit_order(created, repo_id)
        known = {m: [p for p, _ in links] for m, links in state.merges.items()
                 if m in state.views and fit_order(state.views[m].created, m) < mine}
        relatives = {}
        for other in sorted(state.forest._in.get(repo_id, {})):
            if other not in state.quant and (found := self._pair_stats(state, repo_id, other, view)) is not None:
                relatives[other] = (state.views[other].created, found)
        declared = declared_relatives(state.declared.get(repo_id, ()), state.views)
        for other in sorted(({p for r in relatives for p in merge_parents_of(r, known)} | declared) - set(relatives) - {repo_id}):
            if other in state.views and other not in state.quant and (found := self._pair_stats(state, repo_id, other, view)) is not None:
                relatives[other] = (state.views[other].created, found)
        pool = merge_pool(created, relatives, lambda a, b: self._identical(state, a, b), known, declared)
        key = tuple((r, state.revisions.get(r, ""), tuple(known.get(r, ()))) for r in pool)
        if state.pools.get(repo_id) == key:
            return False  # the same pool fits the same way
        x = view if view is not None else self._with_arrays(state, repo_id)
        views = {r: v for r in pool if (v := self._with_arrays(state, r)) is not None}
        if x is None or len(views) < len(pool):
            return False  # unreadable now: fitted again when its pool next changes
        keys = {r: self._content(r, state.revisions.get(r, "")) for r in [*views, repo_id]}
        found = (fit(x.arrays, {r: self._with_mlp_rows(r, v.arrays, x.arrays) for r, v in views.items()},
                     merges={r: known[r] for r in pool if r in known},
                     cache=self._pair_cache, keys=keys, x_key=keys[repo_id])
                 if len(views) >= 2 else None)
        state.pools[repo_id] = key
        before = state.merges.pop(repo_id, None)
        if found is not None and found.is_merge:
            state.merges[repo_id] = found.parents
            logger.info("%s: a merge of %s (residual ratio %.3f)", repo_id, found.parents, found.ratio)
        return state.merges.get(repo_id) != before

    def _with_mlp_rows(self, repo_id: str, arrays: Mapping[str, np.ndarray],
                       x: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        """A candidate's arrays for the fit of x, plus, when x is a MoE read in part, the first rows of the
        dense MLP matrices x's expert blocks stand for (`sketches.experts.expert_alias`), read by range
        where the candidate lives (`self.bases`): a plan at 7B reads no MLP row of a dense model, and a
        mergekit-moe's experts are copies of its sources' MLPs (`indexer.relations.merges._stacked`)."""
        wanted: dict[str, int] = {}
        for name, a in x.items():
            alias = expert_alias(name)
            if alias is not None and alias not in arrays and np.ndim(a) == 2:
                wanted[alias] = max(wanted.get(alias, 0), int(np.shape(a)[0]))
        if not wanted or self.bases is None:
            return arrays
        rows = self.bases.rows(repo_id, wanted) or {}
        return {**arrays, **{n: np.asarray(r, dtype=np.float32) for n, r in rows.items()}}

    def _identical(self, state: _Family, a: str, b: str) -> bool:
        """Two relatives at the same distance from a model: bit-identical? (merge_pool asks only then)."""
        if (a, b) in state.identical:
            return True
        va, vb = self._with_arrays(state, a), self._with_arrays(state, b)
        return va is not None and vb is not None and identical(va.arrays, vb.arrays)

    def _adopt_orphans(self, family: str) -> None:
        """A new family: adapters that arrived before any model they fit (external base, no family) join it
        when their updates fit its shapes."""
        if self._sats is None and not self._maybe_satellites():
            return
        shapes = self._registry.families.get(family)
        orphans = [s for s in self._satellites().values() if s.external and not s.family]
        for sat in sorted(orphans, key=lambda s: s.repo_id) if shapes else []:
            updates = self._adapter_updates(sat)
            if updates is not None and family_by_shapes(updates, {}, {family: shapes}) == family:
                sat.family = family
                self._pending["edges"] += self._group_rows(sat.anchor, datetime.now(UTC))

    # --- the reference -------------------------------------------------------------------------------

    def recompute_batch(self, family: str) -> dict[str, str]:
        """child -> parent from scratch on the family's candidate edges (the invariant's reference)."""
        return self.family(family).forest.batch_parents()

    def parents(self, family: str) -> dict[str, str]:
        return self.family(family).forest.parents()

    def families(self) -> list[str]:
        return sorted(self._families)


def _job_layers(new: ModelView, others: Sequence[ModelView]) -> frozenset[str] | None:
    """The layers `exact.measure_many` compares in a job: common to the arrival and all its nominees
    (None: no nominee)."""
    return frozenset.intersection(*(frozenset(common_layers(new, o)) for o in others)) if others else None


def _restricted(new: ModelView, layers: frozenset[str]) -> ModelView:
    """The arrival with only `layers` of its body (heads kept: they only break ties, pair by pair)."""
    return replace(new, arrays={n: a for n, a in new.arrays.items() if n in layers or is_head(n)})


def _aligned(new: ModelView, others: Sequence[ModelView]) -> tuple[ModelView, list[ModelView]]:
    """The new model and its nominees cut to the rows they all hold of each tensor. Blocks start at row 0
    and a plan depends on the item size, so a model read in another dtype (an F32 source beside a
    quantized copy planned as BF16, a BF16 sibling) holds a row prefix of the same block: compare the
    common prefix. Nominees that share no tensor with the new model at all are left out (logged). Heads
    are never cut: they only break ties (`heads_distance`), pair by pair, and a head whose class count
    differs is another head; cut to the job's fewest rows, a head's distance to one nominee depended on
    which other nominees came along (wild-bert-s1, order 1: two children of a root hung under its
    re-save, whose heads read nearer only because a third model's classifier was shorter)."""
    def trail(a: np.ndarray) -> tuple[int, ...]:
        return tuple(np.shape(a)[1:])

    kept = [o for o in others if any(n in o.arrays and trail(o.arrays[n]) == trail(a) for n, a in new.arrays.items())]
    if len(kept) < len(others):
        logger.info("%s: %d nominee(s) share no tensor with it; not compared", new.repo_id, len(others) - len(kept))
    rows = {n: min([np.shape(a)[0], *(np.shape(o.arrays[n])[0] for o in kept
                                      if n in o.arrays and trail(o.arrays[n]) == trail(a))])
            for n, a in new.arrays.items() if np.ndim(a) >= 1 and not is_head(n)}
    if all(np.shape(a)[0] == rows[n] for n, a in new.arrays.items() if n in rows) and all(
            np.shape(o.arrays[n])[0] == rows[n] for o in kept for n in rows if n in o.arrays
            and trail(o.arrays[n]) == trail(new.arrays[n])):
        return new, kept  # the usual case (one plan, one item size): nothing to cut

    def cut(view: ModelView) -> ModelView:
        arrays = {n: (a[: rows[n]] if n in rows and trail(a) == trail(new.arrays[n]) else a) for n, a in view.arrays.items()}
        return replace(view, arrays=arrays)

    return cut(new), [cut(o) for o in kept]


def _merge_parents(state: _Family, node: str) -> tuple[tuple[str, float], ...]:
    """A merge node's parents for its edges row (indexer.relations.merges.merge_row_parents, the rule batch
    applies: heaviest first, led by the first one not below it in the forest); () when it is not a merge."""
    links = state.merges.get(node, ())
    return merge_row_parents(node, links, _ForestParents(state)) if len(links) >= 2 else ()


class _ForestParents(Mapping[str, str]):
    """child -> parent ("" a root) of every model of the family, read from its forest on demand: a merge
    row looks up a few ancestors, where a dict copy would cost the whole family per row."""

    def __init__(self, state: _Family) -> None:
        self._state = state

    def __getitem__(self, node: str) -> str:
        if node not in self._state.views:
            raise KeyError(node)
        return self._state.shown[node]

    def __contains__(self, node: object) -> bool:
        return node in self._state.views

    def __iter__(self) -> Iterator[str]:
        return iter(self._state.views)

    def __len__(self) -> int:
        return len(self._state.views)


def _names_of(declared: str) -> tuple[str, ...]:
    """The lower-cased ids a declared base may resolve to (indexer.relations.adapters.resolve_base)."""
    name = declared.strip().rstrip("/").lower()
    return (name, "/".join(name.split("/")[-2:]))


def _factor_bytes(updates: Mapping[str, LoraUpdate]) -> int:
    return sum(u.a.nbytes + u.b.nbytes for u in updates.values())


def _load_satellites(home: Path) -> dict[str, Satellite]:
    """The satellites a store holds: adapter edges rows, their configs from the adapters' models rows."""
    edges = read_table(home, "edges", where={"relation": "adapter"}).to_pylist()
    if not edges:
        return {}
    models = read_table(home, "models", where={"weights_format": "adapter"},
                        columns=["repo_id", "revision", "created_at", "details"]).to_pylist()
    info = {(m["repo_id"], m["revision"]): m for m in models}
    by_id = {e["repo_id"]: e for e in edges}
    out = {}
    for e in edges:
        anchor, seen = e["parent"], set()
        while anchor in by_id and anchor not in seen:  # up the chain to the first non-adapter
            seen.add(anchor)
            anchor = by_id[anchor]["parent"]
        m = info.get((e["repo_id"], e["revision"]), {})
        details = json.loads(m.get("details") or "{}")
        created = m["created_at"].timestamp() if m.get("created_at") is not None else None
        out[e["repo_id"]] = Satellite(e["repo_id"], e["revision"], e["family"], anchor,
                                      e["cluster"].startswith(EXTERNAL_PREFIX), e["parent"], "adapter",
                                      e["distance"], e["confidence"], created, float(details.get("update_norm", 0.0)),
                                      config_from_details(details) if details else None)
    return out


def _check_pair_rule(family: str, stats: Sequence[Mapping[str, object]], shapes: Mapping[str, object],
                     layouts: int = 1) -> None:
    """Refuse a family whose candidate edges were weighted by another pair rule: mixing them with new
    edges would make one tree of two incomparable distances (and break the batch-equals-incremental
    invariant). Rule 1 (no `pair_rule` in the stats): session-1 `l2n`; rule 2: the spectral tail.
    Rules 5 and 6 weighed every pair of a family whose models all hold one body layout (`layouts`: how many
    distinct sets of body tensor names its sketches hold) as rule 7 does, rule 5 only when that layout has no
    expert (`shapes`: the family registry's first model): such a family is accepted."""
    rules = {int(st.get("pair_rule", 1)) for st in stats}  # type: ignore[call-overload]
    if layouts <= 1:
        rules -= {6}
        if not any(expert_alias(normalise_name(n)) for n in shapes):
            rules -= DENSE_COMPATIBLE_RULES
    if rules - {PAIR_RULE}:
        raise StoreError(f"family {family!r} in this index was built with pair rule {sorted(rules)} and this "
                         f"version weighs candidate edges with rule {PAIR_RULE}; crawl into a fresh INDEX_HOME "
                         "(the old one stays readable by index query/export)")


def _reported(distance: float) -> float:
    """The distance an edge row shows: the pair's distance within its regime (LoRA: summed rank fraction;
    full fine-tuning: the spectral-tail distance), without the tier offset that orders the two regimes."""
    return distance - TIER_GAP if distance >= TIER_GAP else distance


def _ku_all(view: ModelView) -> float:
    vals = [view.kurtosis[n] for n in view.direction_layers if n in view.kurtosis]
    return float(sum(v for v in vals if not math.isnan(v)))


def _relation(state: _Family, parent: str, child: str) -> str:
    """The relation of a placed edge: `quantized` when the child is a quantized copy within its scheme's
    predicted error of the parent (indexer.relations.rules.within_quantization_error); `duplicate` when the pair's compared layers are
    bit-identical and the child was not uploaded before the parent (unknown times: not before); else
    `finetune` (a quantized copy of a model that is not indexed sits under that model's parent). An exact
    F16 / BF16 cast of its parent is `quantized` too (`_Family.casts`), as in batch mother."""
    if (parent, child) in state.casts:
        return "quantized"
    quant = state.quant.get(child)
    if quant is not None:
        rel = state.relative.get((parent, child))
        if rel is not None and within_quantization_error(rel, quant.predicted_error):
            return "quantized"
    if (parent, child) in state.identical:
        t_parent, t_child = state.views[parent].created, state.views[child].created
        if t_parent is None or t_child is None or t_child >= t_parent:
            return "duplicate"
    return "finetune"


def _timed(state: _Family, parent: str, child: str) -> bool:
    """Was the edge oriented by upload times (both known)? The confidence's `t` (indexer.lineage.confidence)."""
    if not parent or parent not in state.views:
        return False
    t_parent, t_child = state.views[parent].created, state.views[child].created
    return t_parent is not None and t_child is not None and t_parent != t_child


def _confidence(forest: IncrementalForest, node: str, parent: str, *, timed: bool = True) -> float:
    """The calibrated confidence of a node's parent edge (indexer.lineage.confidence), NaN for a root.

    The margin is batch mother's, on the linear scale of the pair distance: weights are log distances
    (plus penalties), so (c_r - c_p) / (c_r + c_p) = tanh((w_r - w_p) / 2) over the cheapest related rival;
    no rival: margin 1."""
    if not parent:
        return math.nan
    rivals = sorted(w for p, w in forest._in[node].items() if p != parent)
    margin = 1.0 if not rivals else math.tanh(max(0.0, rivals[0] - forest.weight(parent, node)) / 2.0)
    return calibrated(margin, timed=timed)


def _copy_tie(state: _Family, pair: PairMeasure, new: ModelView, other: ModelView) -> tuple[float, float]:
    """What to add to the weights (other -> new, new -> other) of two byte-identical copies of one upload
    time: COPY_TIE on the edge into the original, as batch mother picks it (indexer.lineage.ties.
    duplicate_originals): the copy whose card declares the other comes after it, then the smaller
    `copy_rank` (a re-save through a wrapper adds a prefix, a newer library drops buffers), then the
    smaller repo id. Copies of other times are ordered by `tie_weight` (the earliest upload)."""
    if not pair.identical or pair.heads != 0.0 or new.created != other.created:
        return 0.0, 0.0

    new_first = _copy_key(state, new, other.repo_id) < _copy_key(state, other, new.repo_id)
    return (COPY_TIE, 0.0) if new_first else (0.0, COPY_TIE)


def _reshow(state: _Family, cid: int, touched: Sequence[str]) -> bool:
    """Set the shown parents of cluster `cid` (`_shown_parents`); True when one moved that is not among
    `touched` (the forest's own changes): a re-rooting, which moves every depth below it."""
    forest = state.forest
    root = forest.root(cid)
    if state.dated[state.views[root].created] < 2 and not any(forest.cluster_id(m) == cid for m in state.moved):
        # the usual case (all times distinct, nothing shown re-rooted here): the forest's parents, O(touched)
        state.shown.update({m: forest.parent(m) for m in touched})
        state.shown_root[cid] = root
        return False
    shown = _shown_parents(state, cid)
    moved = any(state.shown.get(m) != p for m, p in shown.items() if m not in touched)
    state.shown.update(shown)
    state.moved = {m for m in state.moved if m not in shown} | {m for m, p in shown.items() if p != forest.parent(m)}
    state.shown_root[cid] = next(m for m, p in shown.items() if not p)
    return moved


def _shown_parents(state: _Family, cid: int) -> dict[str, str]:
    """The cluster's parents as its edges rows show them: the forest's, but with the subtree of the models
    that share the root's upload time rooted at its centre, as batch mother orients a tree without times
    (indexer.lineage.orient). On the Hub bert-base-uncased and its 2020 fine-tunes all read 2022-03-02:
    their pair weights carry no direction (`penalty_count`), so the forest's root among them is arbitrary,
    and any rooting of that subtree costs the same. Two centres: batch's prior (the fewer head tensors,
    then the wider head), then the norm regime of the subtree's other edges (`_regime_rank`), then the one
    nearer the others (the medoid, over the measured pairs), then the forest's root, then the smaller id."""
    forest = state.forest
    root = forest.root(cid)
    t0 = state.views[root].created
    members = forest.members(cid)
    parent = {m: forest.parent(m) for m in members}
    group = {m for m in members if state.views[m].created == t0}
    if len(group) < 2:
        return parent
    # a merge, a quantized copy, a cast or a later byte-identical copy is a leaf, never a family's source
    copies = _later_copies(state, group)
    merges = {m for m, links in state.merges.items() if len(links) >= 2}
    leaves = set(state.quant) | {copy for _, copy in state.casts} | merges | set(copies)
    barred = {m for m in group & merges
              if set_aside_undated(state.merges[m], [o for o in members if o != m],
                                   lambda a, b: state.distance.get((a, b)), merges)}
    near = _without_merges(state, group, group & leaves) if barred else None
    if near is None:
        barred, near = set(), {m: [] for m in group}
        for m in sorted(group):
            if parent[m] in group:
                near[m].append(parent[m])
                near[parent[m]].append(m)
    far, _ = _bfs(near, root if root in near else min(near))
    end = max(far, key=lambda m: (far[m], m))
    dist_end, back = _bfs(near, end)
    other = max(dist_end, key=lambda m: (dist_end[m], m))
    path = [other]
    while path[-1] != end:
        path.append(back[path[-1]])
    length = len(path) - 1
    centres = sorted({path[length // 2], path[(length + 1) // 2]})
    if all(c in leaves for c in centres):  # the nearest model that may be the source
        hops, _ = _bfs(near, centres[0])
        allowed = [m for m in hops if m not in leaves]
        if not allowed:
            return parent
        closest = min(hops[m] for m in allowed)
        centres = sorted(m for m in allowed if hops[m] == closest)
    centres = [c for c in centres if c not in leaves]
    centres = sorted(with_nearest(centres, lambda c: [x for x in near[c] if x not in leaves],
                                  lambda a, b: state.distance.get((a, b), math.inf)))
    # the regime orients a central edge: two adjacent centres (not two leaves' nearest stand-ins)
    tied = (len(centres) == 2 and centres[1] in near[centres[0]]
            and state.views[centres[0]].heads == state.views[centres[1]].heads)
    regime = _regime_rank(state, near, centres) if tied else {}

    def spread(c: str) -> tuple[int, int, int, float, int, str]:
        measured = [state.distance[(c, x)] for x in dist_end if (c, x) in state.distance]
        count, values = state.views[c].heads
        return (count, -values, regime.get(c, 0), (sum(measured) / len(measured) if measured else math.inf),
                int(c != root), c)

    centre = min(centres, key=spread)
    if centre != root or barred:
        _, back = _bfs(near, centre)
        for m, up in back.items():
            parent[m] = up
        parent[centre] = ""
    for m in sorted(barred):  # a merge set aside: under its heaviest merge parent, as batch's second pass
        heaviest = heaviest_parent(state.merges[m])
        parent[m] = heaviest if heaviest in parent else parent[m]
    return _under_originals(parent, copies, lambda up, child: up in state.forest._in.get(child, {}))


def _without_merges(state: _Family, group: set[str], barred: set[str]) -> dict[str, list[str]] | None:
    """The minimum spanning tree of `group` but its leaves (`barred`: merges, quantized copies, casts, later
    copies, which keep their forest parents), over their candidate edges, each pair weighed by its costlier
    direction as batch's `orient.centre_rooted_tree` weighs it; adjacency lists, or None when those edges
    leave the rest in pieces. Why: a merge of two fine-tunes dated like them sits between them (ft1 - merge
    - ft2) in the forest's tree, whose centre is then the merge or beside it, with the base below; batch
    draws such a tree again without its merges (indexer.lineage.recover._merges), and places quantized
    copies, duplicates and casts beside its trees."""
    forest, core = state.forest, sorted(group - barred)
    graph = nx.Graph()
    graph.add_nodes_from(core)
    for child in core:
        for up, weight in forest._in.get(child, {}).items():
            if up in group and up not in barred and (not graph.has_edge(up, child) or graph[up][child]["weight"] < weight):
                graph.add_edge(up, child, weight=weight)
    if len(core) < 2 or not nx.is_connected(graph):
        return None
    tree = nx.minimum_spanning_tree(graph, algorithm="kruskal")
    return {m: sorted(tree.neighbors(m)) for m in core}


def _regime_rank(state: _Family, near: Mapping[str, Sequence[str]], centres: Sequence[str]) -> dict[str, int]:
    """Between two centres whose heads tie: {centre: 0 for the parent the group's norm regime picks, 1 for the
    other}, {} when unclear, as batch's `orient._central_edge`. Its votes are taken on the per-layer norms
    every view keeps (`_layer_norm_vote`), so no array is recalled; batch's on every row's norm."""
    a, b = centres
    _, back = _bfs(near, a)
    first = regime_parent([(p, c) for c, p in back.items()], a, b,
                          lambda p, c: _layer_norm_vote(state.views[str(p)], state.views[str(c)]))
    return {} if first is None else {str(first): 0, (b if first == a else a): 1}


def _layer_norm_vote(parent: ModelView, child: ModelView) -> float:
    """`orient.norm_t_votes` of parent -> child over the body layers both sketched (> 0: the child's are
    shorter), each layer's norm one paired observation."""
    names = sorted(n for n in parent.norms.keys() & child.norms.keys() if not is_head(n))
    if len(names) < 2:
        return 0.0
    rows = [np.array([view.norms[n] for n in names], dtype=np.float64) for view in (parent, child)]
    return float(norm_t_votes(rows)[0, 1])


def _later_copies(state: _Family, group: set[str]) -> dict[str, str]:
    """copy -> its original among models of one upload time whose compared layers are bit-identical and
    whose heads are alike in count and size (a frozen-backbone transfer has a head of another size: no
    copy), the original as `_copy_tie` picks it."""
    out: dict[str, str] = {}
    views = state.views
    for a, b in sorted(state.identical):
        if a in group and b in group and views[a].heads == views[b].heads:
            first, later = (a, b) if _copy_key(state, views[a], b) < _copy_key(state, views[b], a) else (b, a)
            if later not in out or _copy_key(state, views[first], later) < _copy_key(state, views[out[later]], later):
                out[later] = first
    return out


def _copy_key(state: _Family, me: ModelView, them: str) -> tuple[bool, tuple[int, int], str]:
    """Sort key of `me` as the original of its byte-identical copy `them` (smaller first; `_copy_tie`)."""
    declared = {b.lower() for b in state.declared.get(me.repo_id, ())}
    return copy_order(them.lower() in declared, me.copy_rank, me.repo_id)


def _under_originals(parent: dict[str, str], copies: Mapping[str, str],
                     candidate: Callable[[str, str], bool]) -> dict[str, str]:
    """Each later copy a leaf under its original: ties put children of one of two identical models under
    either, and a rooting from the centre may put the copy above its original; neither changes the cost.
    A child moves only along a candidate edge (`candidate(parent, child)`: compared, so its row has a
    distance and a confidence)."""
    def original(m: str) -> str:
        seen = {m}
        while m in copies and copies[m] not in seen:
            m = copies[m]
            seen.add(m)
        return m

    for copy in sorted(copies):
        first = original(copy)
        if first == copy:
            continue
        if parent.get(first) == copy and (not parent[copy] or candidate(parent[copy], first)):
            parent[first], parent[copy] = parent[copy], first  # the copy above its original: swap them
        for child, up in sorted(parent.items()):
            if up == copy and child != first and candidate(first, child):
                parent[child] = first
    return parent


def _bfs(near: Mapping[str, Sequence[str]], start: str) -> tuple[dict[str, int], dict[str, str]]:
    """Hops from `start` to every node it reaches, and each node's neighbour towards `start`."""
    hops, back, todo = {start: 0}, {}, [start]
    for u in todo:
        for v in sorted(near[u]):
            if v not in hops:
                hops[v], back[v] = hops[u] + 1, u
                todo.append(v)
    return hops, back


def _update_depths(state: _Family, touched: Sequence[str]) -> None:
    if len(touched) == 1:
        node = touched[0]
        parent = state.shown[node]
        state.depth[node] = state.depth[parent] + 1 if parent else 0
        return
    _all_depths(state, touched)


def _all_depths(state: _Family, nodes: Sequence[str] | None = None) -> None:
    todo = sorted(nodes) if nodes is not None else sorted(state.views)
    for node in todo:
        state.depth.pop(node, None)
    for node in todo:
        chain = []
        u = node
        while u and u not in state.depth:
            chain.append(u)
            u = state.shown[u]
        base = state.depth[u] + 1 if u else 0
        for i, v in enumerate(reversed(chain)):
            state.depth[v] = base + i


def _direction_layers(arrays: Mapping[str, np.ndarray], names: Sequence[str]) -> tuple[str, ...]:
    shapes = {n: tuple(np.shape(arrays[n])) for n in names}
    try:
        return select_layers([shapes], scheme="shared").direction
    except BadInputError:
        return tuple(names)


def _make_view(repo_id: str, arrays: Mapping[str, np.ndarray], sketch: Sketch, created_at: datetime | None,
               copy_rank: tuple[int, int] = (0, 0)) -> ModelView:
    created = created_at.timestamp() if created_at is not None else None
    kurt = dict(zip(sketch.layer_names, sketch.kurtosis, strict=True))
    norms = dict(zip(sketch.layer_names, sketch.norms, strict=True))
    heads = sorted(n for n in arrays if is_head(n))
    return ModelView(repo_id, {}, kurt, norms, created, _direction_layers(arrays, sketch.layer_names),
                     head_names=tuple(heads), head_values=int(sum(np.size(arrays[n]) for n in heads)),
                     copy_rank=copy_rank)


def _view_of(record: SketchRecord, stats: Mapping[str, object]) -> ModelView:
    kurt = dict(zip(record.layer_names, record.kurtosis, strict=True))
    norms = dict(zip(record.layer_names, record.norms, strict=True))
    rank = tuple(stats.get("copy_rank") or (0, 0))  # absent in stores written before: no prior
    return ModelView(record.repo_id, {}, kurt, norms, stats.get("created"), tuple(stats.get("direction", ())),  # type: ignore[arg-type]
                     head_names=tuple(stats.get("head_names") or ()), head_values=int(stats.get("head_values") or 0),  # type: ignore[call-overload]
                     copy_rank=(int(rank[0]), int(rank[1])))
