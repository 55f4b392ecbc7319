"""Minimum spanning arborescence (Chu-Liu/Edmonds, free root) with its dual, and an exact O(k) attach test.

Nodes are 0..n-1; edge e is `src[e] -> dst[e]` with weight `w[e]` (parent -> child). The root is free:
the cheapest arborescence over every possible root (equivalently, a super-root joined to every node by
edges of one huge weight M, of which the optimum uses exactly one).

The algorithm, in levels. At each level every (super)node picks its cheapest entering edge by the key
(reduced weight, weight, src, dst) -- deterministic, and the same key everywhere -- where the reduced
weight of e is `w[e] - pot[dst[e]]` and `pot[u]` is the sum of the amounts y already subtracted from the
edges entering the (super)nodes that hold u. The picked edges' cycles are contracted and the next level
starts; a level without cycles ends it. A node left without any entering edge is a *top*: its entry is
the member u with the largest `pot[u]` (the super-root edge M - pot[u] is then the cheapest), ties to
the smallest index. Expansion walks the levels back down: the member of a contracted cycle holding the
entering edge's head takes that edge, the others keep their cycle edge.

`pot` at the end is the LP dual of Edmonds (y summed over the nested sets holding u, the top excluded).
It proves, in O(k), when a new node v (edges only to/from old nodes) attaches as a leaf and leaves the
old tree T unchanged -- see `try_attach` -- and it equals what a full recomputation would produce,
float for float: the reduced weights are always formed as `w - pot` (never by repeated subtraction), so
the incremental and the batch paths do the same arithmetic.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

# A shortcut must win by this relative margin, else the full recomputation decides: float rounding of
# w - pot differs by ~1e-16 relative between expression orders, so 1e-9 leaves no doubt.
MARGIN = 1e-9


@dataclass(frozen=True)
class Arborescence:
    """parent_edge[u]: the index of u's entering edge, -1 for a root; pot[u]: Edmonds' dual potential."""

    parent_edge: np.ndarray  # int64 (n,)
    pot: np.ndarray  # float64 (n,)

    def parents(self, src: np.ndarray) -> np.ndarray:
        out = np.full(len(self.parent_edge), -1, dtype=np.int64)
        has = self.parent_edge >= 0
        out[has] = src[self.parent_edge[has]]
        return out


@dataclass(frozen=True)
class _Level:
    comp: np.ndarray  # original node -> node id at this level
    chosen: np.ndarray  # node id -> original edge index it picked (-1: none)
    up: np.ndarray  # node id -> node id at the next level


def _pick(nodes: int, cur_dst: np.ndarray, red: np.ndarray, w: np.ndarray, src0: np.ndarray,
          dst0: np.ndarray, eids: np.ndarray) -> np.ndarray:
    """The cheapest entering edge of each node by (reduced, weight, src, dst); -1 when it has none."""
    order = np.lexsort((dst0, src0, w, red, cur_dst))
    first = np.ones(len(order), dtype=bool)
    first[1:] = cur_dst[order[1:]] != cur_dst[order[:-1]]
    chosen = np.full(nodes, -1, dtype=np.int64)
    chosen[cur_dst[order[first]]] = eids[order[first]]
    return chosen


def _cycles(par: np.ndarray) -> np.ndarray:
    """cycle id of each node of the functional graph `par` (-1: none / not on a cycle)."""
    n = len(par)
    state = np.zeros(n, dtype=np.int8)  # 0 new, 1 on the current path, 2 done
    cyc = np.full(n, -1, dtype=np.int64)
    count = 0
    for start in range(n):
        path = []
        u = start
        while u >= 0 and state[u] == 0:
            state[u] = 1
            path.append(u)
            u = int(par[u])
        if u >= 0 and state[u] == 1:  # closed a cycle on this path
            v = u
            while True:
                cyc[v] = count
                v = int(par[v])
                if v == u:
                    break
            count += 1
        for p in path:
            state[p] = 2
    return cyc


def edmonds(n: int, src: np.ndarray, dst: np.ndarray, w: np.ndarray) -> Arborescence:
    """Minimum spanning arborescence (forest when the graph is not strongly connected); see module doc."""
    src = np.asarray(src, dtype=np.int64)
    dst = np.asarray(dst, dtype=np.int64)
    w = np.asarray(w, dtype=np.float64)
    pot = np.zeros(n, dtype=np.float64)
    comp = np.arange(n, dtype=np.int64)
    nodes = n
    levels: list[_Level] = []
    live = np.flatnonzero(src != dst)
    while True:
        cs, cd = comp[src[live]], comp[dst[live]]
        keep = cs != cd  # edges inside a contracted node are gone
        live, cs, cd = live[keep], cs[keep], cd[keep]
        red = w[live] - pot[dst[live]]
        chosen = _pick(nodes, cd, red, w[live], src[live], dst[live], live)
        has = chosen >= 0
        y = np.zeros(nodes, dtype=np.float64)
        y[has] = w[chosen[has]] - pot[dst[chosen[has]]]
        par = np.full(nodes, -1, dtype=np.int64)
        par[has] = comp[src[chosen[has]]]
        pot = pot + y[comp]  # every node with an entering edge pays its y (0 after its first level)
        cyc = _cycles(par)
        if not (cyc >= 0).any():
            levels.append(_Level(comp, chosen, np.arange(nodes)))
            break
        up = _contract(cyc)
        levels.append(_Level(comp, chosen, up))
        comp = up[comp]
        nodes = int(up.max()) + 1
    return Arborescence(_expand(levels, pot, src, dst), pot)


def _contract(cyc: np.ndarray) -> np.ndarray:
    """Next-level ids: each cycle becomes one node, every other node stays itself (order kept)."""
    n = len(cyc)
    up = np.empty(n, dtype=np.int64)
    seen: dict[int, int] = {}
    nxt = 0
    for u in range(n):
        c = int(cyc[u])
        if c < 0:
            up[u] = nxt
            nxt += 1
        elif c in seen:
            up[u] = seen[c]
        else:
            seen[c] = up[u] = nxt
            nxt += 1
    return up


def _tops(last: _Level, pot: np.ndarray) -> np.ndarray:
    """Entering 'edge' of the top nodes as -1 - u, u the member with the largest pot (ties: smallest u)."""
    entering = last.chosen.copy()
    members = np.arange(len(pot))
    order = np.lexsort((members, -pot, last.comp))
    first = np.ones(len(order), dtype=bool)
    first[1:] = last.comp[order[1:]] != last.comp[order[:-1]]
    best = np.full(len(entering), -1, dtype=np.int64)
    best[last.comp[order[first]]] = order[first]
    top = entering < 0
    entering[top] = -1 - best[top]
    return entering


def _expand(levels: list[_Level], pot: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    entering = _tops(levels[-1], pot)
    for lvl in reversed(levels[:-1]):
        outer = entering[lvl.up]  # the entering edge of the node each one was contracted into
        head = np.where(outer >= 0, dst[np.maximum(outer, 0)], -1 - outer)
        holds = lvl.comp[head] == np.arange(len(lvl.chosen))
        entering = np.where(holds, outer, lvl.chosen)
    return np.where(entering >= 0, entering, -1)


@dataclass(frozen=True)
class Attach:
    """A proven leaf attach: v's parent edge, v's potential, and the shift y added to every old pot."""

    parent_edge: int
    pot_v: float
    shift: float


def try_attach(old_pot: np.ndarray, old_root: int, in_src: np.ndarray, in_w: np.ndarray,
               out_dst: np.ndarray, out_w: np.ndarray, *, in_ids: np.ndarray | None = None) -> Attach | None:
    """Whether `edmonds` on G + v gives T + (best edge into v), without running it; None when unsure.

    G is strongly connected with tree T (one top, entry `old_root`) and potentials `old_pot`; v brings
    edges in (in_src -> v) and out (v -> out_dst). Edmonds on G + v runs as on G as long as no edge out
    of v is ever the cheapest into a set (1. w(v,u) - pot(u) > 0 with margin, for every u); then G is
    one node X entered only from v with y_X = min(w(v,u) - pot(u)), v picks its cheapest edge (y_v = its
    weight), {X, v} is the top, and its entry must stay the old root (2.): otherwise v becomes the root.
    `in_ids` are the tie-break ids of v's incoming edges' sources (default: in_src).
    """
    if len(in_src) == 0 or len(out_dst) == 0:
        return None
    slack = out_w - old_pot[out_dst]
    scale = MARGIN * (1.0 + np.abs(out_w) + np.abs(old_pot[out_dst]))
    if not (slack > scale).all():  # 1.
        return None
    ids = in_src if in_ids is None else in_ids
    best = int(np.lexsort((ids, in_w))[0])  # v's key: (w, w, src) -- reduced == w at pot 0
    shift = float(slack.min())
    pot_v = float(in_w[best])
    new_old = old_pot + shift  # the same float additions Edmonds makes
    top = float(new_old[old_root])
    unique_top = int((new_old >= top).sum()) == 1  # a new tie could move the entry: let batch decide
    if not (unique_top and pot_v < top - MARGIN * (1.0 + abs(top))):  # 2.
        return None
    return Attach(parent_edge=best, pot_v=pot_v, shift=shift)
