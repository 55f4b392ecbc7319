"""The numbers both lineage paths decide relations by: the incremental index (indexer.incremental.index)
and the batch recovery (indexer.relations.batch) import them from here, so that the two cannot drift.

Quantized copies:
- LEAF_PENALTY (log units, on every candidate edge out of a quantized copy): more than the whole spread of
  candidate weights (two tiers TIER_GAP = 100 apart, each log distances from log 1e-12 to log 1e3, plus
  the direction and tie terms), so a quantized copy is a parent only when no full-precision model
  relates to the child -- batch's rule, lexicographic (Hub: quantized models are leaves in 99.41 % of
  documented edges). It was 10 (a factor e^10 on the distance) until pair rule 5: then a second copy
  with the same rounding as an earlier one (two tools writing one format, a re-uploaded GGUF: 10^-7
  apart) hung under that copy, 25 log units nearer than under its source (bench/formats.py: 6 of 77).
- QUANT_MULTIPLE: the `quantized` label holds while the copy's relative distance to its parent is within
  3x the scheme's predicted RMS error (sketches.gguf / sketches.packed measured them on Gaussian data;
  heavier-tailed real weights raise absmax-scaled errors by up to ~1.5x), plus QUANT_FLOOR for F16/BF16
  copies of weights already stored in that type (predicted error 0).
- The distance judged is `copy_relative`: the smaller of the plain relative L2 and the residual after
  fitting each matrix's row and column scales (`folded_relative`). AWQ and SmoothQuant fold per-channel
  scales into the weights before quantizing (AutoAWQ's scale_ln_fcs / scale_fc_fc: q, k, v, gate and up
  columns times s, the norm before them divided by s; up rows divided, down columns multiplied), so an
  AWQ copy's dequantized matrix is diag(r) W diag(c) plus rounding: measured on a 4-bit copy, scales of
  spread e^N(0, 0.5) took the plain distance from 0.59 to 2.2 (a `finetune` label) where the fitted one
  stays at the rounding. r and c are in + out numbers against in x out: a fine-tune's update is not
  absorbed by them (a generic perturbation loses (in + out) / (in x out) of its energy, 3 % at 64 x 64).

Merges:
- MERGE_CANDIDATES: the nearest relatives a model is fitted over, plus its likeliest TIES / DARE base
  (`indexer.relations.pool.merge_pool`, the one pool rule of both paths); `indexer.relations.merges.fit`
  tries every subset of up to MAX_PARENTS (3) of them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

LEAF_PENALTY = 1000.0
QUANT_MULTIPLE = 3.0
QUANT_FLOOR = 1e-3
MERGE_CANDIDATES = 5


def within_quantization_error(relative: float, predicted_error: float) -> bool:
    """Is a quantized copy at `relative` distance from a model that model quantized (the `quantized`
    label), given its scheme's predicted RMS error? Else it is a fine-tune of it."""
    return relative <= QUANT_MULTIPLE * predicted_error + QUANT_FLOOR


FOLD_ITERATIONS = 12  # ALS steps from the column-norm start: residual under 1e-3 relative at scale spread e^N(0, 2)
# Each matrix is fitted on its top-left corner: a scaled copy is scaled in every submatrix, and r and c take
# (rows + cols) / (rows x cols) of a generic difference's energy there (1.7 % at 64 x 1024). A screen on a
# 16 x 256 corner (6.6 %) first sets aside pairs that are no rescaled copy at all (a fine-tune's relative,
# the usual case) at a 64th of the cost: a 7B sketch's 32 blocks cost 1.5 ms to screen, 20 ms to fit.
FOLD_CORNER = (64, 1024)
SCREEN_CORNER = (16, 256)
SCREEN_MARGIN = 2.0  # screened above twice the limit: no rescaled copy (a copy's screen reads its rounding)


def _fitted_residual(a: np.ndarray, b: np.ndarray) -> float:
    """||A - diag(r) B diag(c)||_F^2 at the r, c that minimise it (alternating least squares).

    Each step is two matrix-vector products with P = A * B and Q = B * B (elementwise, built once):
    r = P c / Q c^2, then c = P' r / Q' r^2; the residual is then summed directly, in float64."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    p, q = a * b, b * b
    # start from the columns' norm ratio (a pure column scaling is then fitted at once), signed
    c = np.sqrt(np.square(a).sum(0) / np.maximum(q.sum(0), np.float32(1e-30))) * np.sign(p.sum(0))
    r = np.ones(b.shape[0], np.float32)
    for _ in range(FOLD_ITERATIONS):
        r = p @ c / np.maximum(q @ (c * c), np.float32(1e-30))
        c = r @ p / np.maximum((r * r) @ q, np.float32(1e-30))
    diff = a - (b * r[:, None]) * c
    return float(np.square(diff, out=diff).sum(dtype=np.float64))


def folded_relative(copy: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray],
                    corner: tuple[int, int] = FOLD_CORNER) -> float:
    """sqrt(sum of per-layer residuals) / sqrt(sum of (||A||^2 + ||B||^2) / 2) over the layers both hold in
    one shape, each on its top-left `corner`: matrices (conv kernels as out x rest) after fitting their row
    and column scales (module docstring), other layers as they are. NaN when they share no layer."""
    resid = scale = 0.0
    rows, cols = corner
    for name in sorted(set(copy) & set(other)):
        a, b = np.asarray(copy[name], np.float32), np.asarray(other[name], np.float32)
        if a.shape != b.shape:
            continue
        if a.ndim >= 2:
            a, b = a.reshape(a.shape[0], -1)[:rows, :cols], b.reshape(b.shape[0], -1)[:rows, :cols]
            resid += _fitted_residual(a, b)
        else:
            resid += float(np.square(a - b).sum(dtype=np.float64))
        scale += float(np.square(a).sum(dtype=np.float64) + np.square(b).sum(dtype=np.float64)) / 2.0
    return math.sqrt(resid / scale) if scale > 0 else math.nan


def _folded_both(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], corner: tuple[int, int]) -> float:
    """The better of the two fits (either side scaled onto the other): symmetric; inf when none."""
    folded = [f for f in (folded_relative(a, b, corner), folded_relative(b, a, corner)) if not math.isnan(f)]
    return min(folded, default=math.inf)


def copy_relative(plain: float, a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], predicted: float) -> float:
    """The distance a quantized copy's label is judged on: the plain relative L2 (`plain`) when it is within
    the error `predicted` (the smallest of the quantized sides'), else the folded one (module docstring)
    when smaller. Symmetric, so that both lineage paths get one number whichever side arrived first or is
    the copy. Folded only where the plain one fails and the screen does not rule a rescaled copy out."""
    if within_quantization_error(plain, predicted):
        return plain
    limit = QUANT_MULTIPLE * predicted + QUANT_FLOOR
    if _folded_both(a, b, SCREEN_CORNER) > SCREEN_MARGIN * limit:
        return plain
    return min(plain, _folded_both(a, b, FOLD_CORNER))
