"""Per-layer statistics: the kurtosis must be scipy.stats.kurtosis with its defaults, exactly."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sketches.stats import excess_kurtosis, layer_stats, model_stats


@pytest.mark.parametrize("dist", ["normal", "student_t", "uniform", "laplace"])
def test_kurtosis_matches_scipy_defaults(dist: str) -> None:
    rng = np.random.default_rng(7)
    x = {
        "normal": lambda: rng.standard_normal((64, 48)),
        "student_t": lambda: rng.standard_t(3, (64, 48)),
        "uniform": lambda: rng.uniform(-1, 1, (64, 48)),
        "laplace": lambda: rng.laplace(size=(64, 48)),
    }[dist]().astype(np.float32)
    expected = scipy.stats.kurtosis(x.astype(np.float64).ravel())  # fisher=True, bias=True
    assert excess_kurtosis(x) == pytest.approx(expected, rel=1e-12)
    assert layer_stats("w", x).kurtosis == pytest.approx(expected, rel=1e-12)
    # scipy on the float32 array itself accumulates in float32: same value to ~1e-5
    assert excess_kurtosis(x) == pytest.approx(scipy.stats.kurtosis(x.ravel()), rel=1e-4)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.integers(2, 200), elements=st.floats(-1e3, 1e3, width=32)))
def test_kurtosis_matches_scipy_on_any_sample(x: np.ndarray) -> None:
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy warns on near-constant samples
        expected = scipy.stats.kurtosis(x.astype(np.float64))
    got = excess_kurtosis(x)
    if math.isnan(expected):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_constant_layer_has_nan_kurtosis_like_scipy() -> None:
    x = np.full((4, 4), 0.5, dtype=np.float32)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert math.isnan(scipy.stats.kurtosis(x.ravel()))
    assert math.isnan(excess_kurtosis(x))


def test_layer_stats_moments_and_norms() -> None:
    x = np.array([[3.0, -4.0], [0.0, 0.0]], dtype=np.float32)
    s = layer_stats("w", x)
    assert (s.numel, s.l2, s.max_abs, s.mean) == (4, 5.0, 4.0, -0.25)
    assert s.std == pytest.approx(np.std(x.astype(np.float64)))
    assert s.finite


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_layer_is_flagged(bad: float) -> None:
    x = np.ones((3, 3), dtype=np.float32)
    x[1, 2] = bad
    stats = model_stats({"a": np.ones((2, 2), np.float32), "b": x})
    assert not stats.finite
    assert [layer.finite for layer in stats.layers] == [True, False]


def test_model_stats_sorted_and_sums() -> None:
    rng = np.random.default_rng(0)
    arrays_ = {"z": rng.standard_t(4, (8, 8)), "a": rng.standard_normal((8, 8))}
    stats = model_stats(arrays_)
    assert [layer.name for layer in stats.layers] == ["a", "z"]
    expected = sum(scipy.stats.kurtosis(v.ravel()) for v in arrays_.values())
    assert stats.kurtosis_sum(["z", "a"]) == pytest.approx(expected)
    assert stats.l2_norm(["a", "z"]) == pytest.approx(math.sqrt(sum((v**2).sum() for v in arrays_.values())))
