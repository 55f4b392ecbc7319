"""Per-layer weight statistics, computed in one pass over each model's selected tensors.

MoTHer's direction cue is the excess kurtosis of each layer's flattened weights, exactly as
`scipy.stats.kurtosis(w.ravel())` computes it with its defaults (Fisher: normal -> 0.0; biased
moments: m4 / m2**2 - 3). We reproduce that formula in float64 so that float32 weights give the
same value as scipy fed the same array upcast (scipy itself accumulates float32 input in float32,
which drifts by ~1e-6 relative; the test pins both).

A constant layer (m2 == 0) has no kurtosis: scipy returns NaN there, and so do we.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerStats:
    """Moments of one tensor, flattened. `finite` is False when any entry is NaN or +-inf."""

    name: str
    numel: int
    mean: float
    std: float  # population standard deviation (ddof=0), sqrt(m2)
    kurtosis: float  # excess, Fisher, biased: scipy.stats.kurtosis defaults
    l2: float  # Frobenius norm
    max_abs: float
    finite: bool


@dataclass(frozen=True)
class ModelStats:
    """Statistics of every selected layer of one model, in sorted layer-name order."""

    layers: tuple[LayerStats, ...]

    @property
    def finite(self) -> bool:
        return all(layer.finite for layer in self.layers)

    def by_name(self) -> dict[str, LayerStats]:
        return {layer.name: layer for layer in self.layers}

    def kurtosis_sum(self, names: Iterable[str]) -> float:
        """ku(m) of DESIGN.md: the sum of per-layer excess kurtosis over `names` (NaN layers count 0)."""
        table = self.by_name()
        values = [table[name].kurtosis for name in sorted(names)]
        return float(sum(v for v in values if not math.isnan(v)))

    def l2_norm(self, names: Iterable[str]) -> float:
        """Norm of the concatenation of the named layers (sqrt of the sum of squared Frobenius norms)."""
        table = self.by_name()
        return float(math.sqrt(sum(table[name].l2**2 for name in sorted(names))))


def excess_kurtosis(values: np.ndarray) -> float:
    """scipy.stats.kurtosis(values.ravel()) with defaults (fisher=True, bias=True), in float64."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        return math.nan
    centred = x - x.mean()
    sq = centred * centred
    m2 = float(sq.mean())
    if m2 == 0.0:
        return math.nan  # scipy: 0/0 -> nan for a constant sample
    m4 = float((sq * sq).mean())
    return m4 / (m2 * m2) - 3.0


def layer_stats(name: str, values: np.ndarray) -> LayerStats:
    """All the moments of one tensor in one float64 sweep (mean, m2, m4, norm, max |w|)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    finite = bool(np.isfinite(x).all())
    if not finite or x.size == 0:
        return LayerStats(name, int(x.size), math.nan, math.nan, math.nan, math.nan, math.nan, finite)
    mean = float(x.mean())
    centred = x - mean
    sq = centred * centred
    m2 = float(sq.mean())
    kurt = math.nan if m2 == 0.0 else float((sq * sq).mean()) / (m2 * m2) - 3.0
    return LayerStats(
        name=name,
        numel=int(x.size),
        mean=mean,
        std=math.sqrt(m2),
        kurtosis=kurt,
        l2=float(np.sqrt(np.dot(x, x))),
        max_abs=float(np.abs(x).max()),
        finite=True,
    )


def model_stats(arrays: Mapping[str, np.ndarray]) -> ModelStats:
    """Statistics of each named array, layers in sorted name order (deterministic)."""
    return ModelStats(tuple(layer_stats(name, arrays[name]) for name in sorted(arrays)))
