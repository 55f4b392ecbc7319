"""Spectra of layer differences from small float64 Gram matrices, and per-model relatedness units.

The exact step (indexer.incremental.exact) needs three things of each (pair, layer) difference D = A - B
viewed as an M x N matrix: its numerical rank and singular-value cliff (the regime), the norm of its
singular values past the top k (the spectral tail), and the relatedness test's z. A crawled 7B block is
short and wide (64 x 4096), so all of D's singular values are in the s x s Gram matrix, s = min(M, N):
    s_i(D)^2 = lambda_i(D D^T)   (D^T D when M > N).
One float64 Gram product and one s x s `eigvalsh` replace the float32 SVD of the rank test and the Gram
the tail already used: a single spectrum answers both (`spectrum`).

Why D D^T and not A A^T - A B^T - B A^T + B B^T (per-model Grams, cacheable): the cross product A B^T
costs as many flops per pair as D D^T does, so the cache saves nothing, and the sum cancels: its
rounding is eps64 x ||A||^2, which for a near-duplicate (||D|| = 1e-6 ||A||) is 1e-4 of ||D||^2 and would
decide the rank test by noise. D itself is the float32 difference the SVD path took (mother's rank
convention), promoted to float64: products of two float32 values are exact in float64, so the Gram is
the float32 difference's own Gram up to the float64 summation (relative 1e-16 x sqrt(N) per entry).

Precision against the SVD (what `rank_gaps_of` decides on): an eigenvalue of the float64 Gram is off by
at most ~ s x eps64 x lambda_max, so a singular value sqrt(lambda) is resolved down to ~ sqrt(s x eps64)
= 1e-7 of the largest (s = 64), far below the rank test's tolerance max(M, N) x eps32 = 4.9e-4 of it
(N = 4096; 2.9e-6 for the 24-column test layers). The float32 SVD it replaces resolves singular values
only to ~eps32 x s_max = 1.2e-7 of the largest, so near the tolerance the two differ by the SVD's own
rounding (relative 2.4e-4 there, 1.3e-3 for 768-wide layers), and a rank can differ only for a singular
value within that of the tolerance, a cliff decision only for a cliff within a few % of LOW_RANK_GAP.
On the bench zoos (bench/exact_cpu.py) one rank of one layer differed, the Gram's being the float64
SVD's (indexer.incremental.exact's docstring); no cliff decision did.

Relatedness (sketches.relatedness): z of trace(U_A U_B^T) needs the units U = (A - mean A) P of each
model (its first MAX_ROWS rows, projected to MAX_COLS columns by the fixed Gaussian P, `unit_rows`). U is per model:
`units` computes it once per model and layer, where the SVD path projected both sides again for every
pair (two (64 x 4096) x (4096 x 128) float64 products a pair and layer: 80 % of that path's flops).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from sketches.distances import _one_thread_on_cpu
from sketches.relatedness import MAX_ROWS, MIN_ROWS, unit_rows


def gram(diffs: torch.Tensor, dtype: torch.dtype = torch.float64, which: torch.Tensor | None = None) -> torch.Tensor:
    """(p, M, N) -> (p, s, s) Gram of each matrix on its short side, s = min(M, N), in `dtype` (float32:
    only for a spectral tail, indexer.incremental.exact's SINGLE_TAIL_NORMS; the rank test needs float64).
    `which`: the matrices to take (host indexes; None: all). On the CPU they are read where they are, each
    converted to `dtype` on its own: no gathered copy of the chunk, no float64 copy of it."""
    if diffs.device.type == "cpu" and dtype in _SYRK and diffs.dtype in _SYRK:
        return _syrk(diffs, dtype, range(len(diffs)) if which is None else which.tolist())
    d = (diffs if which is None or len(which) == len(diffs) else diffs[which.to(diffs.device)]).to(dtype)
    return d @ d.mT if d.shape[1] <= d.shape[2] else d.mT @ d


_SYRK = {torch.float32: "ssyrk", torch.float64: "dsyrk"}


@lru_cache(maxsize=1)
def _blas() -> Any:
    """A threadpoolctl controller, built once (it inspects the loaded libraries: 1 ms; a limit then 10 us)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _syrk(d: torch.Tensor, dtype: torch.dtype, which: Sequence[int]) -> torch.Tensor:
    """`gram` on the CPU by BLAS syrk, one matrix at a time on one BLAS thread, lower triangle mirrored.

    Why: a Gram matrix is symmetric, and syrk computes one triangle where a matrix product computes both.
    On a 64 x 4096 block (the crawler's 7B value blocks): 0.27 ms in float32 and 0.53 ms in float64 a
    matrix, against 0.39 / 0.82-0.97 ms for torch's product on one thread (2-core dev box). The Gram
    products of the related pairs are most of the exact step's CPU (bench/crawl_rate.py). Each matrix is
    its own call, so a pair's Gram has the same bits in any batch (tests/test_exact_batch.py). A matrix
    of another dtype is converted into one reused buffer first (exact: float32 in float64), which stays
    in cache for the product."""
    from scipy.linalg import blas

    syrk = getattr(blas, _SYRK[dtype])
    wide = d.shape[1] <= d.shape[2]
    arrays = d.numpy()
    side = min(d.shape[1:])
    out = torch.empty((len(which), side, side), dtype=dtype)
    cast = np.empty(d.shape[1:], dtype=out.numpy().dtype) if d.dtype != dtype else None
    with _blas().limit(limits=1, user_api="blas"):
        for slot, i in zip(out.numpy(), which, strict=True):
            x = arrays[i] if cast is None else _cast_into(cast, arrays[i])
            # x.T is Fortran-ordered: syrk reads it in place. trans=1: (x.T)^T x.T = x x^T; trans=0: x^T x
            slot[...] = syrk(1.0, x.T, trans=1 if wide else 0, lower=1)
    return torch.tril(out) + torch.tril(out, -1).mT


def _cast_into(buffer: np.ndarray, x: np.ndarray) -> np.ndarray:
    np.copyto(buffer, x, casting="unsafe")  # float32 -> float64: exact
    return buffer


def spectrum(grams: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a (p, s, s) batch of symmetric float64 matrices, ascending, on the host.

    Small batched eigensolvers: one thread is faster on a shared CPU (sketches.distances), and on CUDA
    the host is faster too (64 x 64 float64: 0.44 ms a matrix on an H100, 0.18 ms on its CPU), so the
    Gram products stay on the device and only the (p, s, s) matrices travel, once per layer chunk.
    Grams from a GPU are solved on all the host's cores (`host_spectra`): while the device works the
    host's cores are idle, and one core's eigensolves would bound the GPU path (issue 14: 10,000
    7B-shaped pairs need ~10^5-10^6 of them). On the CPU path one thread, as before: the crawl's
    parallelism is its fetch threads and processes."""
    host = grams.cpu().to(torch.float64)  # a float32 Gram too: the solver adds no float32 rounding of its own
    if grams.device.type != "cpu":
        return host_spectra(host, len(os.sched_getaffinity(0)))
    with _one_thread_on_cpu(host):
        return torch.linalg.eigvalsh(host)


HOST_SOLVES_PER_THREAD = 32  # below this many matrices a thread's hand-off costs more than it saves


def host_spectra(host: torch.Tensor, threads: int) -> torch.Tensor:
    """`torch.linalg.eigvalsh` of a host batch split over up to `threads` threads (torch releases the GIL in
    the solver), each solve on one thread as in `spectrum`: every matrix is its own LAPACK call, so the
    eigenvalues have the same bits however the batch is split (tests/test_exact_fast.py)."""
    parts = max(1, min(threads, len(host) // HOST_SOLVES_PER_THREAD))
    with _one_thread_on_cpu(host):
        if parts == 1:
            return torch.linalg.eigvalsh(host)
        out = torch.empty(host.shape[:-1], dtype=host.dtype)
        pieces = list(zip(torch.tensor_split(host, parts), torch.tensor_split(out, parts), strict=True))
        list(_solver_pool(parts).map(lambda piece: torch.linalg.eigvalsh(piece[0], out=piece[1]), pieces))
        return out


@lru_cache(maxsize=8)
def _solver_pool(threads: int) -> ThreadPoolExecutor:
    """One pool per width, kept for the process (a GPU crawl solves a chunk's spectra every layer)."""
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="eigvalsh")


def singular_values(eig: torch.Tensor) -> torch.Tensor:
    """Singular values, descending, from ascending Gram eigenvalues (rounding can leave them at -1e-16
    of the largest: clamped to 0)."""
    return eig.flip(-1).clamp_min(0.0).sqrt()


def tail_from_spectrum(eig: torch.Tensor, keep: int) -> torch.Tensor:
    """sqrt of the sum of the `keep` smallest squared singular values (indexer.lineage.methods.tail_norms)."""
    return eig[:, :keep].clamp_min(0.0).sum(dim=1).sqrt()


def usable_for_relatedness(layer: torch.Tensor) -> bool:
    """sketches.relatedness.as_units' condition on one model's layer (rows = axis 0)."""
    return layer.ndim >= 2 and layer.shape[0] >= MIN_ROWS


def units(layers: Sequence[torch.Tensor]) -> torch.Tensor:
    """n models' float32 layers (rows, ...) -> (n, m, min(cols, MAX_COLS)) float64 relatedness units
    (`sketches.relatedness.unit_rows`: the first m = min(rows, MAX_ROWS) rows less their mean, projected
    when wider than MAX_COLS), one product per model instead of one per pair and side, through one
    reused scratch buffer."""
    rows = min(int(layers[0].shape[0]), MAX_ROWS)
    scratch = torch.empty(rows * math.prod(layers[0].shape[1:]), dtype=torch.float32, device=layers[0].device)
    return torch.stack([unit_rows(layer, scratch) for layer in layers])


def unit_filters(kernels: torch.Tensor) -> torch.Tensor:
    """(..., out, in*kh*kw) conv kernels -> float64, each output filter (row) divided by its norm; an
    all-zero filter stays zero.

    Why (the tail of a conv layer is taken on these, indexer.lineage.methods.spectral_tail_distance and
    indexer.incremental.exact): a conv followed by a normalisation (BatchNorm, GroupNorm) computes the
    same function whatever each filter's scale, and weight decay shrinks that free scale during every
    run. A fine-tune of a conv net therefore moves each filter along minus itself: the median cosine of
    dW with -W_parent is 0.17-0.37 per layer on wild-conv-s1's fine-tunes and 0.998 on its long
    high-lr run (about 0 on BERT). Every sibling shares that full-rank shrink, so the tail, which drops
    only the top directions, reads it as shared drift, and a near-copy of the root lies "on the way" to
    all its siblings. The directions of the filters are what the function depends on."""
    k = kernels.to(torch.float64)
    norms = torch.linalg.vector_norm(k, dim=-1, keepdim=True)
    return torch.where(norms > 0, k / norms.clamp_min(1e-300), torch.zeros_like(k))


def filter_count(kernels: torch.Tensor) -> torch.Tensor:
    """Norm of `unit_filters(kernels)` per leading index: sqrt of the number of nonzero filters."""
    return (kernels != 0).any(dim=-1).sum(dim=-1).to(torch.float64).sqrt()
