"""A calibrated confidence per recovered edge: the probability that the chosen parent is the true one.

Evidence, per child j with chosen parent p, read off the cost matrix the spanning tree was solved on
(distance + direction penalty + tie-break): the relative margin over the runner-up,
    m = (c_r - c_p) / (c_r + c_p)   in [0, 1],
where r is the cheapest other candidate that the relatedness test calls related to j (none: m = 1, the
parent had no rival). An exact tie reads m ~ 0; a rival twice as costly reads 1/3.
Confidence = sigmoid(A + B * m), the logistic regression of "edge correct" on m, fitted on the pooled
edges of every zoo we build (ViT small-ft, wild-conv, wild-bert, wild-gpt2, with and without upload
times); `bench/calibration.py` refits it and prints the calibration table (bins of confidence against
measured accuracy), which is how A and B below were obtained. Duplicates (bit-identical) get 1.
"""

from __future__ import annotations

import math

import numpy as np

from sketches.relatedness import Z_RELATED

# Fitted by bench/calibration.py (see its output in bench/RESULTS.md); refit when the pair rule changes.
CALIB_A = -0.3
CALIB_B = 12.0


def calibrated(margin: float, *, a: float = CALIB_A, b: float = CALIB_B) -> float:
    return 1.0 / (1.0 + math.exp(-(a + b * margin)))


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


def edge_confidences(cost: np.ndarray, parents: list[int], score: np.ndarray) -> np.ndarray:
    margins = edge_margins(cost, parents, score)
    return np.array([calibrated(m) if math.isfinite(m) else math.nan for m in margins])
