"""Direction without upload times: root the undirected spanning tree at its centre.

On the Hub every repo older than 2022-03-02 shares one `createdAt`, so old families must be oriented
from the weights alone. The paper's cue, kurtosis, is a coin flip on our full fine-tuning zoos (8 of 18
edges; 0.52-0.61 accuracy without times). A structural cue does better: fine-tunes move away from
their base in their own directions, so the base of a family sits in the middle of it. We take the
undirected minimum spanning tree of the distance (which places the edges; only their direction is
unknown) and root it at its centre: the node whose farthest node is fewest hops away (networkx
`center`), or its nearest neighbour (`with_nearest`); between the two (or two centres), the caller's prior decides (mother's:
the fewest head tensors, then the widest head, as for a group of identical bodies in
indexer.lineage.ties), then the tree's norm regime (`_central_edge`: the other edges point the same way from
either centre, so they tell whether children's rows shrink or grow, and that orients the central edge),
then the smaller summed distance to all others (the medoid).
Every edge then points away from the root. A chain of checkpoints (a "snake") is the known failure: its
centre is its middle. Measured per zoo and phenomenon in bench/RESULTS.md (`bench/wild.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import TypeVar

import networkx as nx
import numpy as np

N = TypeVar("N", bound=Hashable)


def centre_rooted_tree(cost: np.ndarray, prior: Sequence[tuple[float, ...]] = (),
                       shrink: np.ndarray | None = None,
                       regime_votes: Callable[[], np.ndarray] | None = None) -> list[int]:
    """parent[j] (-1 for the root) of the undirected MST of the symmetrised `cost`, rooted at its centre.
    An undirected edge costs its costlier direction: the tie-breaks (indexer.lineage.ties) are asymmetric.
    `shrink` (antisymmetric votes, `norm_votes`): the root may move one hop from the centre to where the
    tree's edges agree best with its norm regime (`norm_root`). `regime_votes` (the same votes, computed only
    for a tree with two centres: they compare every pair of models row by row): between two
    centres, after the caller's prior, the one the tree's norm regime makes the parent (`_central_edge`)."""
    n = cost.shape[0]
    if n == 1:
        return [-1]
    sym = np.maximum(cost, cost.T)
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    for a in range(n):
        for b in range(a + 1, n):
            graph.add_edge(a, b, weight=float(sym[a, b]))
    tree = nx.minimum_spanning_tree(graph, algorithm="kruskal")
    finite = np.where(np.isfinite(sym), sym, 0.0)
    centres = with_nearest(nx.center(tree), tree.neighbors, lambda a, b: tree[a][b]["weight"])
    regime = _central_edge(tree, centres, regime_votes()) if regime_votes is not None and len(centres) == 2 else {}
    root = min(centres, key=lambda c: (*(prior[c] if prior else ()), regime.get(c, 0), float(finite[c].sum()), c))
    if shrink is not None:
        root = norm_root(tree, root, shrink)
    return _oriented(tree, root, n)


def with_nearest(centres: Sequence[N], neighbours: Callable[[N], Iterable[N]],
                 weight: Callable[[N, N], float]) -> list[N]:
    """A lone centre and its nearest neighbour in the tree (`neighbours`, by `weight`, then id): the two the root
    is chosen between; two centres as they are. A near-copy of the base (a short low-lr fine-tune, drift 0.001)
    takes the base's later fine-tunes by distance and becomes the hub, so the centre (wild-conv without times:
    the near-copy read as the root, the base its child); the prior on heads (the pre-trained base's head is the
    wider) and the norm regime decide between the two. Batch's trees and the incremental index's shown
    parents (index._shown_parents) alike."""
    if len(centres) != 1:
        return list(centres)
    c = centres[0]
    near = min(neighbours(c), key=lambda n: (weight(c, n), n), default=None)
    return [c] if near is None else [c, near]


def _central_edge(tree: nx.Graph, centres: Sequence[int], votes: np.ndarray) -> dict[int, int]:
    """Between a tree's two centres: {centre: 0 for the parent the norm regime picks, 1 for the other}, {}
    when the regime is unclear. Every edge but the central one points the same way whichever centre is
    the root, so those edges vote the regime without taking a side (+1: children's rows shorter, weight
    decay; -1: longer, updates adding their own norm), as `norm_root` reads it at a centre: |sum| >= 1 vote.
    The central edge is then oriented as the regime says: its parent is the endpoint with longer rows when
    children shrink, shorter when they grow."""
    a, b = centres
    parent = _oriented(tree, a, votes.shape[0])
    first = regime_parent([(p, v) for v, p in enumerate(parent) if p >= 0], a, b, lambda p, c: float(votes[p, c]))
    if first is None:
        return {}
    return {a: 0 if first == a else 1, b: 1 if first == a else 0}


def regime_parent(edges: Iterable[tuple[Hashable, Hashable]], a: Hashable, b: Hashable,
                  vote: Callable[[Hashable, Hashable], float]) -> Hashable | None:
    """Which of a tree's two centres `a`, `b` the norm regime makes the parent, None when unclear (|sum| < 1
    vote, or no vote on the central edge). `edges`: the tree's (parent, child) pairs rooted at `a`; `vote(p, c)`
    in [-1, 1]: how clearly c's rows are shorter than p's (`norm_t_votes`). Batch mother and the incremental
    index's shown parents (indexer.incremental.index._shown_parents) both decide here."""
    regime = sum(vote(p, c) for p, c in edges if {p, c} != {a, b})
    central = vote(a, b)
    if abs(regime) < 1.0 or central == 0:
        return None
    return a if (regime > 0) == (central > 0) else b  # central > 0: b's rows are the shorter


def _oriented(tree: nx.Graph, root: int, n: int) -> list[int]:
    parent = [-1] * n
    for u, v in nx.bfs_edges(tree, root, sort_neighbors=sorted):
        parent[v] = u
    return parent


def norm_root(tree: nx.Graph, centre: int, shrink: np.ndarray) -> int:
    """The centre, or one of its neighbours when the tree's edges agree better with its norm regime rooted
    there. The regime (+1: children shrink, weight decay on scale-free filters; -1: they grow, a random walk
    adds its own norm) is the sign of the summed votes with the tree rooted at the centre; with no clear
    regime (|sum| < 1 vote) the centre stays."""
    def agreement(root: int) -> float:
        parent = _oriented(tree, root, shrink.shape[0])
        return float(sum(shrink[p, v] for v, p in enumerate(parent) if p >= 0))

    at_centre = agreement(centre)
    if abs(at_centre) < 1.0:
        return centre
    regime = 1.0 if at_centre > 0 else -1.0
    best = max([centre, *sorted(tree.neighbors(centre))], key=lambda r: (regime * agreement(r), r == centre))
    return best


def norm_t_votes(rows: Sequence[np.ndarray]) -> np.ndarray:
    """votes[a, b] in [-1, 1]: how clearly b's rows are shorter than a's, by the paired t statistic of the row
    norm differences (t / 3 capped at one; under no systematic change t is ~N(0, 1) for the thousands of rows
    compared). Unlike `norm_votes`' sign test it weighs each row by how much it moved: a second fine-tune may
    shorten most rows a little and lengthen a few by much (the post-LN encoders of bench/arch_sweep.py)."""
    n = len(rows)
    votes = np.zeros((n, n))
    for a in range(n):
        for b in range(a + 1, n):
            d = np.asarray(rows[a], np.float64) - np.asarray(rows[b], np.float64)  # > 0 where b is shorter
            sd, mean = (float(d.std(ddof=1)) if d.size > 1 else 0.0), float(d.mean()) if d.size else 0.0
            t = mean / (sd / math.sqrt(d.size)) if sd > 0 else math.copysign(math.inf, mean) if mean else 0.0
            votes[a, b] = float(np.clip(t / 3.0, -1.0, 1.0))
            votes[b, a] = -votes[a, b]
    return votes


def norm_votes(rows: Sequence[np.ndarray]) -> np.ndarray:
    """votes[a, b] in [-1, 1]: how clearly b's rows are shorter than a's (a sign test over every row of the
    compared body layers: z = (shorter - longer) / sqrt(rows), a vote of z / 3 capped at one; under no
    systematic change z is ~N(0, 1)). `rows[i]`: model i's row norms, all layers concatenated."""
    n = len(rows)
    votes = np.zeros((n, n))
    for a in range(n):
        for b in range(a + 1, n):
            diff = np.sign(rows[a] - rows[b])  # +1 where b is shorter
            z = float(diff.sum()) / math.sqrt(max(1, int(np.count_nonzero(diff))))
            votes[a, b] = float(np.clip(z / 3.0, -1.0, 1.0))
            votes[b, a] = -votes[a, b]
    return votes
