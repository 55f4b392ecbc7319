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
from numba import njit

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


def edmonds(n: int, src: np.ndarray, dst: np.ndarray, w: np.ndarray) -> Arborescence:
    """Minimum spanning arborescence (forest when the graph is not strongly connected); see module doc."""
    src = np.ascontiguousarray(src, dtype=np.int64)
    dst = np.ascontiguousarray(dst, dtype=np.int64)
    w = np.ascontiguousarray(w, dtype=np.float64)
    if n == 0:
        return Arborescence(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64))
    parent_edge, pot = _edmonds(n, src, dst, w)
    return Arborescence(parent_edge, pot)


# The levels are compiled (numba): a cluster of a few hundred models needs tens of levels, and the
# per-level numpy calls (a lexsort over every live edge, Python loops for cycles) cost 0.1 ms each --
# 5-7 ms per recomputation, 90 % of the scale benchmark's time. The loops below do the same float
# operations in the same order as that numpy version did (`w - pot[dst]`, `pot + y[comp]`, first of
# equal keys in edge order), so results are unchanged to the last bit.


@njit(cache=True)
def _better(e: int, best: int, red: np.ndarray, w: np.ndarray, src: np.ndarray, dst: np.ndarray) -> bool:
    """Edge e beats edge `best` by the key (reduced, weight, src, dst); the earlier edge wins full ties."""
    if red[e] != red[best]:
        return red[e] < red[best]
    if w[e] != w[best]:
        return w[e] < w[best]
    if src[e] != src[best]:
        return src[e] < src[best]
    return dst[e] < dst[best]


@njit(cache=True)
def _pick(nodes: int, comp: np.ndarray, pot: np.ndarray, src: np.ndarray, dst: np.ndarray,
          w: np.ndarray, live: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop edges inside a contracted node; the cheapest entering edge of each node (-1: none)."""
    red = np.empty(len(w), dtype=np.float64)
    chosen = np.full(nodes, -1, dtype=np.int64)
    kept = 0
    for i in range(len(live)):
        e = live[i]
        cd = comp[dst[e]]
        if comp[src[e]] == cd:
            continue
        live[kept] = e
        kept += 1
        red[e] = w[e] - pot[dst[e]]
        if chosen[cd] < 0 or _better(e, chosen[cd], red, w, src, dst):
            chosen[cd] = e
    return chosen, live[:kept]


@njit(cache=True)
def _cycles(par: np.ndarray) -> np.ndarray:
    """cycle id of each node of the functional graph `par` (-1: none / not on a cycle)."""
    n = len(par)
    state = np.zeros(n, dtype=np.int8)  # 0 new, 1 on the current path, 2 done
    cyc = np.full(n, -1, dtype=np.int64)
    path = np.empty(n, dtype=np.int64)
    count = 0
    for start in range(n):
        length = 0
        u = start
        while u >= 0 and state[u] == 0:
            state[u] = 1
            path[length] = u
            length += 1
            u = par[u]
        if u >= 0 and state[u] == 1:  # closed a cycle on this path
            v = u
            while True:
                cyc[v] = count
                v = par[v]
                if v == u:
                    break
            count += 1
        for i in range(length):
            state[path[i]] = 2
    return cyc


@njit(cache=True)
def _contract(cyc: np.ndarray) -> np.ndarray:
    """Next-level ids: each cycle becomes one node, every other node stays itself (order kept)."""
    n = len(cyc)
    up = np.empty(n, dtype=np.int64)
    first = np.full(n, -1, dtype=np.int64)  # cycle id -> its node id at the next level
    nxt = 0
    for u in range(n):
        c = cyc[u]
        if c < 0:
            up[u] = nxt
            nxt += 1
        elif first[c] >= 0:
            up[u] = first[c]
        else:
            first[c] = nxt
            up[u] = nxt
            nxt += 1
    return up


@njit(cache=True)
def _edmonds(n: int, src: np.ndarray, dst: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pot = np.zeros(n, dtype=np.float64)
    comp = np.arange(n)
    nodes = n
    comps, chosens, ups = [comp], [np.full(1, -1, dtype=np.int64)], [comp]  # typed by example; dropped below
    comps.pop()
    chosens.pop()
    ups.pop()
    live = np.flatnonzero(src != dst)
    while True:
        chosen, live = _pick(nodes, comp, pot, src, dst, w, live)
        y = np.zeros(nodes, dtype=np.float64)
        par = np.full(nodes, -1, dtype=np.int64)
        for c in range(nodes):
            e = chosen[c]
            if e >= 0:
                y[c] = w[e] - pot[dst[e]]
                par[c] = comp[src[e]]
        for u in range(n):  # every node with an entering edge pays its y (0 after its first level)
            pot[u] = pot[u] + y[comp[u]]
        cyc = _cycles(par)
        comps.append(comp)
        chosens.append(chosen)
        if cyc.max() < 0:
            ups.append(np.arange(nodes))
            break
        up = _contract(cyc)
        ups.append(up)
        comp = up[comp]
        nodes = up.max() + 1
    return _expand(comps, chosens, ups, pot, src, dst), pot


@njit(cache=True)
def _tops(comp: np.ndarray, chosen: np.ndarray, pot: np.ndarray) -> np.ndarray:
    """Entering 'edge' of the top nodes as -1 - u, u the member with the largest pot (ties: smallest u)."""
    entering = chosen.copy()
    best = np.full(len(chosen), -1, dtype=np.int64)
    for u in range(len(pot)):
        c = comp[u]
        if best[c] < 0 or pot[u] > pot[best[c]]:
            best[c] = u
    for c in range(len(entering)):
        if entering[c] < 0:
            entering[c] = -1 - best[c]
    return entering


@njit(cache=True)
def _expand(comps, chosens, ups, pot: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:  # noqa: ANN001
    top = len(comps) - 1
    entering = _tops(comps[top], chosens[top], pot)
    for level in range(top - 1, -1, -1):
        comp, chosen, up = comps[level], chosens[level], ups[level]
        inner = np.empty(len(chosen), dtype=np.int64)
        for c in range(len(chosen)):
            outer = entering[up[c]]  # the entering edge of the node c was contracted into
            head = dst[outer] if outer >= 0 else -1 - outer
            inner[c] = outer if comp[head] == c else chosen[c]
        entering = inner
    for u in range(len(entering)):
        if entering[u] < 0:
            entering[u] = -1
    return entering


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
