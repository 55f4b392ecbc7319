"""Exact pairwise distances between models, batched in torch and chunked to bounded memory.

Every function takes the models' weights one layer at a time, as an array of shape (n_models, ...)
(float32, as decoded), and returns an (n, n) float64 numpy matrix with a zero diagonal.

- `linf_minmax_distance`: MoTHer's full fine-tuning distance (DESIGN.md). For layer l, min_l and max_l
  are taken over all pairwise differences W_i - W_j, i != j, in both orders, so min_l = -max_l = -R_l
  where R_l is the largest spread (max_i - min_i) of any entry. Then
  D[i,j] = max_l max_e ((W_i - W_j)_e + R_l) / (2 R_l). This is the literal formula: it uses the signed
  difference, so D is not symmetric (D[j,i] reads the most negative entry instead).
- `rank_distance`: MoTHer's LoRA distance, D[i,j] = sum_l rank(W_i,l - W_j,l) with numpy's default
  tolerance S.max() * max(M, N) * eps, eps of float32 because the difference is taken in float32
  (in float64 the float32 rounding of merged weights would read as full rank).
- `l2_distance`: sqrt of the summed squared Frobenius norms of the differences, via a float64 Gram
  matrix (|a|^2 + |b|^2 - 2ab: float64 keeps 10 significant digits even when the difference is 1e-3
  of the weights, as in fine-tuning), accumulated over column chunks.

Memory: a block of differences holds at most `max_elements` floats (default 2**24, 64 MiB in float32);
rows of pairs are processed block by block, so the peak is independent of the number of models.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch

from errors import BadInputError

logger = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]

# 2**24 floats = 64 MiB per block of differences: small next to the 2-core box's memory, large enough
# that a 105-model ViT layer needs only a handful of blocks.
DEFAULT_MAX_ELEMENTS = 1 << 24
_F32_EPS = float(np.finfo(np.float32).eps)


def resolve_device(device: Device) -> torch.device:
    """`auto` means CUDA when torch sees a GPU, else the CPU; `cuda` without a GPU is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BadInputError("--device cuda", "torch sees no CUDA GPU here; use --device auto or cpu")
    return torch.device(device)


def _as_rows(layer: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(n, ...) -> (n, d) float32 tensor, on the CPU (blocks move to the device one at a time)."""
    tensor = torch.as_tensor(layer)
    if tensor.ndim < 1:
        raise BadInputError("layer", "expected an array of shape (n_models, ...)")
    return tensor.reshape(tensor.shape[0], -1).to(torch.float32)


def _row_blocks(n: int, per_row: int, max_elements: int) -> Iterator[tuple[int, int]]:
    step = max(1, max_elements // max(per_row, 1))
    for start in range(0, n, step):
        yield start, min(n, start + step)


def _check_layers(layers: Sequence[np.ndarray | torch.Tensor]) -> int:
    if not layers:
        raise BadInputError("layers", "no layers to compare: select at least one shared tensor")
    sizes = {int(np.shape(layer)[0]) for layer in layers}
    if len(sizes) != 1:
        raise BadInputError("layers", f"layers disagree on the number of models: {sorted(sizes)}")
    return sizes.pop()


def _max_signed_difference(rows: torch.Tensor, dev: torch.device, max_elements: int) -> torch.Tensor:
    """out[i, j] = max over entries of (rows[i] - rows[j]), computed in blocks of i."""
    n, d = rows.shape
    full = rows.to(dev)
    out = torch.empty((n, n), dtype=torch.float32, device=dev)
    for start, stop in _row_blocks(n, n * d, max_elements):
        diff = full[start:stop, None, :] - full[None, :, :]  # (b, n, d)
        out[start:stop] = diff.amax(dim=2)
    return out


def linf_minmax_distance(
    layers: Sequence[np.ndarray | torch.Tensor],
    *,
    device: Device = "auto",
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> np.ndarray:
    """MoTHer's min-max normalised L-infinity distance (see the module docstring for the formula)."""
    n = _check_layers(layers)
    dev = resolve_device(device)
    total = torch.zeros((n, n), dtype=torch.float64)
    for layer in layers:
        rows = _as_rows(layer)
        spread = float((rows.amax(dim=0) - rows.amin(dim=0)).amax()) if n > 1 else 0.0
        if spread == 0.0:
            continue  # identical in every model: 0/0, carries no information about any pair
        maxdiff = _max_signed_difference(rows, dev, max_elements).to("cpu", torch.float64)
        total = torch.maximum(total, (maxdiff + spread) / (2.0 * spread))
    total.fill_diagonal_(0.0)
    return total.numpy()


def l2_distance(
    layers: Sequence[np.ndarray | torch.Tensor],
    *,
    device: Device = "auto",
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> np.ndarray:
    """sqrt(sum_l ||W_i,l - W_j,l||_F^2), from a float64 Gram matrix accumulated in column chunks."""
    n = _check_layers(layers)
    dev = resolve_device(device)
    gram = torch.zeros((n, n), dtype=torch.float64, device=dev)
    for layer in layers:
        rows = _as_rows(layer)
        for start, stop in _row_blocks(rows.shape[1], n, max_elements):
            chunk = rows[:, start:stop].to(dev, torch.float64)
            gram += chunk @ chunk.T
    gram = gram.cpu()
    sq = torch.diagonal(gram)
    dist2 = (sq[:, None] + sq[None, :] - 2.0 * gram).clamp_min(0.0)
    dist = dist2.sqrt()
    dist.fill_diagonal_(0.0)
    return dist.numpy()


def l2_per_layer(
    layers: Sequence[np.ndarray | torch.Tensor],
    *,
    device: Device = "auto",
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> tuple[np.ndarray, np.ndarray]:
    """(L, n, n) L2 distances layer by layer, and the (L, n) Frobenius norms, from float64 Grams."""
    n = _check_layers(layers)
    dists, norms = [], []
    for layer in layers:
        dist = l2_distance([layer], device=device, max_elements=max_elements)
        rows = _as_rows(layer).to(torch.float64)
        dists.append(dist)
        norms.append(torch.linalg.vector_norm(rows, dim=1).numpy())
    return np.stack(dists), np.stack(norms).reshape(len(layers), n)


def median_relative_distance(
    layers: Sequence[np.ndarray | torch.Tensor],
    *,
    device: Device = "auto",
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> np.ndarray:
    """median over layers of ||W_i - W_j|| / sqrt(||W_i||^2 + ||W_j||^2): ~1 unrelated, ~0 relatives.

    Independently initialised weights are near-orthogonal, so the ratio of two unrelated models is 1 in
    every layer (>= 0.998 on the zoo); fine-tuning moves each layer by a small fraction, and LoRA leaves
    most layers untouched (0), so relatives stay near 0 (<= 0.002 on the zoo) even when one LoRA update
    is larger than the weights it changed (whole-model ratio up to 0.78 on the tiny LoRA zoo): the
    median over layers ignores those few layers.
    """
    dists, norms = l2_per_layer(layers, device=device, max_elements=max_elements)
    scale = np.sqrt(norms[:, :, None] ** 2 + norms[:, None, :] ** 2)
    ratio = np.divide(dists, scale, out=np.zeros_like(dists), where=scale > 0)
    out = np.median(ratio, axis=0)
    np.fill_diagonal(out, 0.0)
    return out


def layer_normalised_l2(
    layers: Sequence[np.ndarray | torch.Tensor],
    *,
    device: Device = "auto",
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> np.ndarray:
    """sum over layers of ||W_i,l - W_j,l|| / (median over pairs of that layer's distance).

    Every layer gets one vote of the same scale: a small layer that moves a lot (the patch embedding
    held 32-74% of the squared L2 distance of the small full-FT zoo's edges, and it converges towards
    the same solution in models trained on the same task, related or not) no longer decides alone.
    Layers identical in every pair contribute nothing.
    """
    dists, _ = l2_per_layer(layers, device=device, max_elements=max_elements)
    n = dists.shape[1]
    if n < 2:
        return np.zeros((n, n))
    off = ~np.eye(n, dtype=bool)
    scale = np.array([np.median(d[off]) for d in dists])
    keep = scale > 0
    out = (dists[keep] / scale[keep, None, None]).sum(axis=0)
    np.fill_diagonal(out, 0.0)
    return out


def _pairs(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(i + 1, n)]  # sorted: deterministic


@contextmanager
def library_threads(n: int) -> Iterator[None]:
    """Run the block with torch's intra-op pool and every BLAS / OpenMP pool (threadpoolctl) at `n` threads;
    the previous sizes come back after it (settings.DEFAULT_THREADS says why the crawl asks for 1)."""
    from threadpoolctl import threadpool_limits

    with _torch_threads(n), threadpool_limits(limits=n):
        yield


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op pool at `n` threads for the block, its previous size after."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextmanager
def _one_thread_on_cpu(tensor: torch.Tensor) -> Iterator[None]:
    """Small batched SVDs on the CPU run one thread: with the default pool, a 21 x 128 x 128 batch took
    1.56 s on the 2-core box while other jobs ran, against 0.057 s on one thread (spinning workers)."""
    if tensor.device.type != "cpu":
        yield
        return
    with _torch_threads(1):
        yield


def _svdvals(diffs: torch.Tensor) -> torch.Tensor:
    if diffs.is_cuda:  # gesvd: 0.84 ms a 64 x 4096 matrix on an H100, the default gesvdj 1.42 ms
        return torch.linalg.svdvals(diffs, driver="gesvd")
    with _one_thread_on_cpu(diffs):
        return torch.linalg.svdvals(diffs)


def matrix_ranks(diffs: torch.Tensor) -> torch.Tensor:
    """Numerical rank of each matrix in a (p, M, N) float32 batch, numpy.linalg.matrix_rank's tolerance."""
    svals = _svdvals(diffs)  # (p, min(M, N)), descending
    tol = svals[:, :1] * max(diffs.shape[-2], diffs.shape[-1]) * _F32_EPS
    return (svals > tol).sum(dim=1)


def rank_gaps(diffs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank, gap) per matrix of a (p, M, N) batch; gap = S[rank-1] / S[rank], inf at 0 or full rank.

    A merged LoRA update of rank r has a cliff after r singular values (gaps of 1e3-1e5 on the zoo:
    the rest is float32 rounding), a full fine-tuning update decays smoothly into that noise (gaps ~1-8).
    """
    return rank_gaps_of(_svdvals(diffs).to(torch.float64), max(diffs.shape[-2], diffs.shape[-1]))


def rank_gaps_of(svals: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`rank_gaps` from (p, s) singular values (descending, float64) of matrices whose longer side is
    `width` (sketches.gram gets them from a Gram matrix instead of an SVD)."""
    tol = svals[:, :1] * width * _F32_EPS
    ranks = (svals > tol).sum(dim=1)
    gaps = torch.full((svals.shape[0],), float("inf"), dtype=torch.float64, device=svals.device)
    inner = (ranks > 0) & (ranks < svals.shape[1])
    rows = torch.nonzero(inner).flatten()
    if len(rows):
        r = ranks[rows]
        gaps[rows] = svals[rows, r - 1] / svals[rows, r].clamp_min(1e-300)
    return ranks, gaps


def rank_distance(
    layers: Sequence[np.ndarray | torch.Tensor],
    *,
    device: Device = "auto",
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> np.ndarray:
    """D[i, j] = sum_l rank(W_i,l - W_j,l); each layer is (n, M, N) (conv kernels: (n, out, in*k*k))."""
    n = _check_layers(layers)
    dev = resolve_device(device)
    total = np.zeros((n, n), dtype=np.float64)
    pairs = _pairs(n)
    for layer in layers:
        mats = torch.as_tensor(layer).to(torch.float32)
        mats = mats.reshape(n, mats.shape[1], -1) if mats.ndim != 3 else mats
        per_pair = mats.shape[1] * mats.shape[2]
        for start, stop in _row_blocks(len(pairs), per_pair, max_elements):
            block = pairs[start:stop]
            left = torch.tensor([i for i, _ in block])
            right = torch.tensor([j for _, j in block])
            diffs = (mats[left] - mats[right]).to(dev)  # float32, as the weights were stored
            ranks = matrix_ranks(diffs).cpu().numpy()
            for (i, j), rank in zip(block, ranks, strict=True):
                total[i, j] += rank
                total[j, i] += rank
    return total
