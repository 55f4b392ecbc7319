"""Read planning: budget, determinism per family, nesting across dtypes, coalescing."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from errors import UnsupportedModelError
from sketches.plan import (
    MIN_BLOCK_BYTES,
    PLAN_V2,
    PLAN_V3,
    PlanSpec,
    ReadPlan,
    coalesce,
    plan_reads,
    spread_order,
)
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


def test_large_model_reads_value_rows_within_budget() -> None:
    tensors = _llama(32, 4096)
    budget = 16 * 1024 * 1024
    plan = plan_reads(tensors, family="f", budget=budget)
    assert plan.nbytes == budget  # 32 value matrices x 64 rows x 8 KiB
    assert len(plan.blocks) == 32 and {b.rows for b in plan.blocks} == {(0, 64)}
    assert all(b.tensor.endswith("v_proj.weight") for b in plan.blocks)


def test_plan_v2_reads_attention_rows_within_budget() -> None:
    tensors = _llama(32, 4096)
    budget = 64 * 1024 * 1024
    plan = plan_reads(tensors, family="f", budget=budget, spec=PLAN_V2)
    assert plan.nbytes == budget  # 128 matrices x 64 rows x 8 KiB
    assert len(plan.blocks) == 128 and {b.rows for b in plan.blocks} == {(0, 64)}
    assert all("self_attn" in b.tensor for b in plan.blocks)


@pytest.mark.parametrize(("spec", "layers"), [(PLAN_V2, [0, 7, 15, 31]), (PLAN_V3, [0, 31])])
def test_small_budget_keeps_min_blocks_on_spread_layers(spec: PlanSpec, layers: list[int]) -> None:
    tensors = _llama(32, 4096)
    plan = plan_reads(tensors, family="f", budget=16 * MIN_BLOCK_BYTES, spec=spec)
    assert plan.nbytes <= 16 * MIN_BLOCK_BYTES
    assert all(b.nbytes >= 2 * spec.min_block_elements for b in plan.blocks)
    # first, last, middle, first quarter: spread over depth
    assert sorted({int(b.tensor.split(".")[2]) for b in plan.blocks}) == layers


def test_plan_depends_on_shapes_not_offsets_nor_dtypes() -> None:
    bf16 = _llama(8, 512)
    shifted = {n: TensorInfo(n, t.dtype, t.shape, t.begin + 4096, t.end + 4096) for n, t in bf16.items()}
    budget = 20 * MIN_BLOCK_BYTES
    a = plan_reads(bf16, family="f", budget=budget)
    assert a.blocks == plan_reads(shifted, family="f", budget=budget).blocks
    f32 = plan_reads(_llama(8, 512, dtype="F32"), family="f", budget=budget)
    # the budget counts BF16 bytes: an F32 relative reads the same rows at twice the bytes (plan v3)
    assert [(b.tensor, b.rows) for b in f32.blocks] == [(b.tensor, b.rows) for b in a.blocks]
    assert f32.nbytes == 2 * a.nbytes <= 2 * budget


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
    assert sum(r.nbytes for r in ranges) <= max(plan.budget, plan.nbytes)
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
    except UnsupportedModelError as exc:  # only the documented refusal: not even one row fits
        assert "cannot hold one row" in str(exc)
        return
    assert 0 < plan.nbytes <= budget * DTYPE_SIZES[dtype] // 2  # the budget counts BF16 bytes
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


# -- issue 14: plans in elements, identical across a family, what fits of an oversized model --------


@pytest.mark.parametrize("budget", [1 << 20, 4 << 20, 16 << 20, 64 << 20])
def test_plan_reads_the_same_elements_for_bf16_f16_and_f32_relatives(budget: int) -> None:
    plans = {d: plan_reads(_llama(32, 4096, dtype=d, inter=11008), family="f", budget=budget)
             for d in ("BF16", "F16", "F32")}
    blocks = {d: [(b.tensor, b.rows) for b in p.blocks] for d, p in plans.items()}
    assert blocks["BF16"] == blocks["F16"] == blocks["F32"]  # one to one, whatever the dtype
    assert plans["BF16"].nbytes <= budget and plans["F32"].nbytes == 2 * plans["BF16"].nbytes


def test_plan_is_identical_across_a_virtual_family() -> None:
    """Members of a family (a root, a merged LoRA, a sub-resolution grandchild) read the same blocks: the
    headers the generator serves hold the same shapes, and offsets do not enter the plan."""
    from indexer.hub_emulator.virtual import LAYOUTS, Lineage, VirtualRepo
    from sketches.safetensors import CallableSource, read_header

    root = Lineage(LAYOUTS["llama-2-7b"], 1)
    members = [root, root.child(2, 0.01, "lora-qv"), root.child(2, 0.01, "lora-qv").child(3, 4e-4, "subres")]
    plans = []
    for i, lineage in enumerate(members):
        files = VirtualRepo(f"v/m{i}", lineage, created_at="2024-01-01T00:00:00.000Z", parent=None).files
        tensors: dict[str, TensorInfo] = {}
        for name, blob in files.items():
            if name.endswith(".safetensors"):
                header = read_header(CallableSource(name, blob.size, lambda s, e, b=blob: b.read(s, e - s)))
                tensors |= {t.name: t for t in header.tensors}
        plans.append(plan_reads(tensors, family="llama", budget=16 << 20))
    assert plans[0].blocks == plans[1].blocks == plans[2].blocks
    assert 0 < plans[0].nbytes <= 16 << 20 and plans[0].fraction < 0.002


def test_oversized_model_is_read_on_what_fits_with_its_fraction() -> None:
    """A budget below the smallest block reads the rows of the first planned tensor that fit, never fails."""
    tensors = _llama(4, 8192)
    plan = plan_reads(tensors, family="f", budget=48 * 1024)  # 3 rows of 8,192 BF16 values, under 64 KiB
    assert len(plan.blocks) == 1 and plan.blocks[0].rows == (0, 3) and plan.nbytes == 3 * 8192 * 2
    assert plan.fraction == plan.nbytes / sum(t.nbytes for t in tensors.values())
    wide = _llama(2, 8192, inter=64) | {"model.layers.0.mlp.down_proj.weight": TensorInfo(
        "model.layers.0.mlp.down_proj.weight", "BF16", (8192, 64), 0, 8192 * 64 * 2)}
    small = plan_reads(wide, family="f", budget=8192)  # no value row (16 KiB) fits: a narrower body matrix
    assert [(b.tensor, b.rows) for b in small.blocks] == [("model.layers.0.mlp.down_proj.weight", (0, 64))]
    with pytest.raises(UnsupportedModelError, match="cannot hold one row"):  # not one row of any body matrix
        plan_reads(tensors, family="f", budget=8192)
