"""The candidate graph of one family and its forest, kept exactly optimal as nodes arrive. In memory only.

Clusters are the connected components of the candidate graph. Every candidate pair brings both
directions (u -> v and v -> u), so a component is strongly connected and has a spanning arborescence;
its tree is `arborescence.edmonds` on the component's edges with local node indices in sorted node-id
order (so ties break by (weight, parent id, child id) whatever the arrival order).

Arrival of v with its candidate edges (`IncrementalForest.add`):
    1. no edge: v is a new one-node cluster (its own root);
    2. edges into exactly one cluster whose dual is known: `try_attach` proves in O(k + |C|) numpy work
       that Edmonds would only hang v under its cheapest parent; then the tree gains one edge and every
       potential of the cluster moves by the same shift (the arithmetic Edmonds would do);
    3. otherwise (v bridges clusters, v would become a parent or the root, or a near-tie): the clusters
       are merged and Edmonds reruns on the merged cluster's edges only.
Invariant (tests/test_incremental.py): after any arrival order, `parents()` equals `batch_parents()`, a
from-scratch Edmonds per connected component of the same edges.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from errors import BadInputError
from indexer.incremental.arborescence import edmonds, try_attach

logger = logging.getLogger(__name__)

Path_ = Literal["new", "attach", "recompute"]


@dataclass(frozen=True)
class Candidate:
    """One directed candidate edge parent -> child and its weight (distance + direction penalty)."""

    parent: str
    child: str
    weight: float


@dataclass(frozen=True)
class Update:
    """What one arrival changed: `touched` nodes may have a new parent, root or cluster key."""

    node: str
    path: Path_
    cluster: int  # internal id of v's cluster after the update
    touched: tuple[str, ...]  # sorted
    merged: tuple[int, ...]  # internal ids of the clusters merged into `cluster` (recompute only)


class _Cluster:
    """Members, their potentials (parallel arrays, append order), the root, and the cluster's edges.

    The edges are kept as growing numpy arrays of global node numbers, so that a recomputation hands
    Edmonds its input with a few vectorised gathers instead of a Python walk over every edge (that
    walk was 60 % of the scale benchmark's time once Edmonds was compiled)."""

    __slots__ = ("members", "pos", "pot", "size", "root", "fresh", "src", "dst", "w", "n_edges")

    def __init__(self) -> None:
        self.members: list[str] = []
        self.pos: dict[str, int] = {}
        self.pot = np.zeros(4, dtype=np.float64)
        self.size = 0
        self.root = ""
        self.fresh = False  # pot holds Edmonds' dual of the current tree
        self.src = np.zeros(8, dtype=np.int64)
        self.dst = np.zeros(8, dtype=np.int64)
        self.w = np.zeros(8, dtype=np.float64)
        self.n_edges = 0

    def append(self, node: str, pot: float) -> None:
        if self.size == len(self.pot):
            self.pot = np.concatenate([self.pot, np.zeros(len(self.pot), dtype=np.float64)])
        self.pos[node] = self.size
        self.members.append(node)
        self.pot[self.size] = pot
        self.size += 1

    def add_edges(self, src: np.ndarray, dst: np.ndarray, w: np.ndarray) -> None:
        need = self.n_edges + len(src)
        if need > len(self.src):
            grow = max(need, 2 * len(self.src))
            self.src, self.dst, self.w = (np.concatenate([a[: self.n_edges], np.zeros(grow - self.n_edges, a.dtype)])
                                          for a in (self.src, self.dst, self.w))
        self.src[self.n_edges:need], self.dst[self.n_edges:need], self.w[self.n_edges:need] = src, dst, w
        self.n_edges = need

    def edge_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.src[: self.n_edges], self.dst[: self.n_edges], self.w[: self.n_edges]


class IncrementalForest:
    """Candidate edges + clusters + their minimum arborescences; see the module docstring."""

    def __init__(self) -> None:
        self._in: dict[str, dict[str, float]] = {}  # child -> {parent: weight}
        self._out: dict[str, dict[str, float]] = {}  # parent -> {child: weight}
        self._of: dict[str, int] = {}  # node -> cluster id
        self._clusters: dict[int, _Cluster] = {}
        self._parent: dict[str, str] = {}  # "" for a root
        self._gid: dict[str, int] = {}  # node -> its number in the clusters' edge arrays (never reused)
        self._local = np.zeros(0, dtype=np.int64)  # scratch: number -> index in the cluster being solved
        self._next_id = 0
        # node -> weight added to every edge out of it (a 16-bit cast: a leaf unless nothing else fits), whenever
        # that is learnt: a newest-first crawl meets a cast before its source
        self._leaf: dict[str, float] = {}
        self.counts: dict[Path_, int] = {"new": 0, "attach": 0, "recompute": 0}

    # --- reading ---------------------------------------------------------------------------------

    def __contains__(self, node: object) -> bool:
        return node in self._of

    def __len__(self) -> int:
        return len(self._of)

    def parent(self, node: str) -> str:
        return self._parent[node]

    def parents(self) -> dict[str, str]:
        return dict(sorted(self._parent.items()))

    def cluster_id(self, node: str) -> int:
        return self._of[node]

    def members(self, cluster: int) -> list[str]:
        return sorted(self._clusters[cluster].members)

    def cluster_key(self, cluster: int) -> str:
        """A cluster's stable public name: its smallest member id (independent of arrival order)."""
        return min(self._clusters[cluster].members)

    def root(self, cluster: int) -> str:
        return self._clusters[cluster].root

    def weight(self, parent: str, child: str) -> float:
        return self._in[child][parent]

    def edges(self) -> list[Candidate]:
        return [Candidate(p, c, w) for c in sorted(self._in) for p, w in sorted(self._in[c].items())]

    def n_edges(self) -> int:
        return sum(len(v) for v in self._in.values())

    # --- arrivals --------------------------------------------------------------------------------

    def add(self, node: str, edges: Sequence[Candidate]) -> Update:
        """Add `node` with its candidate edges (each to or from an existing node); keep trees optimal."""
        if node in self._of:
            raise BadInputError(node, "already in the forest; remove it first to replace its edges")
        for e in edges:
            self._check_edge(node, e)
        self._number(node)
        self._in[node], self._out[node] = {}, {}
        for e in edges:
            self._in[e.child][e.parent] = self._out[e.parent][e.child] = float(e.weight) + self._leaf.get(e.parent, 0.0)
        new = self._edge_arrays([(p, node, w) for p, w in self._in[node].items()]
                                + [(node, c, w) for c, w in self._out[node].items()])
        near = sorted({self._of[u] for u in (*self._in[node], *self._out[node])})
        if not near:
            return self._new_cluster(node)
        if len(near) == 1:
            done = self._attach(node, near[0], new)
            if done is not None:
                return done
        return self._merge_and_solve(node, near, new)

    def set_leaf(self, node: str, penalty: float) -> list[str]:
        """Weigh every edge out of `node` `penalty` more than its candidate's (0: as the candidate's), now and
        for edges added later; re-solve its cluster. Returns the members whose parent changed."""
        extra = penalty - self._leaf.get(node, 0.0)
        if extra == 0:
            return []
        if penalty:
            self._leaf[node] = penalty
        else:
            del self._leaf[node]
        if node not in self._of:
            return []  # applied when it is added
        for child in self._out[node]:
            self._out[node][child] += extra
            self._in[child][node] += extra
        cid = self._of[node]
        members = sorted(self._clusters[cid].members)
        before = {m: self._parent[m] for m in members}
        self._clusters[cid] = self._solve_from_dicts(members)
        return [m for m in members if self._parent[m] != before[m]]

    def _check_edge(self, node: str, e: Candidate) -> None:
        other = e.parent if e.child == node else e.child if e.parent == node else None
        if other is None or other == node or other not in self._of:
            raise BadInputError(f"edge {e.parent} -> {e.child}", f"must join {node!r} to a node already added")
        if not np.isfinite(e.weight):
            raise BadInputError(f"edge {e.parent} -> {e.child}", "weight must be finite")

    def _number(self, node: str) -> int:
        if node not in self._gid:
            self._gid[node] = len(self._gid)
        return self._gid[node]

    def _edge_arrays(self, triples: Sequence[tuple[str, str, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        gid = self._gid
        return (np.fromiter((gid[p] for p, _, _ in triples), dtype=np.int64, count=len(triples)),
                np.fromiter((gid[c] for _, c, _ in triples), dtype=np.int64, count=len(triples)),
                np.fromiter((w for _, _, w in triples), dtype=np.float64, count=len(triples)))

    def _new_cluster(self, node: str) -> Update:
        cid = self._next_id
        self._next_id += 1
        cluster = _Cluster()
        cluster.append(node, 0.0)  # a lone node is its own top: no y, pot 0
        cluster.root, cluster.fresh = node, True
        self._clusters[cid] = cluster
        self._of[node] = cid
        self._parent[node] = ""
        self.counts["new"] += 1
        return Update(node, "new", cid, (node,), ())

    def _attach(self, node: str, cid: int, new: tuple[np.ndarray, np.ndarray, np.ndarray]) -> Update | None:
        cluster = self._clusters[cid]
        if not cluster.fresh:
            return None
        ins = sorted(self._in[node].items(), key=lambda pw: (pw[1], pw[0]))  # Edmonds' key: (w, src id)
        outs = sorted(self._out[node].items())
        if not ins or not outs:
            return None
        pot = cluster.pot[: cluster.size]
        got = try_attach(
            pot, cluster.pos[cluster.root],
            np.array([cluster.pos[p] for p, _ in ins], dtype=np.int64), np.array([w for _, w in ins]),
            np.array([cluster.pos[c] for c, _ in outs], dtype=np.int64), np.array([w for _, w in outs]),
            in_ids=np.arange(len(ins)),  # already in key order: the first is the winner
        )
        if got is None:
            return None
        cluster.pot[: cluster.size] = pot + got.shift
        cluster.append(node, got.pot_v)
        cluster.add_edges(*new)
        self._of[node] = cid
        self._parent[node] = ins[got.parent_edge][0]
        self.counts["attach"] += 1
        return Update(node, "attach", cid, (node,), ())

    def _merge_and_solve(self, node: str, near: Sequence[int], new: tuple[np.ndarray, np.ndarray, np.ndarray]) -> Update:
        cid = max(near, key=lambda c: (self._clusters[c].size, -c))  # keep the largest id object
        merged = tuple(c for c in near if c != cid)
        members = [node, *(m for c in near for m in self._clusters[c].members)]
        parts = [self._clusters[c].edge_arrays() for c in near] + [new]
        edges = tuple(np.concatenate([part[i] for part in parts]) for i in range(3))
        for c in merged:
            del self._clusters[c]
        self._clusters[cid] = self._solve(sorted(members), *edges)
        for m in members:
            self._of[m] = cid
        self.counts["recompute"] += 1
        return Update(node, "recompute", cid, tuple(sorted(members)), merged)

    def _solve(self, members: list[str], src: np.ndarray, dst: np.ndarray, w: np.ndarray) -> _Cluster:
        """Edmonds on the cluster's edges (global numbers; local index = rank of the id in sorted `members`)."""
        local = self._scratch()
        ids = np.fromiter((self._gid[m] for m in members), dtype=np.int64, count=len(members))
        local[ids] = np.arange(len(members))
        src_l, dst_l = local[src], local[dst]
        tree = edmonds(len(members), src_l, dst_l, w)
        parents = tree.parents(src_l)
        cluster = _Cluster()
        cluster.add_edges(src, dst, w)
        for i, m in enumerate(members):
            cluster.append(m, float(tree.pot[i]))
            self._parent[m] = members[parents[i]] if parents[i] >= 0 else ""
        roots = [m for m, p in zip(members, parents, strict=True) if p < 0]
        cluster.root = roots[0]
        cluster.fresh = len(roots) == 1  # one top: try_attach's precondition
        return cluster

    def _scratch(self) -> np.ndarray:
        if len(self._local) < len(self._gid):
            self._local = np.zeros(2 * len(self._gid), dtype=np.int64)
        return self._local

    def _solve_from_dicts(self, members: list[str]) -> _Cluster:
        """`_solve` with the edges read from the adjacency dicts (load, removal, the batch reference)."""
        return self._solve(members, *self._edge_arrays([(p, c, w) for c in members for p, w in self._in[c].items()]))

    # --- removal (a repo re-indexed at a new revision) -------------------------------------------

    def remove(self, node: str) -> list[int]:
        """Drop `node` and its edges; re-solve what is left of its cluster (it may split). New ids."""
        cid = self._of.pop(node)
        self._leaf.pop(node, None)
        for p in self._in.pop(node):
            del self._out[p][node]
        for c in self._out.pop(node):
            del self._in[c][node]
        del self._parent[node]
        rest = [m for m in self._clusters.pop(cid).members if m != node]
        out = []
        for part in components(rest, self._neighbours):
            new = self._next_id
            self._next_id += 1
            self._clusters[new] = self._solve_from_dicts(part)
            for m in part:
                self._of[m] = new
            out.append(new)
        return out

    def _neighbours(self, node: str) -> Iterable[str]:
        return (*self._in[node], *self._out[node])

    @classmethod
    def load(cls, nodes: Iterable[str], edges: Iterable[Candidate],
             leaves: Mapping[str, float] | None = None) -> IncrementalForest:
        """Rebuild from stored nodes and edges, and the `set_leaf` penalties: one Edmonds per component (equal
        to any arrival order)."""
        forest = cls()
        forest._leaf = {n: p for n, p in (leaves or {}).items() if p}
        for node in sorted(nodes):
            forest._number(node)
            forest._in[node], forest._out[node] = {}, {}
        for e in edges:
            forest._in[e.child][e.parent] = forest._out[e.parent][e.child] = float(e.weight) + forest._leaf.get(e.parent, 0.0)
        for part in components(sorted(forest._in), forest._neighbours):
            cid = forest._next_id
            forest._next_id += 1
            forest._clusters[cid] = forest._solve_from_dicts(part)
            forest._of.update({m: cid for m in part})
        return forest

    # --- the reference --------------------------------------------------------------------------

    def batch_parents(self) -> dict[str, str]:
        """From scratch: connected components of the adjacency dicts, Edmonds on each (the invariant's
        reference; it never reads the clusters' edge arrays, so it also checks their bookkeeping)."""
        ref = IncrementalForest()
        ref._in, ref._out, ref._gid = self._in, self._out, self._gid
        out: dict[str, str] = {}
        for part in components(sorted(self._of), self._neighbours):
            ref._solve_from_dicts(part)
            out.update({m: ref._parent[m] for m in part})
        return dict(sorted(out.items()))


def components(nodes: Sequence[str], neighbours: Callable[[str], Iterable[str]]) -> list[list[str]]:
    """Connected components of `nodes` (sorted members, components ordered by their smallest member)."""
    step = neighbours
    allowed, seen, out = set(nodes), set(), []
    for start in sorted(nodes):
        if start in seen:
            continue
        seen.add(start)
        stack, part = [start], []
        while stack:
            u = stack.pop()
            part.append(u)
            for v in step(u):
                if v in allowed and v not in seen:
                    seen.add(v)
                    stack.append(v)
        out.append(sorted(part))
    return out
