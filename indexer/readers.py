"""Readers for the weight layouts beyond plain safetensors: PEFT adapters, GGUF files, packed quantized
safetensors. Each reads by range only what its plan selects and hands the crawl a `ModelRead` like the
plain reader does (`indexer.crawl.read_model` picks the reader from the file list and the headers).

Adapter repos (`adapter_config.json` + `adapter_model.safetensors`):
    1. the config, one small GET (`sketches.adapter.parse_adapter_config`: not JSON, no base -> AdapterError,
       a recorded failure with one line of reason);
    2. the adapter's safetensors header (one 100,000-byte range read, as for any model);
    3. the LoRA factors, whole, pair by pair (A with its B: a half pair is useless), layers spread over
       depth (`sketches.plan.spread_order`) until the byte budget is spent; a real 7B LoRA at r = 16 on
       q/v is 8 MiB of factors, so the default 64 MiB budget reads all of them. Full copies saved with
       `modules_to_save` are never read: their shapes (from the header) are enough to check them against
       the base, and a saved LM head is 250 MiB.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from errors import AdapterError
from sketches.adapter import MAX_CONFIG_BYTES, AdapterConfig, lora_pairs, parse_adapter_config, saved_modules
from sketches.plan import BlockRead, ReadPlan, spread_order
from sketches.safetensors import TensorInfo

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FAMILY = "adapter"  # the plan's label; the adapter's family is its base's, decided by lineage


@dataclass(frozen=True)
class AdapterRead:
    """What an adapter repo gave: its config, the LoRA factors read, the shapes of its saved modules."""

    config: AdapterConfig
    saved: Mapping[str, tuple[int, ...]]  # base tensor name -> shape of the full copy the adapter saves
    pairs: int  # LoRA pairs in the file
    pairs_read: int  # ... of which the budget held
    details: Mapping[str, Any] = field(default_factory=dict)


def adapter_details(config: AdapterConfig, saved: Mapping[str, tuple[int, ...]], pairs: int, read: int) -> dict[str, Any]:
    """The models row's `details` for an adapter (JSON-ready, deterministic)."""
    targets = config.target_modules if isinstance(config.target_modules, str) else sorted(config.target_modules)
    return {"base_model": config.base_model, "r": config.r, "lora_alpha": config.lora_alpha,
            "target_modules": targets, "modules_to_save": sorted(config.modules_to_save),
            "saved_tensors": len(saved), "lora_pairs": pairs, "lora_pairs_read": read,
            "use_rslora": config.use_rslora, "use_dora": config.use_dora, "fan_in_fan_out": config.fan_in_fan_out,
            "rank_pattern": dict(config.rank_pattern), "alpha_pattern": dict(config.alpha_pattern)}


def config_from_details(details: Mapping[str, Any]) -> AdapterConfig:
    """The AdapterConfig an adapter's `details` recorded (what its updates' scales need), for a restart."""
    targets = details.get("target_modules") or ()
    return AdapterConfig(
        base_model=str(details.get("base_model", "")), peft_type="LORA", r=int(details.get("r", 8)),
        lora_alpha=float(details.get("lora_alpha", 8)),
        target_modules=targets if isinstance(targets, str) else tuple(targets),
        modules_to_save=tuple(details.get("modules_to_save") or ()), use_rslora=bool(details.get("use_rslora")),
        fan_in_fan_out=bool(details.get("fan_in_fan_out")), use_dora=bool(details.get("use_dora")),
        rank_pattern=tuple((k, int(v)) for k, v in (details.get("rank_pattern") or {}).items()),
        alpha_pattern=tuple((k, float(v)) for k, v in (details.get("alpha_pattern") or {}).items()))


def read_adapter_config(read_small: Any, repo_id: str) -> AdapterConfig:
    """Step 1: the config, parsed and validated (AdapterError names the file)."""
    raw = read_small(ADAPTER_CONFIG, limit=MAX_CONFIG_BYTES)
    return parse_adapter_config(raw, name=f"{repo_id}/{ADAPTER_CONFIG}")


def _pair_order(pairs: Mapping[str, tuple[str, str]]) -> list[str]:
    """Base weights in step 3's order: layers spread over depth, then by name (deterministic)."""
    from sketches.plan import _layer  # the plan's own notion of a tensor's layer index

    layers = sorted({_layer(w) for w in pairs if _layer(w) >= 0})
    rank = {layers[pos]: i for i, pos in enumerate(spread_order(len(layers)))}
    return sorted(pairs, key=lambda w: (rank.get(_layer(w), len(layers)), w))


def plan_adapter(tensors: Mapping[str, TensorInfo], *, budget: int, repo_id: str) -> tuple[ReadPlan, int]:
    """Step 3's plan: whole LoRA factor pairs within `budget`; (plan, pairs in the file)."""
    pairs = lora_pairs(tensors)  # AdapterError on an A without its B
    if not pairs:
        raise AdapterError(f"{repo_id}/{ADAPTER_WEIGHTS}", "holds no lora_A / lora_B pair")
    blocks, used = [], 0
    for weight in _pair_order(pairs):
        a, b = (tensors[n] for n in pairs[weight])
        if used + a.nbytes + b.nbytes > budget:
            break  # a prefix of the order, as the plain plan: smaller budgets read a subset
        blocks += [BlockRead(t.name, (0, t.shape[0] if t.shape else 1), t.nbytes, True) for t in (a, b)]
        used += a.nbytes + b.nbytes
    if not blocks:
        raise AdapterError(f"{repo_id}/{ADAPTER_WEIGHTS}", f"a budget of {budget} bytes cannot hold one LoRA pair")
    model_bytes = sum(t.nbytes for t in tensors.values())
    return ReadPlan(ADAPTER_FAMILY, budget, tuple(sorted(blocks, key=lambda b: b.tensor)), 2 * len(pairs), model_bytes), len(pairs)


def saved_shapes(tensors: Mapping[str, TensorInfo]) -> dict[str, tuple[int, ...]]:
    """Base tensor name -> shape of each full copy (modules_to_save) the adapter holds."""
    return {base: tuple(tensors[name].shape) for base, name in saved_modules(tensors).items()}


def lora_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The factors as float64 (sketches.adapter works in float64)."""
    return {n: np.asarray(a, dtype=np.float64) for n, a in sorted(arrays.items())}
