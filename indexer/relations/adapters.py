"""Adapters: which indexed model is the declared base, which family an adapter fits, and which adapter
was trained further from which (adapter-to-adapter lineage from the LoRA updates alone).

Base. The declared `base_model_name_or_path` names the parent; it is resolved to an indexed repo by its
exact id, else case-insensitively (the Hub's ids are), a huggingface_hub cache path by its
`models--org--name` part, else by the last two parts of a local path (`/home/me/models/org/name` was
downloaded from `org/name`). A config naming no base, or only a path that is neither, takes the repo
card's `base_model` instead (`sketches.adapter.parse_adapter_config`). Unresolved, it stays the parent by name
(an external parent): the adapter is placed under it and moves under the indexed repo when one with
that id arrives.

Family. The base's family when the base is indexed; else the family whose tensor shapes the adapter
fits (`sketches.adapter.check_compatibility`: every updated tensor present with the update's shape), the
one with the most matched tensors; else none ("").

DoRA. A DoRA adapter's magnitudes are the row norms of the weight it was trained on, moved by training
(`sketches.adapter.magnitude_fit`). They are tested against the first MAGNITUDE_ROWS rows of up to
MAGNITUDE_WEIGHTS of the declared base's DoRA-updated weights, spread over depth (`magnitude_rows`),
read from where the base is (the crawl: the Hub, by range, ~2 MiB for a 7B; `index add` and batch: the
folders given), whether or not the base is indexed yet: the verdict does not depend on arrival order.
Magnitudes that test unrelated to those rows, by a test that had the rows to tell (`decisive`), halve the
edge's confidence (`base_confidence`) and say so in the verdict's details, but do not make it incompatible:
the adapter may have been trained on another model of that shape, or trained long enough to move its
magnitudes farther than the base's rows differ. Chains use s B A, as LoRA's.

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
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from indexer.sources import cache_folder_repo_id
from sketches.adapter import (
    Compatibility,
    LoraUpdate,
    MagnitudeFit,
    check_compatibility,
    exchangeable_rows,
    local_path,
    magnitude_fit,
    update_distance,
    update_norm,
)
from sketches.plan import spread_names
from sketches.relatedness import Z_RELATED

logger = logging.getLogger(__name__)

CHAIN_RATIO = 0.5  # module docstring: ~1 for independent runs, small for a continued one
# The DoRA test's read: 8 weights x 32 rows reach a score of ~12.6 on the trained-on base (over `decisive`'s
# 9.5), for 2 MiB of a 7B's BF16 rows; more rows would only sharpen a verdict already far past its bar.
MAGNITUDE_WEIGHTS = 8
MAGNITUDE_ROWS = 32
Shapes = Mapping[str, tuple[int, ...]]


def resolve_base(declared: str, known: Callable[[str], str | None]) -> str | None:
    """The indexed repo id the declared base names, or None. `known(id)` answers an id (exact or lower-cased
    lookup, the caller's choice) with the indexed id, or None."""
    name = declared.strip().rstrip("/")
    if not name:
        return None
    cached = [r for part in re.split(r"[/\\]", name) if (r := cache_folder_repo_id(part)) is not None]
    if cached:  # .../models--org--name/snapshots/<sha>: downloaded from org/name
        name = cached[0]
    found = known(name)
    if found is None and "/" in name and local_path(name):
        found = known("/".join(name.split("/")[-2:]))  # a local path that ends in org/name
    return found


def base_verdict(updates: Mapping[str, LoraUpdate], saved: Shapes, shapes: Shapes | None, *,
                 layout: str = "peft") -> Compatibility | None:
    """The shapes check against the base (`check_compatibility`), or None (unknown) without the base's
    shapes, or with nothing to check (a PEFT type whose updates are not read, without saved modules), or when a LoRA file without a config names none of the base's tensors: kohya's SDXL files
    name the original checkpoint's modules (input_blocks_4_1_...), the base repo holds diffusers' names,
    and that is another naming scheme, not evidence against the base."""
    if shapes is None or (not updates and not saved):  # nothing to check (IA3, prompt tuning, ...)
        return None
    compat = check_compatibility(updates, saved, shapes)
    if layout != "peft" and compat.matched == 0 and not compat.base_names:
        return None
    return compat


def family_by_shapes(updates: Mapping[str, LoraUpdate], saved: Shapes, families: Mapping[str, Shapes]) -> str:
    """The family whose shapes the adapter fits, most matched tensors first (ties: the smallest key); ""."""
    best, best_matched = "", 0
    for family in sorted(families):
        verdict = check_compatibility(updates, saved, families[family])
        if verdict.verdict == "compatible" and verdict.matched > best_matched:
            best, best_matched = family, verdict.matched
    return best


def decisive(fit: MagnitudeFit) -> bool:
    """Could the test have told the trained-on base? Its score on that base, where m follows the norms
    (r ~ 1), is about median(sqrt(k - 1)) sqrt(2 L / pi); "unrelated" counts only when that would reach
    twice the related bar. A base read by 8 rows of 4 weights (a toy model) cannot; a 7B base read by its
    first 64 rows of 32 weights reaches ~60."""
    rows = fit.rows / max(fit.modules, 1)
    return math.sqrt(max(rows - 1, 0.0)) * math.sqrt(2.0 * fit.modules / math.pi) >= 2 * Z_RELATED


def magnitude_rows(updates: Mapping[str, LoraUpdate], compat: Compatibility) -> dict[str, int]:
    """The base's weights (its names) and rows a DoRA test reads (module docstring); {} for plain LoRA."""
    dora = [w for w, u in updates.items() if u.magnitude is not None and not u.transposed
            and w in compat.base_names and exchangeable_rows(w)]
    chosen = spread_names(dora)[:MAGNITUDE_WEIGHTS]
    return {compat.base_names[w]: min(MAGNITUDE_ROWS, updates[w].b.shape[0]) for w in chosen}


def with_magnitudes(compat: Compatibility, updates: Mapping[str, LoraUpdate],
                    base_rows: Mapping[str, object] | None) -> MagnitudeFit | None:
    """A DoRA adapter's magnitudes tested against the base's rows `magnitude_rows` asked for, when they
    could be read; None for a plain LoRA adapter or without rows (module docstring)."""
    if not base_rows or not any(u.magnitude is not None for u in updates.values()):
        return None
    return magnitude_fit(updates, base_rows, compat.base_names)  # type: ignore[arg-type]


def base_magnitudes(compat: Compatibility | None, updates: Mapping[str, LoraUpdate], bases: Bases | None,
                    base: str) -> MagnitudeFit | None:
    """A DoRA adapter's magnitudes tested against `base`'s rows, read from `bases` (`magnitude_rows`),
    the same rows whichever arrives first; None for a plain LoRA, without shapes, or rows that could not
    be read (logged: the verdict stays the shapes')."""
    wanted = magnitude_rows(updates, compat) if compat is not None else {}
    if not wanted or bases is None:
        return None
    try:
        rows = bases.rows(base, wanted)
    except Exception as exc:  # noqa: BLE001 -- an unreadable base leaves the verdict to its shapes
        logger.warning("base %s: rows for the DoRA test not read (%s)", base, exc)
        return None
    return with_magnitudes(compat, updates, rows)  # type: ignore[arg-type]


def base_confidence(compat: Compatibility | None, magnitudes: MagnitudeFit | None) -> float:
    """How sure the edge to the declared base is: 1 when the adapter fits the base's shapes (and a DoRA
    adapter's magnitudes do not contradict it), 0 when it does not fit them, 0.5 without the base's shapes
    or when the magnitudes, tested with the rows to tell, do not follow the base's rows: trained on another
    model, or moved by a long run farther than the rows' norms differ (bench/dora.py: the trained-on base
    is lost past ~15 % drift), which they cannot tell apart."""
    if compat is None:
        return 0.5
    if compat.verdict == "incompatible":
        return 0.0
    if magnitudes is not None and not magnitudes.related and decisive(magnitudes):
        return 0.5
    return 1.0


def verdict_details(compat: Compatibility | None, *, source: str, magnitudes: MagnitudeFit | None = None) -> dict[str, object]:
    """The models row's verdict fields: compatible / incompatible (with up to 3 reasons) / unknown."""
    if compat is None:
        return {"verdict": "unknown", "verdict_from": "no base shapes (base neither indexed nor readable), or a "
                                                      "LoRA file naming none of the base's tensors (another naming scheme)"}
    out: dict[str, object] = {"verdict": compat.verdict, "verdict_from": source, "matched": compat.matched}
    if magnitudes is not None:
        out["dora_magnitudes"] = magnitudes.details() | {"decisive": decisive(magnitudes)}
    if compat.reasons:
        out["reasons"] = list(compat.reasons[:3])
    if compat.saved_match or compat.saved_new or compat.saved_resized:  # modules_to_save: full copies checked
        out["saved_match_base"] = len(compat.saved_match)
        out["saved_new"] = list(compat.saved_new[:8])
        if compat.saved_resized:
            out["saved_resized"] = list(compat.saved_resized[:4])
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


class Bases(Protocol):
    """Adapters' declared bases, read where the adapters come from (`indexer.crawl.BaseReader`)."""

    def shapes(self, repo_id: str) -> Mapping[str, tuple[int, ...]] | None:
        """Its header's tensor shapes (normalised names), or None."""

    def rows(self, repo_id: str, wanted: Mapping[str, int]) -> Mapping[str, np.ndarray] | None:
        """The first rows of the named tensors, or None."""


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
