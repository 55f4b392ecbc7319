"""Direction without upload times: root the undirected spanning tree at its centre.

On the Hub every repo older than 2022-03-02 shares one `createdAt`, so old families must be oriented
from the weights alone. The paper's cue, kurtosis, is a coin flip on our full fine-tuning zoos (8 of 18
edges; 0.52-0.61 accuracy without times). A structural cue does better: fine-tunes move away from
their base in their own directions, so the base of a family sits in the middle of it. We take the
undirected minimum spanning tree of the distance (which places the edges; only their direction is
unknown) and root it at its centre: the node whose farthest node is fewest hops away (networkx
`center`); between two centres (always so in a tree of two), the caller's prior decides (mother's:
the fewest head tensors, then the widest head, as for a group of identical bodies in
indexer.lineage.ties), then the smaller summed distance to all others (the medoid).
Every edge then points away from the root. A chain of checkpoints (a "snake") is the known failure: its
centre is its middle. Measured per zoo and phenomenon in bench/RESULTS.md (`bench/wild.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import networkx as nx
import numpy as np


def centre_rooted_tree(cost: np.ndarray, prior: Sequence[tuple[float, ...]] = ()) -> list[int]:
    """parent[j] (-1 for the root) of the undirected MST of the symmetrised `cost`, rooted at its centre.
    An undirected edge costs its costlier direction: the tie-breaks (indexer.lineage.ties) are asymmetric."""
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
    root = min(nx.center(tree), key=lambda c: (*(prior[c] if prior else ()), float(finite[c].sum()), c))
    parent = [-1] * n
    for u, v in nx.bfs_edges(tree, root, sort_neighbors=sorted):
        parent[v] = u
    return parent
