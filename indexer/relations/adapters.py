"""Adapters: which indexed model is the declared base, which family an adapter fits, and which adapter
was trained further from which (adapter-to-adapter lineage from the LoRA updates alone).

Base. The declared `base_model_name_or_path` names the parent; it is resolved to an indexed repo by its
exact id, else case-insensitively (the Hub's ids are), else by the last two parts of a local path
(`/home/me/models/org/name` was downloaded from `org/name`). Unresolved, it stays the parent by name
(an external parent): the adapter is placed under it and moves under the indexed repo when one with
that id arrives.

Family. The base's family when the base is indexed; else the family whose tensor shapes the adapter
fits (`sketches.adapter.check_compatibility`: every updated tensor present with the update's shape), the
one with the most matched tensors; else none ("").

Chains. Two adapters of one base whose updates U, V satisfy
    ratio = sum_l ||U_l - V_l||^2 / sum_l (||U_l||^2 + ||V_l||^2)  <  CHAIN_RATIO
over the tensors both update are one training run continued: independently trained adapters start
from B = 0 and random A, so their updates are nearly orthogonal (ratio ~ 1: ||U - V||^2 = ||U||^2 +
||V||^2 - 2<U, V> with <U, V> ~ 0), while an adapter trained further keeps most of its start (ratio =
||delta||^2 / (2 ||V||^2 + ...) well below 1/2 as long as the continuation moved it by less than its
own size). Every quantity is an r x r product (`sketches.adapter.update_distance`), never B @ A.
The parent of a chain edge is the earlier upload (unknown times: the smaller update, training further
grows it), the closest such related adapter; an adapter with none hangs under the base.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from sketches.adapter import Compatibility, LoraUpdate, check_compatibility, update_distance, update_norm

logger = logging.getLogger(__name__)

CHAIN_RATIO = 0.5  # module docstring: ~1 for independent runs, small for a continued one
Shapes = Mapping[str, tuple[int, ...]]


def resolve_base(declared: str, known: Callable[[str], str | None]) -> str | None:
    """The indexed repo id the declared base names, or None. `known(id)` answers an id (exact or lower-cased
    lookup, the caller's choice) with the indexed id, or None."""
    name = declared.strip().rstrip("/")
    if not name:
        return None
    found = known(name)
    if found is None and "/" in name and (name.startswith(("/", ".", "~")) or name.count("/") > 1):
        found = known("/".join(name.split("/")[-2:]))  # a local path that ends in org/name
    return found


def family_by_shapes(updates: Mapping[str, LoraUpdate], saved: Shapes, families: Mapping[str, Shapes]) -> str:
    """The family whose shapes the adapter fits, most matched tensors first (ties: the smallest key); ""."""
    best, best_matched = "", 0
    for family in sorted(families):
        verdict = check_compatibility(updates, saved, families[family])
        if verdict.verdict == "compatible" and verdict.matched > best_matched:
            best, best_matched = family, verdict.matched
    return best


def verdict_details(compat: Compatibility | None, *, source: str) -> dict[str, object]:
    """The models row's verdict fields: compatible / incompatible (with up to 3 reasons) / unknown."""
    if compat is None:
        return {"verdict": "unknown", "verdict_from": "no base shapes (base neither indexed nor readable)"}
    out: dict[str, object] = {"verdict": compat.verdict, "verdict_from": source, "matched": compat.matched}
    if compat.reasons:
        out["reasons"] = list(compat.reasons[:3])
    if compat.saved_match or compat.saved_new:  # modules_to_save: the full copies checked against the base
        out["saved_match_base"] = len(compat.saved_match)
        out["saved_new"] = list(compat.saved_new[:8])
    return out


def total_norm(updates: Mapping[str, LoraUpdate]) -> float:
    return math.sqrt(sum(update_norm(u) ** 2 for u in updates.values()))


def chain_ratio(u: Mapping[str, LoraUpdate], v: Mapping[str, LoraUpdate]) -> float | None:
    """The module docstring's ratio over the tensors both update with one layout; None when none."""
    shared = sorted(w for w in set(u) & set(v) if u[w].weight_shape == v[w].weight_shape
                    and u[w].transposed == v[w].transposed)
    if not shared:
        return None
    diff = sum(update_distance(u[w], v[w]) ** 2 for w in shared)
    size = sum(update_norm(u[w]) ** 2 + update_norm(v[w]) ** 2 for w in shared)
    return diff / size if size > 0 else None


@dataclass(frozen=True)
class Peer:
    """An adapter of the same base, as the chain step sees it."""

    repo_id: str
    created: float | None
    norm: float


def earlier(a: Peer, b: Peer) -> bool:
    """a before b: by upload time when both are known, else by update norm, then by id (a strict order)."""
    if a.created is not None and b.created is not None and a.created != b.created:
        return a.created < b.created
    if a.norm != b.norm:
        return a.norm < b.norm
    return a.repo_id < b.repo_id


def nearest_peers(new: Peer, peers: Sequence[Peer], k: int) -> list[Peer]:
    """The k peers to compare exactly: closest in total update norm (a continued run changes it little)."""
    def gap(p: Peer) -> tuple[float, str]:
        if new.norm <= 0 or p.norm <= 0:
            return (math.inf, p.repo_id)
        return (abs(math.log(p.norm / new.norm)), p.repo_id)

    return sorted((p for p in peers if p.repo_id != new.repo_id), key=gap)[:k]
