"""Parent or sibling: the edges a near-copy sibling takes from its own parent.

A fine-tune C of G sits nearer to a sibling F than to G whenever its update has a cosine above
|dF| / (2 |dC|) with F's step from G (d(C, F)^2 = |dC|^2 + |dF|^2 - 2 <dC, dF>). Sibling updates from one
base share directions (cosines 0.02-0.35 between the fine-tunes of wild-conv-s1), so a sibling whose own step
is tiny -- a short low-lr fine-tune, drift 0.001 -- takes the later fine-tunes of its parent: every miss left
with upload times on the wild conv zoos (bench/RESULTS.md sessions 9-21). From G, F and C alone the two
readings (C from F, its own update correlated with F's step; or C beside F) are one point; the other
children of G tell them apart. Under "C is a sibling of F", F is one of C's siblings, exchangeable with the
others: its cosine with C (about G) is the largest of them by chance only. Under "C comes from F", C carries
all of F's step.

The rule (`sibling_moves`), the same for batch mother and the incremental index's shown parents: an edge
F -> C moves to G = parent(F) when
- F's own step is shorter than C's step from F (D(G, F) < D(F, C)): only then can a sibling's correlated
  update outweigh the parent (a cosine of at least 1 / (2 sqrt 2) = 0.35 is needed otherwise, the top of
  what siblings were measured to share), so a chain of real steps (a snake, an instruct model and its
  fine-tunes) is never read;
- upload times say G < F < C, F and C dated after the Hub's legacy date (G may carry it: an older repo), or
  the three share one time (undated, or the legacy date), the tree oriented from the weights (`siblings_ordered`).
  Undated, the orientation between a near-copy and its base must be right first: the root is chosen between
  the spanning tree's centre and its nearest neighbour (indexer.lineage.orient._with_nearest; before it, the
  near-copy read as wild-conv's root, and the test moved five fine-tunes towards it);
- C and G were compared and are related, neither F nor C is a copy (quantized, cast, duplicate), and G has at
  least MIN_SIBLINGS other children (not copies) to compare with;
- and some other child S of G is at least as aligned with C as F is: cos_G(S, C) >= cos_G(F, C), the cosine
  of the displacements from G over the body matrices the three hold with one shape (heads left out).
Decisions read the tree as given (one pass), so the result does not depend on the order of the edges.
Measured in bench/RESULTS.md (session 21, `bench/sibling_steps.py` before the rule was the method's).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping
from typing import TypeVar

import numpy as np

from indexer.lineage.ties import HUB_EPOCH
from sketches.layers import is_head

MIN_SIBLINGS = 2  # F and C beside two others: the fewest in which F can fail to be C's most aligned

N = TypeVar("N", bound=Hashable)


def sibling_moves(parents: Mapping[N, N | None], *, distance: Callable[[N, N], float | None],
                  cosine: Callable[[N, N, N], float], ordered: Callable[[N, N, N], bool],
                  related: Callable[[N, N], bool], copies: set[N]) -> dict[N, N]:
    """{C: G} for every edge F -> C of `parents` (a root's parent: None) the rule moves (module docstring).
    `distance(a, b)`: the tree's distance of a pair (None: not measured); `cosine(g, x, y)`: of x - g and
    y - g; `ordered(g, f, c)`: upload order says g < f < c (`siblings_ordered`); `related(a, b)`: compared and
    related."""
    children: dict[N, list[N]] = {}
    for c, p in parents.items():
        if p is not None:
            children.setdefault(p, []).append(c)
    moves: dict[N, N] = {}
    for c, f in parents.items():
        g = parents.get(f) if f is not None else None
        if g is None or c in copies or f in copies or not ordered(g, f, c) or not related(g, c):
            continue
        step, own = distance(g, f), distance(f, c)
        if step is None or own is None or not step < own:
            continue
        others = sorted((s for s in children.get(g, []) if s not in (f, c) and s not in copies), key=str)
        if len(others) < MIN_SIBLINGS:
            continue
        mine = cosine(g, f, c)
        if math.isnan(mine):
            continue
        if any(cosine(g, s, c) >= mine for s in others):
            moves[c] = g
    return moves


def siblings_ordered(g: float | None, f: float | None, c: float | None) -> bool:
    """Whether the tree's G -> F -> C is drawn in an order the test may trust: upload order says G < F < C (F
    and C dated after the Hub's legacy date, F before C, G before F: G may carry the legacy date, older than
    any repo dated after it), or the three share one time (the legacy date, or none), where the tree among
    them is oriented from the weights (indexer.lineage.orient) and the test runs on it as drawn."""
    if g == f == c:
        return True
    if g is None or f is None or c is None:
        return False
    return HUB_EPOCH < f < c and g < f


def displacement_cosine(g: Mapping[str, np.ndarray], x: Mapping[str, np.ndarray], y: Mapping[str, np.ndarray]) -> float:
    """cos of (x - g, y - g) over the body matrices and kernels (heads left out, >= 2-D: what the pair rule
    compares) all three hold with one shape, in float64; NaN when either displacement is zero or nothing is
    shared."""
    names = sorted(n for n in g.keys() & x.keys() & y.keys() if not is_head(n) and np.ndim(g[n]) >= 2
                   and np.shape(g[n]) == np.shape(x[n]) == np.shape(y[n]))
    dot = nx = ny = 0.0
    for n in names:
        base = np.asarray(g[n], dtype=np.float64)
        dx = np.asarray(x[n], dtype=np.float64) - base
        dy = np.asarray(y[n], dtype=np.float64) - base
        dot += float(np.vdot(dx, dy))
        nx += float(np.vdot(dx, dx))
        ny += float(np.vdot(dy, dy))
    return dot / math.sqrt(nx * ny) if nx > 0 and ny > 0 else math.nan
