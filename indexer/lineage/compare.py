"""`index compare A B`: an auditor's question, "is B derived from A?", answered from the weights.

Steps:
    1. Load each side: a local repo folder (every learned float tensor, whole) or a Hub repo read by range
       with the crawl's plan (its headers, then at most the byte budget of planned rows; heads are not in
       the plan, so they are reported as not read). Names normalised (sketches.layers). A quantized copy
       (GGUF, GPTQ, AWQ, bitsandbytes, FP8, compressed-tensors, MLX) is read by the crawl's reader and
       dequantized, locally too; an adapter repo is refused (compare its base).
    2. Comparable: the two cores overlap by at least CORE_SHARE (sketches.layers.core_overlap); else the
       answer is "not comparable" and nothing else is computed.
    3. Related: the row-permutation test on the shared body layers (sketches.relatedness): Z, p-value.
    4. Distance: the spectral-tail distance on the shared dense layers (the pair rule's full-rank tier)
       and the relative L2 over all shared layers.
    5. Direction: bit-identical -> duplicate (the earlier upload is the original); else, when exactly one
       side is a quantized copy, that side is the child if it is within its scheme's predicted error of
       the other (indexer.relations.rules.copy_relative: AWQ's folded scales fitted away): "quantized";
       else the earlier upload is the parent when both times are known and differ; else kurtosis
       (specialisation lowers it: the model with the lower summed excess kurtosis of its output
       projections is the child), which is a weak cue (a coin flip on our full fine-tuning zoo) and is
       labelled so.
    6. Heads: every head tensor both have, with its two shapes, whether they match, and their distance.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from errors import BadInputError, RepoNotFoundError
from indexer.lineage.methods import spectral_tail_distance
from indexer.readers import QuantInfo
from indexer.relations.rules import QUANT_FLOOR, QUANT_MULTIPLE, copy_relative, within_quantization_error
from indexer.sources import local_created_at
from sketches.layers import CORE_SHARE, canonical_tensors, core_overlap, is_head, select_layers
from sketches.relatedness import relate
from sketches.safetensors import open_local_repo
from sketches.stats import model_stats

WHOLE = 1 << 60  # a local quantized copy is read whole, as `index recover` reads it


@dataclass(frozen=True)
class Side:
    """One model as loaded for a comparison."""

    name: str
    shapes: dict[str, tuple[int, ...]]  # every learned float tensor named in its headers (normalised)
    arrays: dict[str, np.ndarray]  # the tensors actually read
    created: datetime | None
    source: str  # "local" or the endpoint
    quant: QuantInfo | None = None  # a quantized copy: its scheme and predicted error


@dataclass(frozen=True)
class HeadMatch:
    name: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    match: bool
    relative_distance: float | None  # None: shapes differ or not read


@dataclass(frozen=True)
class Comparison:
    a: str
    b: str
    comparable: bool
    core_overlap: float
    shared_layers: tuple[str, ...] = ()
    related: bool = False
    score: float = math.nan
    p_value: float = math.nan
    direction: str = "unknown"  # "A -> B", "B -> A", "duplicate", "unknown", "none" (not related)
    direction_why: str = ""
    tail_distance: float = math.nan
    relative_l2: float = math.nan
    identical: bool = False
    heads: tuple[HeadMatch, ...] = field(default=())
    quantized: str = ""  # "A" or "B": the side that is a quantized copy ("" when neither or both)
    scheme: str = ""  # its scheme (gguf-Q4_K, awq-4bit, mlx-4bit ...)
    copy_distance: float = math.nan  # the relative distance its label is judged on (scales fitted)
    copy_limit: float = math.nan  # QUANT_MULTIPLE x the scheme's predicted error + QUANT_FLOOR

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("score", "p_value", "tail_distance", "relative_l2", "copy_distance", "copy_limit"):
            if isinstance(out[key], float) and not math.isfinite(out[key]):
                out[key] = None if math.isnan(out[key]) else ("inf" if out[key] > 0 else "-inf")
        return out


# --- 1. loading ----------------------------------------------------------------------------------


def load_local(folder: Path) -> Side:
    from indexer.lineage.recover import _special
    from indexer.readers import looks_packed

    if _special(folder):  # GGUF (or an adapter, refused there)
        return _load_with_reader(folder)
    with open_local_repo(folder) as weights:
        infos = weights.tensors()
        if looks_packed(infos):  # a packed quantized copy: the crawl's reader dequantizes it
            return _load_with_reader(folder)
        stored = canonical_tensors(infos)
        shapes = {n: tuple(infos[raw].shape) for n, raw in stored.items()}
        arrays = {n: np.asarray(weights.read(stored[n]), dtype=np.float32) for n in sorted(stored)}
    return Side(str(folder), shapes, arrays, local_created_at(folder), "local")


def _load_with_reader(folder: Path) -> Side:
    """A GGUF or packed quantized folder through the crawl's reader, dequantized whole."""
    from indexer.crawl import read_folder

    read, _ = read_folder(folder, budget=WHOLE)
    if read.adapter is not None:
        raise BadInputError(str(folder), "a PEFT adapter, not a model: compare its base model (its "
                                         "adapter_config.json names it)")
    shapes = {n: tuple(info.shape) for n, info in read.tensors.items()}
    return Side(str(folder), shapes, {n: np.asarray(a, np.float32) for n, a in read.arrays.items()},
                local_created_at(folder), "local", read.quant)


def load_hub(repo_id: str, *, endpoint: str, token: str | None, budget: int) -> Side:
    from indexer.crawl import read_model
    from indexer.sources import HubSource

    hub = HubSource(endpoint, token=token)
    entry = hub.model_info(repo_id)
    read = read_model(hub.repo(entry), budget=budget, have_token=token is not None)
    if read.adapter is not None:
        raise BadInputError(repo_id, "a PEFT adapter, not a model: compare its base model (its adapter_config.json names it)")
    shapes = {n: tuple(info.shape) for n, info in read.tensors.items()}
    return Side(repo_id, shapes, {n: np.asarray(a, np.float32) for n, a in read.arrays.items()}, entry.created_at,
                endpoint, read.quant)


def load_side(spec: str, *, endpoint: str, token: str | None, budget: int) -> Side:
    """A folder when `spec` is one, else a Hub repo id (ORG/NAME); neither -> one line naming it."""
    path = Path(spec)
    if path.is_dir():
        return load_local(path)
    if path.exists() or spec.count("/") != 1 or spec.startswith((".", "/")):
        raise BadInputError(spec, "no such folder, and not a Hub repo id of the form ORG/NAME")
    try:
        return load_hub(spec, endpoint=endpoint, token=token, budget=budget)
    except RepoNotFoundError:
        raise BadInputError(spec, f"no such folder here and no such repo on {endpoint}") from None


# --- 2-6. the comparison ---------------------------------------------------------------------------


def compare(a: Side, b: Side) -> Comparison:
    overlap = core_overlap(a.shapes, b.shapes)
    if overlap < CORE_SHARE:
        return Comparison(a.name, b.name, False, overlap)
    shared = tuple(sorted(n for n in a.arrays if n in b.arrays and a.arrays[n].shape == b.arrays[n].shape
                          and a.arrays[n].ndim in (2, 4)))
    body = [n for n in shared if not is_head(n)]
    if not body:
        return Comparison(a.name, b.name, False, overlap)
    test = relate([a.arrays[n] for n in body], [b.arrays[n] for n in body])
    tail, rel = _distances(a, b, body)
    identical = _identical(a, b)
    copy = _copy(a, b, body, rel)
    if copy is not None and copy[2] and test.related and not identical:
        side = copy[0]
        direction = "A -> B" if side == "B" else "B -> A"
        other = "A" if side == "B" else "B"
        why = (f"{side} is a quantized copy ({copy[1]}) of {other}, or of a fine-tune of {other} closer than its "
               f"rounding: within its scheme's predicted error (distance {copy[3]:.3g} <= {copy[4]:.3g}); "
               "quantized models are leaves (99.4 % on the Hub)")
    elif test.related or identical:
        direction, why = _direction(a, b, body, identical)
    else:
        direction, why = "none", "not related: there is no lineage to orient"
    side, scheme, _, distance, limit = copy if copy is not None else ("", "", False, math.nan, math.nan)
    return Comparison(a.name, b.name, True, overlap, tuple(body), test.related, test.score, test.p_value,
                      direction, why, tail, rel, identical, _heads(a, b), side, scheme, distance, limit)


def _copy(a: Side, b: Side, body: list[str], rel: float) -> tuple[str, str, bool, float, float] | None:
    """(side, scheme, within its error, the distance judged, the limit) when exactly one side is a
    quantized copy, else None."""
    if (a.quant is None) == (b.quant is None):
        return None
    side, quant = ("A", a.quant) if a.quant is not None else ("B", b.quant)
    assert quant is not None
    distance = copy_relative(rel, {n: a.arrays[n] for n in body}, {n: b.arrays[n] for n in body}, quant.predicted_error)
    limit = QUANT_MULTIPLE * quant.predicted_error + QUANT_FLOOR
    return side, quant.scheme, within_quantization_error(distance, quant.predicted_error), distance, limit


def _distances(a: Side, b: Side, body: list[str]) -> tuple[float, float]:
    dense = select_layers([{n: a.arrays[n].shape for n in body}], scheme="shared").dense or tuple(body)
    stacked = [np.stack([a.arrays[n], b.arrays[n]]) for n in dense]
    tail = float(spectral_tail_distance(stacked, device="cpu")[0, 1])
    diff = sum(float(np.sum((a.arrays[n].astype(np.float64) - b.arrays[n]) ** 2)) for n in body)
    scale = sum((float(np.sum(a.arrays[n].astype(np.float64) ** 2)) + float(np.sum(b.arrays[n].astype(np.float64) ** 2))) / 2
                for n in body)
    return tail, math.sqrt(diff / scale) if scale > 0 else 0.0


def _identical(a: Side, b: Side) -> bool:
    names = set(a.arrays) | set(b.arrays)
    return set(a.shapes) == set(b.shapes) and all(
        n in a.arrays and n in b.arrays and a.arrays[n].shape == b.arrays[n].shape
        and np.array_equal(a.arrays[n], b.arrays[n]) for n in names)


def _direction(a: Side, b: Side, body: list[str], identical: bool) -> tuple[str, str]:
    if identical:
        first = _earlier(a, b)
        return "duplicate", (f"bit-identical; the original is {first} (uploaded first)" if first
                             else "bit-identical; upload times do not say which is the original")
    first = _earlier(a, b)
    if first is not None:
        return ("A -> B" if first == a.name else "B -> A"), "upload time: a parent is uploaded before its child (99.7 % on the Hub)"
    layers = select_layers([{n: a.arrays[n].shape for n in body}], scheme="shared").direction
    ku_a = model_stats({n: a.arrays[n] for n in layers}).kurtosis_sum(layers)
    ku_b = model_stats({n: b.arrays[n] for n in layers}).kurtosis_sum(layers)
    if not (math.isfinite(ku_a) and math.isfinite(ku_b)) or ku_a == ku_b:
        return "unknown", "no upload times and no kurtosis difference"
    arrow = "A -> B" if ku_a > ku_b else "B -> A"
    return arrow, (f"weak cue: kurtosis {ku_a:.3g} (A) vs {ku_b:.3g} (B), specialisation lowers it; "
                   "no upload times to confirm")


def _earlier(a: Side, b: Side) -> str | None:
    if a.created is None or b.created is None or a.created == b.created:
        return None
    return a.name if a.created < b.created else b.name


def _heads(a: Side, b: Side) -> tuple[HeadMatch, ...]:
    out = []
    for name in sorted(n for n in a.shapes if n in b.shapes and is_head(n)):
        sa, sb = a.shapes[name], b.shapes[name]
        dist = None
        if sa == sb and name in a.arrays and name in b.arrays:
            x, y = a.arrays[name].astype(np.float64), b.arrays[name].astype(np.float64)
            scale = math.sqrt((float(np.sum(x * x)) + float(np.sum(y * y))) / 2)
            dist = float(np.linalg.norm(x - y)) / scale if scale > 0 else 0.0
        out.append(HeadMatch(name, sa, sb, sa == sb, dist))
    return tuple(out)


def render(c: Comparison) -> str:
    """The comparison as a few readable lines."""
    if not c.comparable:
        return f"not comparable: {c.a} and {c.b} share {c.core_overlap:.0%} of their core (need {CORE_SHARE:.0%})"
    p = "< 1e-300" if c.p_value == 0 else f"{c.p_value:.3g}"
    lines = [
        f"comparable: {len(c.shared_layers)} shared layers ({c.core_overlap:.0%} of the smaller core)",
        f"related: {'yes' if c.related else 'no'} (Z = {c.score:.1f}, p = {p})",
        f"direction: {c.direction} ({c.direction_why})",
        f"distance: spectral tail {c.tail_distance:.4g}, relative L2 {c.relative_l2:.4g}"
        + (" (bit-identical)" if c.identical else ""),
    ]
    if c.quantized:
        lines.append(f"quantized: {c.quantized} is quantized ({c.scheme}); distance {c.copy_distance:.3g} against the "
                     f"{c.copy_limit:.3g} its scheme allows ({'within' if c.copy_distance <= c.copy_limit else 'beyond'}"
                     " it: " + ("a quantized copy" if c.copy_distance <= c.copy_limit else "a fine-tune of a quantized copy, or of a relative") + ")")
    heads = [f"{h.name} {list(h.shape_a)} vs {list(h.shape_b)}: "
             + ("same shape" + (f", relative distance {h.relative_distance:.3g}" if h.relative_distance is not None else ", not read")
                if h.match else "different shapes")
             for h in c.heads]
    lines.append("heads: " + ("; ".join(heads) if heads else "none in common"))
    return "\n".join(lines)


def side_summary(side: Side) -> Mapping[str, object]:
    return {"name": side.name, "tensors": len(side.shapes), "read": len(side.arrays), "source": side.source}
