"""Minimum directed spanning tree (Chu-Liu/Edmonds) over a cost matrix, via networkx.

`M[i, j]` is the cost of the edge parent i -> child j. The diagonal and any other +inf entry mean "no
such edge" and are not given to networkx at all (an +inf weight would poison the sums Edmonds compares).
The arborescence's root is free: the cheapest spanning arborescence over every possible root.
Edges are inserted in sorted (i, j) order so that ties break the same way on every run.
"""

from __future__ import annotations

import logging
import math

import networkx as nx
import numpy as np

from errors import RecoveryError

logger = logging.getLogger(__name__)


def _graph(cost: np.ndarray) -> nx.DiGraph:
    n = cost.shape[0]
    graph = nx.DiGraph()
    graph.add_nodes_from(range(n))
    for i in range(n):
        for j in range(n):
            if i != j and math.isfinite(float(cost[i, j])):
                graph.add_edge(i, j, weight=float(cost[i, j]))
    return graph


def minimum_arborescence(cost: np.ndarray) -> list[int]:
    """parent[j] for each node j (-1 for the root) of the minimum spanning arborescence of `cost`."""
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise RecoveryError(f"cost matrix must be square, got shape {cost.shape}")
    n = cost.shape[0]
    if n == 1:
        return [-1]
    if np.isnan(cost).any():
        raise RecoveryError("cost matrix holds NaN: a distance could not be computed")
    try:
        tree = nx.minimum_spanning_arborescence(_graph(cost), attr="weight", preserve_attrs=False)
    except nx.NetworkXException as exc:
        raise RecoveryError(f"no spanning arborescence exists over {n} models: {exc}") from exc
    parent = [-1] * n
    for i, j in sorted(tree.edges()):
        parent[j] = i
    return parent


def arborescence_cost(cost: np.ndarray, parent: list[int]) -> float:
    """Sum of cost[parent[j], j] over the non-root nodes."""
    return float(sum(cost[p, j] for j, p in enumerate(parent) if p >= 0))
