"""A calibrated confidence per recovered edge: the probability that the chosen parent is the true one.

Evidence, per child j with chosen parent p, read off the cost matrix the spanning tree was solved on
(distance + direction penalty + tie-break): the relative margin over the runner-up,
    m = (c_r - c_p) / (c_r + c_p)   in [0, 1],
where r is the cheapest other candidate that the relatedness test calls related to j (none: m = 1, the
parent had no rival). An exact tie reads m ~ 0; a rival twice as costly reads 1/3.
Confidence = sigmoid(A + B * m + C * t), t = 1 when the edge was oriented by upload times (0: by the
weights alone), the logistic regression of "edge correct" on (m, t), fitted on the pooled edges of every
zoo we build (ViT small-ft, wild-conv, wild-bert, wild-gpt2, each with and without upload times);
`bench/wild.py --refit` refits it and prints the calibration table (bins of confidence against measured
accuracy), which is how A, B and C below were obtained. Why t: on those zoos an edge placed with upload
times was right 100 % of the time, without them 87 %; and a margin of ~0 is not a coin flip there,
because the tie-breaks (heads, upload order) decide most exact ties rightly. Duplicates get 1.
Caveat: fitted on our zoos, where errors are rare (11 of 164 edges); real families will differ.
"""

from __future__ import annotations

import math

import numpy as np

from sketches.relatedness import Z_RELATED

# Fitted by `bench/wild.py --refit` on 164 pooled edges (its output is in bench/RESULTS.md); refit when the
# pair rule changes. A margin of 0 reads 0.80 without times and 0.98 with them; a margin of 1, 0.94 and 0.998.
CALIB_A = 1.40
CALIB_B = 1.40
CALIB_C = 2.50


def calibrated(margin: float, *, timed: bool = True, a: float = CALIB_A, b: float = CALIB_B, c: float = CALIB_C) -> float:
    return 1.0 / (1.0 + math.exp(-(a + b * margin + c * float(timed))))


def edge_margins(cost: np.ndarray, parents: list[int], score: np.ndarray) -> np.ndarray:
    """m per child (NaN for a root): the relative margin of its parent over the cheapest related rival."""
    n = len(parents)
    out = np.full(n, np.nan)
    for j, p in enumerate(parents):
        if p < 0:
            continue
        rivals = [float(cost[i, j]) for i in range(n) if i not in (p, j) and score[i, j] > Z_RELATED
                  and math.isfinite(float(cost[i, j]))]
        chosen = float(cost[p, j])
        if not rivals:
            out[j] = 1.0
            continue
        best = min(rivals)
        out[j] = float(np.clip((best - chosen) / (best + chosen), 0.0, 1.0)) if best + chosen > 0 else 0.0
    return out
