"""Read planning: budget, determinism per family, nesting across dtypes, coalescing."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sketches.plan import MIN_BLOCK_BYTES, ReadPlan, coalesce, plan_reads, spread_order
from sketches.safetensors import DTYPE_SIZES, TensorInfo


def _llama(layers: int, hidden: int, *, dtype: str = "BF16", inter: int | None = None) -> dict[str, TensorInfo]:
    """Tensor infos laid out back to back in state_dict order, like a real single-file checkpoint."""
    inter = inter or hidden * 2
    shapes = [("model.embed_tokens.weight", (1000, hidden))]
    for b in range(layers):
        p = f"model.layers.{b}."
        shapes += [(p + f"self_attn.{x}_proj.weight", (hidden, hidden)) for x in "qkvo"]
        shapes += [(p + "mlp.up_proj.weight", (inter, hidden)), (p + "input_layernorm.weight", (hidden,))]
    shapes.append(("lm_head.weight", (1000, hidden)))
    out, at = {}, 8 + 1000
    for name, shape in shapes:
        n = math.prod(shape) * DTYPE_SIZES[dtype]
        out[name] = TensorInfo(name, dtype, shape, at, at + n)
        at += n
    return out


def _where(tensors: dict[str, TensorInfo]) -> dict[str, tuple[str, TensorInfo]]:
    return {n: ("model.safetensors", t) for n, t in tensors.items()}


def test_small_model_is_read_whole_without_heads() -> None:
    tensors = _llama(2, 32)
    plan = plan_reads(tensors, family="f", budget=1 << 30)
    names = {b.tensor for b in plan.blocks}
    assert all(b.whole for b in plan.blocks)
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" not in names
    assert "model.layers.0.mlp.up_proj.weight" in names  # every body matrix when they all fit
    assert not any(n.endswith("layernorm.weight") for n in names)


def test_large_model_reads_attention_rows_within_budget() -> None:
    tensors = _llama(32, 4096)
    budget = 64 * 1024 * 1024
    plan = plan_reads(tensors, family="f", budget=budget)
    assert plan.nbytes == budget  # 128 matrices x 64 rows x 8 KiB
    assert len(plan.blocks) == 128 and {b.rows for b in plan.blocks} == {(0, 64)}
    assert all("self_attn" in b.tensor for b in plan.blocks)


def test_small_budget_keeps_min_blocks_on_spread_layers() -> None:
    tensors = _llama(32, 4096)
    plan = plan_reads(tensors, family="f", budget=16 * MIN_BLOCK_BYTES)
    assert plan.nbytes <= 16 * MIN_BLOCK_BYTES
    assert all(b.nbytes >= MIN_BLOCK_BYTES for b in plan.blocks)
    layers = sorted({int(b.tensor.split(".")[2]) for b in plan.blocks})
    assert layers == [0, 7, 15, 31]  # first, last, middle, first quarter: spread over depth


def test_plan_depends_on_shapes_not_offsets_and_nests_across_dtypes() -> None:
    bf16 = _llama(8, 512)
    shifted = {n: TensorInfo(n, t.dtype, t.shape, t.begin + 4096, t.end + 4096) for n, t in bf16.items()}
    budget = 20 * MIN_BLOCK_BYTES
    a = plan_reads(bf16, family="f", budget=budget)
    assert a.blocks == plan_reads(shifted, family="f", budget=budget).blocks
    f32 = plan_reads(_llama(8, 512, dtype="F32"), family="f", budget=budget)
    rows_a = {b.tensor: b.rows for b in a.blocks}
    assert f32.nbytes <= budget and f32.blocks
    for block in f32.blocks:  # a subset of the tensors, each a row-prefix of the BF16 block
        assert block.rows[0] == rows_a[block.tensor][0] == 0 and block.rows[1] <= rows_a[block.tensor][1]


def test_coalesce_merges_neighbours_but_never_past_the_budget() -> None:
    tensors = _llama(2, 32)
    plan = plan_reads(tensors, family="f", budget=1 << 30)
    ranges = coalesce(plan, _where(tensors))
    assert len(ranges) == 1  # gaps are one embedding and a few norm vectors: one request
    assert sum(p.nbytes for r in ranges for p in r.pieces) == plan.nbytes
    tight = coalesce(plan, _where(tensors), limit=plan.nbytes)
    assert sum(r.nbytes for r in tight) == plan.nbytes  # no gap bytes allowed: only touching blocks merge
    assert len(tight) > 1


def _cover(plan: ReadPlan, tensors: dict[str, TensorInfo], gap: int) -> None:
    ranges = coalesce(plan, _where(tensors), gap=gap)
    assert sum(r.nbytes for r in ranges) <= plan.budget
    for r in ranges:
        for p in r.pieces:
            info = tensors[p.tensor]
            assert r.start + p.offset == info.begin + p.rows[0] * info.row_bytes
            assert p.offset + p.nbytes <= r.nbytes


@settings(max_examples=60, deadline=None)
@given(layers=st.integers(1, 12), hidden=st.sampled_from([16, 48, 128, 256]),
       budget=st.integers(MIN_BLOCK_BYTES // 4, 4 << 20), gap=st.integers(0, 1 << 20),
       dtype=st.sampled_from(["BF16", "F32", "F16"]))
def test_plan_invariants(layers: int, hidden: int, budget: int, gap: int, dtype: str) -> None:
    tensors = _llama(layers, hidden, dtype=dtype)
    try:
        plan = plan_reads(tensors, family="f", budget=budget)
    except Exception as exc:  # only the documented refusal: not even one row fits
        assert "cannot hold one row" in str(exc)
        return
    assert 0 < plan.nbytes <= budget
    assert [b.tensor for b in plan.blocks] == sorted(b.tensor for b in plan.blocks)
    assert plan == plan_reads(tensors, family="f", budget=budget)
    _cover(plan, tensors, gap)


@given(st.integers(0, 300))
def test_spread_order_is_a_permutation(n: int) -> None:
    order = spread_order(n)
    assert sorted(order) == list(range(n))


def test_budget_must_be_positive() -> None:
    with pytest.raises(Exception, match="positive"):
        plan_reads(_llama(1, 16), family="f", budget=0)
