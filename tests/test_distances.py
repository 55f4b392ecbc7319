"""Exact pairwise distances: the DESIGN formulas, numpy's rank semantics, chunking never changes a bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from errors import BadInputError
from sketches.distances import l2_distance, linf_minmax_distance, rank_distance, resolve_device


def _models(n: int = 5, shape: tuple[int, ...] = (6, 7), layers: int = 3, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, *shape)).astype(np.float32) for _ in range(layers)]


def _linf_reference(layers: list[np.ndarray]) -> np.ndarray:
    """DESIGN.md literally, with plain loops: min/max over every ordered pair's differences."""
    n = layers[0].shape[0]
    out = np.zeros((n, n))
    for layer in layers:
        diffs = {(i, j): (layer[i] - layer[j]).ravel() for i in range(n) for j in range(n) if i != j}
        lo = min(float(d.min()) for d in diffs.values())
        hi = max(float(d.max()) for d in diffs.values())
        for (i, j), d in diffs.items():
            out[i, j] = max(out[i, j], float(((d - lo) / (hi - lo)).max()))
    return out


def test_linf_matches_the_design_formula() -> None:
    layers = _models()
    np.testing.assert_allclose(linf_minmax_distance(layers, device="cpu"), _linf_reference(layers), rtol=1e-6)


def test_linf_hand_computed() -> None:
    # One layer, entries [G, P, C] = [0,0], [1,-1], [1.5,-1.5]: spread R = 1.5, D = (max(Wi-Wj) + R) / 2R.
    layer = np.array([[0, 0], [1, -1], [1.5, -1.5]], dtype=np.float32)
    expected = np.array([[0, 2.5 / 3, 1], [2.5 / 3, 0, 2 / 3], [1, 2 / 3, 0]])
    np.testing.assert_allclose(linf_minmax_distance([layer], device="cpu"), expected, rtol=1e-7)


def test_identical_layer_contributes_nothing() -> None:
    same = np.ones((3, 4, 4), dtype=np.float32)
    assert not linf_minmax_distance([same], device="cpu").any()


def test_l2_matches_numpy() -> None:
    layers = _models(n=4)
    flat = np.concatenate([layer.reshape(4, -1).astype(np.float64) for layer in layers], axis=1)
    expected = np.linalg.norm(flat[:, None] - flat[None], axis=2)
    np.testing.assert_allclose(l2_distance(layers, device="cpu"), expected, rtol=1e-10, atol=1e-9)


def test_l2_keeps_small_differences_of_large_weights() -> None:
    # fine-tuning moves weights by ~1e-4 of their size: float32 Gram cancellation would lose it
    rng = np.random.default_rng(1)
    base = (rng.standard_normal(4096) * 100).astype(np.float32)
    delta = (rng.standard_normal(4096) * 1e-2).astype(np.float32)
    layer = np.stack([base, base + delta])
    exact = float(np.linalg.norm((layer[0].astype(np.float64) - layer[1])))
    assert l2_distance([layer], device="cpu")[0, 1] == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize("fn", [linf_minmax_distance, rank_distance])
def test_chunked_equals_unchunked(fn) -> None:  # type: ignore[no-untyped-def]
    layers = _models(n=6, shape=(8, 5))
    whole = fn(layers, device="cpu", max_elements=1 << 30)
    tiny = fn(layers, device="cpu", max_elements=7)  # one pair (or one row) per block
    assert np.array_equal(whole, tiny)  # max and rank do not depend on the order of operations


def test_chunked_l2_equals_unchunked_to_float64_rounding() -> None:
    layers = _models(n=6, shape=(8, 5))
    whole = l2_distance(layers, device="cpu", max_elements=1 << 30)
    tiny = l2_distance(layers, device="cpu", max_elements=7)  # column chunks of one: sums reordered
    np.testing.assert_allclose(tiny, whole, rtol=1e-12)
    assert not np.array_equal(l2_distance(layers[:1], device="cpu"), whole)  # the other layers count


def test_rank_matches_numpy_matrix_rank() -> None:
    rng = np.random.default_rng(3)
    base = rng.standard_normal((24, 24)).astype(np.float32)
    ranks = [0, 1, 4, 9, 24]
    models = [base + (rng.standard_normal((24, r)) @ rng.standard_normal((r, 24))).astype(np.float32) for r in ranks]
    layer = np.stack(models)
    got = rank_distance([layer], device="cpu")
    for i in range(len(models)):
        for j in range(len(models)):
            expected = np.linalg.matrix_rank(layer[i] - layer[j]) if i != j else 0
            assert got[i, j] == expected, (i, j)
    assert got[0, 2] == 4 + 0 and got[1, 4] == 24


def test_rank_sums_layers_and_reshapes_conv_kernels() -> None:
    rng = np.random.default_rng(4)
    conv = rng.standard_normal((3, 4, 2, 3, 3)).astype(np.float32)  # (n, out, in, kh, kw)
    dense = rng.standard_normal((3, 5, 5)).astype(np.float32)
    got = rank_distance([conv.reshape(3, 4, -1), dense], device="cpu")
    assert got[0, 1] == np.linalg.matrix_rank(conv[0].reshape(4, -1) - conv[1].reshape(4, -1)) + 5


def test_bad_inputs_raise() -> None:
    with pytest.raises(BadInputError):
        l2_distance([], device="cpu")
    with pytest.raises(BadInputError):
        l2_distance([np.zeros((2, 3)), np.zeros((3, 3))], device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu_is_a_clear_error() -> None:
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(BadInputError, match="CUDA"):
        resolve_device("cuda")
