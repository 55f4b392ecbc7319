"""Are two models relatives? A test whose null distribution is known, not a distance threshold.

Null hypothesis: the two models were trained independently from random initialisation (same
architecture and init scheme allowed). Under it, the units of a layer (its rows: output channels,
neurons, or the residual basis of a transformer, which independent runs draw at random) are
exchangeable between the two models: nothing ties row i of model A to row i of model B rather than to
row pi(i). Models that share an ancestor inherited the same units in the same order, so row i of one
still correlates with row i of the other, however far they drifted.

Statistic, per layer (the layer viewed as a matrix: rows = axis 0, conv kernels flattened), after
subtracting each model's layer mean ("deviations from a layer's mean"):
    G = A B^T (rows x rows),  S = trace(G) = sum_i <a_i, b_i>.
Under the null, S is one draw of S_pi = sum_i G[i, pi(i)] over uniform random permutations pi, whose
mean and variance are exact (Hoeffding's combinatorial central limit theorem, the linear permutation
statistic):
    E = (1/n) sum_ij G_ij,   Var = 1/(n - 1) sum_ij (G_ij - r_i - c_j + g)^2
with r, c, g the row, column and grand means of G. z = (S - E) / sqrt(Var) is approximately N(0, 1)
under the null, whatever the weights' distribution or the structure of their columns (input pixels,
filter shapes shared by independent runs cancel: they raise G off the diagonal as much as on it).
For relatives z grows like rho * sqrt(rows * columns) (rho the correlation of inherited units): a
64 x 64 layer whose units kept a correlation of 0.1 already reads z ~ 6.

Per pair: the layers' z are combined by their median, scaled to unit variance under the null:
Z = median(z_l) * sqrt(2 L / pi) (the median of L independent N(0, 1) has variance ~ pi / (2 L); for
small L it is smaller, so the test is conservative there). The one-sided p-value is P(N(0, 1) > Z);
related when p < ALPHA. Why the median and not Stouffer's sum: a sum is carried by one extreme layer,
and unrelated models can share one layer bit for bit (two models built on one frozen pre-trained
embedding, tests/test_incremental.py): they share a part, not an ancestor of the whole. The median asks
that most layers descend from the same units, which every parent and child we build or have seen do
(a fine-tune drifted 0.9 in relative L2 still reads z in the tens per layer).
ALPHA is a significance level, not a constant fitted to a zoo: 1e-6 keeps the expected false positives
below 1 in a million pairs compared. Only the first MAX_ROWS rows of a layer are used (the rows a
budgeted read takes first; any subset of exchangeable rows is still exchangeable), which bounds the
cost at MAX_ROWS^2 x columns per layer and pair; layers with fewer than MIN_ROWS rows (the permutation
distribution of 7 rows is too coarse for a normal tail) or with no variance are left out. Wider rows
are projected to MAX_COLS columns by one fixed Gaussian matrix per width (seeded by the width: the same
for every model, every night), which keeps the test exact (both models are projected alike, so their
rows stay exchangeable under the null) and bounds its cost; relatives still read z ~ rho * 128.

Batch (`relatedness_matrix`): every pair of n models from a few Gram products, never a per-pair matrix:
with U_i the units of model i (m x k), s_i its column sums and C_i = U_i^T U_i (k x k),
    trace(G_ij) = <U_i, U_j>,  sum(G_ij) = <s_i, s_j>,  ||G_ij||^2 = <C_i, C_j>,
    sum_a rowmean_a^2 = s_j^T C_i s_j / m^2,  sum_b colmean_b^2 = s_i^T C_j s_i / m^2,
and the centred sum of squares is ||G||^2 - m sum r^2 - m sum c^2 + m^2 g^2 (the two-way decomposition).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import norm

ALPHA = 1e-6
Z_RELATED = float(norm.isf(ALPHA))  # 4.75
MAX_ROWS = 128
MAX_COLS = 128
MIN_ROWS = 8


@dataclass(frozen=True)
class Relatedness:
    """The test of one pair: Stouffer score, one-sided p-value, the layers it used, the verdict."""

    score: float
    p_value: float
    layers: int
    related: bool


def as_units(layer: np.ndarray | torch.Tensor) -> torch.Tensor | None:
    """One model's layer -> (rows, columns) float64, its mean removed; None when the test cannot use it."""
    t = torch.as_tensor(np.asarray(layer) if not isinstance(layer, torch.Tensor) else layer)
    if t.ndim < 2 or t.shape[0] < MIN_ROWS:
        return None
    return unit_rows(t)


def unit_rows(layer: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """The first m = min(rows, MAX_ROWS) rows of a layer, less their mean, projected to MAX_COLS columns
    when wider: (m, min(cols, MAX_COLS)) float64. The one definition of a model's units, for the batch
    test, the index's per-model units (sketches.gram.units) and the exact step's reference kernel.

    A wide layer is centred and projected in float32 (its values are float32 or narrower as stored; the
    projection is the fixed Gaussian one rounded to float32, `projection32`): the product's rounding is
    ~sqrt(cols) x eps32 = 4e-6 of an entry (cols = 4,096), and z moves by about as much relative -- far
    inside the gap between what relatives read (tens per layer) and the test's 4.75. In float64 the product
    was the costliest part of a 7B arrival's relatedness pass (1.5 against 0.65 ms a 64 x 4096 block, one
    thread). Narrow layers are not projected: float64 as before. `scratch`: a float32 buffer of at least
    the m rows' size for the centred rows, reused across models (fresh pages for each model's copy cost
    as much as the product on the shared 2-core box)."""
    m = min(int(layer.shape[0]), MAX_ROWS)
    mat = layer[:m].reshape(m, -1)
    if mat.shape[1] <= MAX_COLS:
        wide = mat.to(torch.float64)
        return wide - wide.mean()
    single = mat.to(torch.float32)
    out = scratch.reshape(-1)[: single.numel()].view(single.shape) if scratch is not None else None
    centred = torch.sub(single, single.mean(dtype=torch.float64).to(torch.float32), out=out)
    return (centred @ projection32(mat.shape[1], mat.device)).to(torch.float64)


_projections: dict[int, torch.Tensor] = {}
_projections32: dict[tuple[int, str], torch.Tensor] = {}


def projection(cols: int) -> torch.Tensor:
    """The fixed (cols, MAX_COLS) Gaussian projection of rows this wide, scaled to keep norms."""
    if cols not in _projections:
        rng = np.random.Generator(np.random.PCG64(cols))
        _projections[cols] = torch.as_tensor(rng.standard_normal((cols, MAX_COLS)) / math.sqrt(MAX_COLS))
    return _projections[cols]


def projection32(cols: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """`projection(cols)` rounded to float32, on `device` (kept: 2 MiB for a 4,096-wide layer)."""
    key = (cols, str(device))
    if key not in _projections32:
        _projections32[key] = projection(cols).to(torch.float32).to(device)
    return _projections32[key]


def permutation_z(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """z of trace(A B^T) against its row-permutation null, for a batch (p, rows, cols) -> (p,); NaN when
    the null has no spread (a constant layer)."""
    g = a @ b.mT
    n = g.shape[-1]
    s = torch.diagonal(g, dim1=-2, dim2=-1).sum(-1)
    rows = g.mean(dim=-1, keepdim=True)
    cols = g.mean(dim=-2, keepdim=True)
    grand = g.mean(dim=(-2, -1), keepdim=True)
    centred = g - rows - cols + grand
    var = centred.pow(2).sum(dim=(-2, -1)) / (n - 1)
    mean = g.sum(dim=(-2, -1)) / n
    z = (s - mean) / var.sqrt()
    return torch.where(var > 0, z, torch.full_like(z, math.nan))


def combine(zs: Sequence[float] | np.ndarray) -> Relatedness:
    """The median-based Z over the usable layers and its one-sided p-value (module docstring)."""
    vals = np.asarray([z for z in zs if not math.isnan(z)], dtype=np.float64)
    if len(vals) == 0:
        return Relatedness(math.nan, math.nan, 0, False)
    score = median_score(vals)
    p = float(norm.sf(score))
    return Relatedness(score, p, len(vals), p < ALPHA)


def median_score(zs: np.ndarray) -> float:
    """median(z) * sqrt(2 L / pi): ~N(0, 1) under the null (module docstring)."""
    return float(np.median(zs) * math.sqrt(2.0 * len(zs) / math.pi))


def relate(layers_a: Sequence[np.ndarray], layers_b: Sequence[np.ndarray]) -> Relatedness:
    """The test on two models' matching layers (same shapes, in the same order)."""
    zs = []
    for la, lb in zip(layers_a, layers_b, strict=True):
        a, b = as_units(la), as_units(lb)
        if a is not None and b is not None and a.shape == b.shape:
            zs.append(float(permutation_z(a[None], b[None])[0]))
    return combine(zs)


def relatedness_matrix(layers: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(Z, p) of every pair of n models; `layers` are (n, ...) stacks of one layer each. Diagonal: +inf, 0.
    A pair with no usable layer reads Z = 0 (no evidence)."""
    n = int(np.shape(layers[0])[0]) if layers else 0
    per_layer = []
    for layer in layers:
        units = [as_units(np.asarray(layer)[i]) for i in range(n)]
        if n and units[0] is not None:
            per_layer.append(_all_pairs_z(torch.stack(units)))  # type: ignore[arg-type]
    score = np.zeros((n, n), dtype=np.float64)
    if per_layer:
        zs = np.stack(per_layer)  # (layers, n, n)
        count = (~np.isnan(zs)).sum(axis=0)
        with warnings.catch_warnings():  # a pair with no usable layer: all-NaN slice, no evidence
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nanmedian(zs, axis=0)
        score = np.where(count > 0, np.nan_to_num(med) * np.sqrt(2.0 * count / math.pi), 0.0)
        score = (score + score.T) / 2.0  # exact symmetry (G_ji = G_ij^T gives the same z up to rounding)
    np.fill_diagonal(score, np.inf)
    return score, norm.sf(score)


def _all_pairs_z(units: torch.Tensor) -> np.ndarray:
    """(n, n) permutation z of one layer for every pair, from Gram products (module docstring)."""
    n, m, _ = units.shape
    flat = units.reshape(n, -1)
    trace = flat @ flat.T
    sums = units.sum(dim=1)  # (n, k)
    total = sums @ sums.T
    gram = units.mT @ units  # (n, k, k)
    sq = gram.reshape(n, -1) @ gram.reshape(n, -1).T
    rows = torch.einsum("ikl,jk,jl->ij", gram, sums, sums) / m**2  # sum of squared row means of G_ij
    grand = total / m**2
    centred = sq - m * rows - m * rows.T + m**2 * grand**2
    var = centred / (m - 1)
    z = (trace - total / m) / var.clamp_min(0).sqrt()
    return torch.where(var > 1e-12 * sq.clamp_min(1e-300), z, torch.full_like(z, math.nan)).numpy()
