"""Satellites: models placed beside the MDST forest rather than in it, because their parent is not found
by comparing weights with every relative but declared and checked (adapters: the LoRA factors are not
weights of the base's shape). A satellite hangs under an *anchor* (a forest model, or an external parent
known by name only), directly or through other satellites (an adapter trained further from another).

Its edges row takes the anchor's cluster and root, and depth = anchor's depth + hops, so `index query`
finds it among the anchor's children and in the anchor's tree; whenever the lineage index rewrites the
rows of a cluster it rewrites its satellites' rows too. An external anchor's tree is
`external:<name>`, rooted at the name. Kept across restarts by the edges rows (relation `adapter`) and
the adapters' models rows (`details`: the config their update scales need).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from indexer.readers import AdapterRead
from sketches.adapter import AdapterConfig

EXTERNAL_PREFIX = "external:"


@dataclass(frozen=True)
class AdapterArrival:
    """An adapter repo read by the crawl: its LoRA factors (the planned pairs) and what the config says."""

    repo_id: str
    revision: str
    created_at: datetime | None
    adapter: AdapterRead
    arrays: Mapping[str, np.ndarray]


@dataclass
class Satellite:
    repo_id: str
    revision: str
    family: str  # the anchor's family ("" when no family fits)
    anchor: str  # a forest repo id, or the declared base's name when external
    external: bool
    parent: str  # the anchor, or another satellite
    relation: str
    distance: float  # chain edges: the update ratio (indexer.relations.adapters); NaN under the anchor
    confidence: float
    created: float | None
    norm: float  # total update norm
    config: AdapterConfig | None = None
    tensors: tuple[str, ...] = field(default_factory=tuple)  # the factor names read (cache / refetch keys)


def chain_depth(sats: Mapping[str, Satellite], repo_id: str) -> int:
    """Hops from a satellite up to its anchor (1 when it hangs directly under it)."""
    hops, node, seen = 0, repo_id, set()
    while node in sats and node not in seen:
        seen.add(node)
        hops += 1
        node = sats[node].parent
    return hops
