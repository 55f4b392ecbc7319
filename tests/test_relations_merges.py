"""indexer.relations.merges.fit: linear / TIES-like / DARE-like merges are found with their parents and
weights; fine-tunes, quantized copies and duplicates are not merges."""

from __future__ import annotations

import numpy as np
import pytest

from indexer.relations.merges import fit


def family(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    base = {f"l{i}": rng.standard_t(4, (48, 48)).astype(np.float32) for i in range(3)}

    def tune(src: dict[str, np.ndarray], step: float) -> dict[str, np.ndarray]:
        return {n: a + step * rng.standard_normal(a.shape).astype(np.float32) for n, a in src.items()}

    return {"base": base, "a": tune(base, 0.2), "b": tune(base, 0.2), "c": tune(base, 0.2)}


def combine(models: dict[str, dict[str, np.ndarray]], weights: dict[str, float]) -> dict[str, np.ndarray]:
    return {n: sum(w * models[m][n] for m, w in weights.items()) for n in models["base"]}


def test_a_linear_merge_is_found_with_its_weights() -> None:
    m = family()
    got = fit(combine(m, {"a": 0.7, "b": 0.3}), m)
    assert got is not None and got.is_merge and got.ratio < 0.01
    assert [p for p, _ in got.parents] == ["a", "b"] and got.parents[0][1] == pytest.approx(0.7, abs=0.02)


@pytest.mark.parametrize("kind", ["ties", "dare"])
def test_masked_task_vector_merges_over_a_base_are_found(kind: str) -> None:
    m = family(1)
    rng = np.random.default_rng(2)
    out = {}
    for n, base in m["base"].items():
        delta = np.zeros_like(base)
        for name, w in (("a", 0.5), ("b", 0.5)):
            tau = m[name][n] - base
            if kind == "ties":  # keep the largest half of each task vector
                mask = np.abs(tau) >= np.quantile(np.abs(tau), 0.5)
                delta += w * tau * mask
            else:  # drop 40 % at random, rescale the rest
                mask = rng.random(tau.shape) < 0.6
                delta += w * tau * mask / 0.6
        out[n] = base + delta
    got = fit(out, m)
    assert got is not None and got.is_merge, got
    assert {p for p, _ in got.parents} == {"a", "b"}


def test_fine_tunes_quantized_copies_and_duplicates_are_not_merges() -> None:
    m = family(3)
    rng = np.random.default_rng(4)
    child = {n: a + 0.1 * rng.standard_normal(a.shape).astype(np.float32) for n, a in m["a"].items()}
    noisy = {n: a + 0.01 * np.abs(a).max() * rng.standard_normal(a.shape).astype(np.float32) for n, a in m["a"].items()}
    for x in (child, noisy, dict(m["a"])):
        got = fit(x, {k: v for k, v in m.items()})
        assert got is not None and not got.is_merge and got.single == "a", got
    assert fit(child, {"a": m["a"]}) is None  # one candidate: nothing to combine
