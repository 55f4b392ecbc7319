"""The numbers both lineage paths decide relations by: the incremental index (indexer.incremental.index)
and the batch recovery (indexer.relations.batch) import them from here, so that the two cannot drift.

Quantized copies:
- LEAF_PENALTY (log units, on every candidate edge out of a quantized copy): a factor e^10 on the
  distance, more than any gap between a real parent and a sibling, so a quantized copy is a parent only
  when no full-precision model relates to the child (Hub: quantized models are leaves in 99.41 % of
  documented edges).
- QUANT_MULTIPLE: the `quantized` label holds while the copy's relative distance to its parent is within
  3x the scheme's predicted RMS error (sketches.gguf / sketches.packed measured them on Gaussian data;
  heavier-tailed real weights raise absmax-scaled errors by up to ~1.5x), plus QUANT_FLOOR for F16/BF16
  copies of weights already stored in that type (predicted error 0).

Merges:
- MERGE_CANDIDATES: the nearest relatives a model is fitted over, plus its likeliest TIES / DARE base
  (`indexer.relations.pool.merge_pool`, the one pool rule of both paths); `indexer.relations.merges.fit`
  tries every subset of up to MAX_PARENTS (3) of them.
"""

from __future__ import annotations

LEAF_PENALTY = 10.0
QUANT_MULTIPLE = 3.0
QUANT_FLOOR = 1e-3
MERGE_CANDIDATES = 5


def within_quantization_error(relative: float, predicted_error: float) -> bool:
    """Is a quantized copy at `relative` distance from a model that model quantized (the `quantized`
    label), given its scheme's predicted RMS error? Else it is a fine-tune of it."""
    return relative <= QUANT_MULTIPLE * predicted_error + QUANT_FLOOR
