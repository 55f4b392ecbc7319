"""The batched exact kernel: `measure_many` over the short lists of many arriving models gives, job by job,
what `measure` gives for that job alone (same regime, same distances), whatever the chunking, on the CPU
and (when there is one) on a GPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from errors import BadInputError
from indexer.incremental.exact import ModelView, PairMeasure, measure, measure_many
from sketches.layers import is_head

BLOCKS = 3
PROJ = ("q", "k", "v", "o")
SHAPE = (16, 24)


def _name(block: int, proj: str) -> str:
    return f"model.layers.{block}.self_attn.{proj}_proj.weight"


def _root(rng: np.random.Generator, *, shape: tuple[int, int] = SHAPE, vocab: int = 10) -> dict[str, np.ndarray]:
    arrays = {_name(b, p): rng.normal(0, 0.02, shape).astype(np.float32) for b in range(BLOCKS) for p in PROJ}
    arrays["lm_head.weight"] = rng.normal(0, 0.02, (vocab, shape[1])).astype(np.float32)
    return arrays


def _full_step(rng: np.random.Generator, parent: dict[str, np.ndarray], scale: float = 0.05) -> dict[str, np.ndarray]:
    """Full fine-tuning: every matrix moves by a small full-rank step."""
    return {n: (a + rng.normal(0, 0.02 * scale, a.shape)).astype(np.float32) for n, a in parent.items()}


def _lora_step(rng: np.random.Generator, parent: dict[str, np.ndarray], rank: int = 2) -> dict[str, np.ndarray]:
    """A merged LoRA on q and v: W + B @ A of rank `rank`, every other tensor untouched."""
    out = dict(parent)
    for name, a in parent.items():
        if "q_proj" in name or "v_proj" in name:
            b_, a_ = rng.normal(0, 0.02, (a.shape[0], rank)), rng.normal(0, 0.02, (rank, a.shape[1]))
            out[name] = (a + b_ @ a_).astype(np.float32)
    return out


def _view(repo_id: str, arrays: dict[str, np.ndarray], created: float) -> ModelView:
    kurtosis = {n: float(((a - a.mean()) ** 4).mean() / a.var() ** 2 - 3.0) for n, a in arrays.items()}
    norms = {n: float(np.linalg.norm(a)) for n, a in arrays.items()}
    return ModelView(repo_id, arrays, kurtosis, norms, created, tuple(_name(b, "o") for b in range(BLOCKS)))


def _zoo(seed: int = 0) -> list[ModelView]:
    """Two families (full fine-tuning; merged LoRA), an unrelated root, a relative whose head has another
    vocabulary, one missing a layer, and a wider family reusing the same tensor names."""
    rng = np.random.default_rng(seed)
    full = [_root(rng)]
    full += [_full_step(rng, full[0]) for _ in range(3)]
    full += [_full_step(rng, full[1]) for _ in range(2)]
    lora = [_root(rng)]
    lora += [_lora_step(rng, lora[0], rank=r) for r in (1, 2, 4)]
    lora += [_lora_step(rng, lora[2])]
    new_vocab = _full_step(rng, full[0]) | {"lm_head.weight": rng.normal(0, 0.02, (12, SHAPE[1])).astype(np.float32)}
    missing = {n: a for n, a in _full_step(rng, full[2]).items() if n != _name(1, "k")}
    wide = [_root(rng, shape=(20, 24))]
    wide.append(_full_step(rng, wide[0]))
    arrays = full + lora + [_root(rng), new_vocab, missing] + wide
    return [_view(f"org/m{i}", a, float(i)) for i, a in enumerate(arrays)]


def _jobs(views: list[ModelView]) -> list[tuple[ModelView, list[ModelView]]]:
    """Short lists of different lengths (0 to 8), mixing relatives, strangers and differing layer sets."""
    return [
        (views[4], [views[1], views[0], views[5], views[11]]),  # full-FT family + an unrelated root
        (views[9], [views[7], views[6], views[8], views[1]]),  # merged LoRA: low-rank pairs
        (views[12], [views[0], views[2]]),  # another head vocabulary: the head is not shared
        (views[13], [views[2], views[3], views[6], views[9], views[11], views[12], views[0], views[4]]),  # a layer short
        (views[15], [views[14]]),  # same tensor names, another shape
        (views[3], []),
        (views[10], [views[9], views[6]]),
    ]


def _same(got: PairMeasure, want: PairMeasure, *, rel: float) -> bool:
    exact = (got.other, got.low_rank, got.related) == (want.other, want.low_rank, want.related)
    fields = ("relative", "median_relative", "tier_distance", "ku_new", "ku_other", "score")
    return exact and all(math.isclose(getattr(got, f), getattr(want, f), rel_tol=rel, abs_tol=1e-12) for f in fields)


def _assert_same(got: list[list[PairMeasure]], want: list[list[PairMeasure]], *, rel: float = 1e-9) -> None:
    assert [len(g) for g in got] == [len(w) for w in want]
    for job, (g, w) in enumerate(zip(got, want, strict=True)):
        for a, b in zip(g, w, strict=True):
            assert _same(a, b, rel=rel), (job, a, b)


@pytest.fixture(scope="module")
def zoo() -> list[ModelView]:
    return _zoo()


def test_the_zoo_has_both_regimes_and_strangers(zoo: list[ModelView]) -> None:
    """The families are what their names say, or the equality tests below prove little."""
    full, lora, wide = measure(zoo[4], [zoo[1], zoo[11]], device="cpu"), measure(zoo[9], [zoo[7]], device="cpu"), \
        measure(zoo[15], [zoo[14]], device="cpu")
    assert full[0].related and not full[0].low_rank and not full[1].related
    assert lora[0].related and lora[0].low_rank
    assert wide[0].related


def test_measure_many_equals_measure_per_job(zoo: list[ModelView]) -> None:
    jobs = _jobs(zoo)
    _assert_same(measure_many(jobs, device="cpu"), [measure(new, others, device="cpu") for new, others in jobs])


def test_tiny_budget_chunks_pair_by_pair_and_changes_nothing(zoo: list[ModelView]) -> None:
    """max_bytes below one layer: every chunk one pair, every stack two models; the same numbers."""
    jobs = _jobs(zoo)
    _assert_same(measure_many(jobs, device="cpu", max_bytes=1), measure_many(jobs, device="cpu"))
    _assert_same(measure_many(jobs, device="cpu", max_bytes=40_000), measure_many(jobs, device="cpu"))


def test_a_job_alone_and_among_others_agree(zoo: list[ModelView]) -> None:
    """The per-job layer set (common to the new model and all its nominees) must not leak across jobs:
    job 3 lacks a layer the others have."""
    jobs = _jobs(zoo)
    together = measure_many(jobs, device="cpu")
    for i, job in enumerate(jobs):
        _assert_same([together[i]], measure_many([job], device="cpu"))


def test_strangers_skipped_keep_every_related_pair(zoo: list[ModelView]) -> None:
    """`strangers=False` (the index's call): related pairs bit for bit as before, whatever chunking;
    unrelated pairs keep their test and heads, with NaN distances (never differenced)."""
    jobs = _jobs(zoo)
    for budget in (40_000, 1 << 30):
        full, lean = measure_many(jobs, device="cpu", max_bytes=budget), \
            measure_many(jobs, device="cpu", max_bytes=budget, strangers=False)
        seen = {True: 0, False: 0}
        for a_job, b_job in zip(full, lean, strict=True):
            for a, b in zip(a_job, b_job, strict=True):
                seen[a.related] += 1
                if a.related:
                    assert a == b
                else:
                    assert (b.other, b.related, b.score, b.heads, b.identical) == (a.other, False, a.score, a.heads, False)
                    assert math.isnan(b.relative) and math.isnan(b.median_relative) and math.isnan(b.tier_distance)
        assert seen[True] >= 10 and seen[False] >= 3  # both kinds were compared


def test_layer_set_is_common_to_all_nominees(zoo: list[ModelView]) -> None:
    """A nominee without layers.1.k_proj removes that layer from every pair of its job (as `measure` always
    did), which changes the other pairs' distances."""
    with_short = measure(zoo[2], [zoo[0], zoo[13]], device="cpu")[0]
    without = measure(zoo[2], [zoo[0]], device="cpu")[0]
    assert with_short.relative != pytest.approx(without.relative, rel=1e-6)


def test_bad_budget_says_what_to_do(zoo: list[ModelView]) -> None:
    with pytest.raises(BadInputError, match="must be positive"):
        measure_many(_jobs(zoo), device="cpu", max_bytes=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_equals_cpu(zoo: list[ModelView]) -> None:
    """The same differences in float32 on both devices; norms in float64 and SVD ranks may round
    differently only in the last digits."""
    jobs = _jobs(zoo)
    _assert_same(measure_many(jobs, device="cuda"), measure_many(jobs, device="cpu"), rel=1e-6)
    _assert_same(measure_many(jobs, device="cuda", max_bytes=40_000), measure_many(jobs, device="cpu"), rel=1e-6)


def _median_relative(new: ModelView, other: ModelView, names: list[str]) -> float:
    ratios = [np.linalg.norm(new.arrays[n].astype(np.float64) - other.arrays[n]) /
              math.hypot(new.norms[n], other.norms[n]) for n in names]
    return float(np.median(ratios))


def test_each_pair_reads_its_own_layers_from_numpy(zoo: list[ModelView]) -> None:
    """An independent reference for the per-(pair, layer) slots: numpy, pair by pair, on the layers the
    job's new model shares (same shape) with all of its nominees."""
    jobs = _jobs(zoo)
    for (new, others), got in zip(jobs, measure_many(jobs, device="cpu", max_bytes=40_000), strict=True):
        names = sorted(n for n, a in new.arrays.items()  # heads only break ties (pair rule 3)
                       if not is_head(n) and all(np.shape(o.arrays.get(n)) == a.shape for o in others))
        for other, pair in zip(others, got, strict=True):
            assert pair.median_relative == pytest.approx(_median_relative(new, other, names), rel=1e-6)
