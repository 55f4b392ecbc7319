"""The relatedness test: its null is N(0, 1) and it finds relatives far past any distance threshold."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sketches.relatedness import ALPHA, Z_RELATED, relate, relatedness_matrix


def _model(rng: np.random.Generator, layers: int = 4, shape: tuple[int, ...] = (48, 32)) -> list[np.ndarray]:
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(layers)]


def test_null_is_standard_normal_for_independent_models() -> None:
    rng = np.random.default_rng(0)
    scores = np.array([relate(_model(rng), _model(rng)).score for _ in range(300)])
    assert abs(scores.mean()) < 0.2 and 0.7 < scores.std() < 1.2
    assert (scores > Z_RELATED).sum() == 0


def test_shared_column_structure_does_not_make_strangers_related() -> None:
    """Independent runs share input structure (filters, pixel statistics): it lifts G off the diagonal as
    much as on it, so the permutation null absorbs it."""
    rng = np.random.default_rng(1)
    scores = []
    for _ in range(100):
        col = 4.0 * rng.standard_normal(32)
        a = [rng.standard_normal((48, 32)) + col for _ in range(3)]
        b = [rng.standard_normal((48, 32)) + col for _ in range(3)]
        scores.append(relate(a, b).score)
    assert max(scores) < Z_RELATED


@pytest.mark.parametrize("drift", [0.1, 0.9, 3.0])
def test_relatives_drifted_far_test_related(drift: float) -> None:
    rng = np.random.default_rng(2)
    parent = _model(rng)
    child = [w + drift * rng.standard_normal(w.shape).astype(np.float32) for w in parent]
    result = relate(parent, child)
    assert result.related and result.p_value < ALPHA


def test_one_shared_layer_is_not_a_shared_ancestor() -> None:
    """Two models built on one frozen pre-trained layer share a part, not an ancestor: the median over
    layers ignores the one layer (a Stouffer sum would not)."""
    rng = np.random.default_rng(3)
    shared = rng.standard_normal((48, 32)).astype(np.float32)
    a = [shared, *_model(rng, 4)]
    b = [shared, *_model(rng, 4)]
    assert not relate(a, b).related


def test_matrix_matches_pairwise_and_is_symmetric() -> None:
    rng = np.random.default_rng(4)
    models = [_model(rng, 3) for _ in range(3)]
    models.append([w + 0.5 * rng.standard_normal(w.shape).astype(np.float32) for w in models[0]])
    stacked = [np.stack([m[layer] for m in models]) for layer in range(3)]
    score, p = relatedness_matrix(stacked)
    assert np.allclose(score, score.T) and np.isinf(np.diag(score)).all()
    assert score[0, 3] == pytest.approx(relate(models[0], models[3]).score)
    assert score[0, 3] > Z_RELATED and score[0, 1] < Z_RELATED and p[0, 3] < ALPHA


def test_layers_too_thin_or_constant_are_left_out() -> None:
    thin = [np.ones((4, 16), np.float32)]
    assert relate(thin, thin).layers == 0 and not relate(thin, thin).related
    flat = [np.zeros((16, 16), np.float32)]
    assert relate(flat, flat).layers == 0


@settings(max_examples=30, deadline=None)
@given(st.integers(8, 40), st.integers(1, 20), st.integers(0, 2**31 - 1))
def test_score_is_finite_and_symmetric_in_the_pair(rows: int, cols: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = _model(rng, 2, (rows, cols)), _model(rng, 2, (rows, cols))
    assert relate(a, b).score == pytest.approx(relate(b, a).score)
    assert np.isfinite(relate(a, b).score)
