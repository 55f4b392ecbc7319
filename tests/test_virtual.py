"""Virtual families (issue 14): per-block reproducibility, and updates shaped like real fine-tuning."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from errors import BadInputError
from indexer.hub_emulator import virtual
from indexer.hub_emulator.virtual import (
    BLOCK_ELEMS,
    LAYOUTS,
    STD,
    Lineage,
    Step,
    VirtualRepo,
    bf16_to_f32,
    update_block,
)

L7 = LAYOUTS["llama-2-7b"]
SHAPES = dict(L7.tensors())
ROOT = Lineage(L7, 11)


def _rows(lineage: Lineage, tensor: str, rows: int) -> np.ndarray:
    """The first `rows` rows of a tensor, generated block by block (float32)."""
    cols = SHAPES[tensor][1]
    blocks = -(-rows * cols // BLOCK_ELEMS)
    flat = np.concatenate([bf16_to_f32(virtual.block_values(lineage, tensor, SHAPES[tensor], b, BLOCK_ELEMS))
                           for b in range(blocks)])
    return flat[:rows * cols].reshape(rows, cols)


def _update(step: Step, tensor: str, rows: int) -> np.ndarray:
    """A step's update of the first `rows` rows, before BF16 rounding (float64)."""
    cols = SHAPES[tensor][1]
    blocks = -(-rows * cols // BLOCK_ELEMS)
    flat = np.concatenate([update_block(step, tensor, SHAPES[tensor], b, BLOCK_ELEMS) for b in range(blocks)])
    return flat[:rows * cols].reshape(rows, cols).astype(np.float64)


def _top_share(matrix: np.ndarray, k: int) -> float:
    s = np.linalg.svd(matrix, compute_uv=False)
    return float((s[:k] ** 2).sum() / (s**2).sum())


_SHARD = VirtualRepo("v/c", ROOT.child(5, 0.01, "full").child(6, 0.03, "lora-all"), created_at="2024-01-01T00:00:00.000Z",
                     parent="v/p").files["model-00001-of-00002.safetensors"]
_ENTRY = next(e for e in _SHARD.entries if e.name == "model.layers.3.mlp.down_proj.weight")  # 4096 x 11008


@settings(max_examples=5, deadline=None)
@given(block=st.integers(0, _ENTRY.nbytes // 2 // BLOCK_ELEMS - 1))
def test_a_block_generated_alone_equals_it_inside_a_long_read(block: int) -> None:
    """Rows of 11,008 values straddle block edges: U rows, V and the scales come from their own streams."""
    virtual.set_block_cache(4)  # nothing left over from other reads
    start = _ENTRY.start + 2 * BLOCK_ELEMS * max(0, block - 1)
    long = _SHARD.read(start, 2 * BLOCK_ELEMS * 3)  # the block, with neighbours on both sides
    virtual.set_block_cache(1024)
    alone = virtual._block(_SHARD.lineage, _ENTRY.name, _ENTRY.shape, block, BLOCK_ELEMS)  # no cache at all
    at = 2 * BLOCK_ELEMS * (block - max(0, block - 1))
    assert np.frombuffer(long[at:at + 2 * BLOCK_ELEMS], dtype="<u2").tobytes() == alone.astype("<u2").tobytes()


def test_generated_values_are_pinned_across_speedups() -> None:
    """The emulator's generation was sped up (V scaled once per tensor, BLAS on one thread in
    emulator_process); a child's bytes must stay the ones every benchmark table was measured on. The
    digest was taken with the code before that change: one block of two matrices after each step kind."""
    lineage, digest = ROOT, hashlib.sha256()
    for i, kind in enumerate(virtual.STEP_KINDS):
        lineage = lineage.child(100 + i, 4e-4 if kind == "subres" else 0.02, kind)
        for name in ("model.layers.1.self_attn.v_proj.weight", "model.layers.2.mlp.down_proj.weight"):
            digest.update(virtual._block(lineage, name, SHAPES[name], 3, BLOCK_ELEMS).astype("<u2").tobytes())
    assert digest.hexdigest() == "57ee50ecf6b1f1f878e8ede05f85554469aa0195786f3f70594feab7103064ce"


def test_neighbouring_blocks_draw_independent_values() -> None:
    """Regression (update model 1): the block number sat in Philox's lowest counter word, so block b + 1
    was block b's draws shifted by one counter step, in every tensor of every model."""
    name = "model.layers.0.self_attn.q_proj.weight"
    a, b = (bf16_to_f32(virtual.block_values(ROOT, name, SHAPES[name], i, BLOCK_ELEMS)) for i in (0, 1))
    matches = [float(np.mean(b[:1000] == a[shift:shift + 1000])) for shift in range(64)]
    assert max(matches) < 0.1  # BF16 collisions only (update model 1: 1.0 at one shift)


def test_full_fine_tune_is_low_rank_dominated_and_scaled_per_module() -> None:
    step = Step(7, 0.01, "full")
    q, o = (_update(step, f"model.layers.4.self_attn.{m}_proj.weight", 256) for m in "qo")
    assert _top_share(o, 32) > 0.9  # rank 32 + 3 % full-rank energy
    noise = np.random.default_rng(0).standard_normal(o.shape)
    assert _top_share(noise, 32) < 0.25  # what an i.i.d. update (update model 1) would show
    s = np.linalg.svd(o, compute_uv=False)
    assert s[0] / s[15] > 4  # a decaying spectrum (s_k ~ k^-1.3: 36x in singular values, less with noise)
    ratios = [np.linalg.norm(_update(step, f"model.layers.{b}.self_attn.o_proj.weight", 16))
              / np.linalg.norm(_update(step, f"model.layers.{b}.self_attn.q_proj.weight", 16)) for b in range(8)]
    assert np.median(ratios) > 1.8  # o moves 2.8x as much as q at equal factors (MODULE_SCALE)
    sizes = [np.sqrt(np.mean(_update(step, f"model.layers.{b}.self_attn.o_proj.weight", 16) ** 2)) for b in range(8)]
    assert np.std(np.log(sizes)) > 0.1  # per-layer scale differences
    assert 0.2 < np.sqrt(np.mean(q**2)) / (STD * 0.01) < 3.0


def test_merged_lora_touches_only_its_targets_with_a_pure_low_rank_update() -> None:
    child = ROOT.child(8, 0.02, "lora-qv")
    k = "model.layers.2.self_attn.k_proj.weight"
    assert np.array_equal(_rows(ROOT, k, 16), _rows(child, k, 16))  # frozen: bit-identical
    v = _update(Step(8, 0.02, "lora-qv"), "model.layers.2.self_attn.v_proj.weight", 256)
    s = np.linalg.svd(v, compute_uv=False)
    assert s[16] < 1e-4 * s[0]  # rank 16, nothing beyond


def test_sub_resolution_step_leaves_most_weights_bit_identical() -> None:
    name = "model.layers.5.mlp.down_proj.weight"
    parent, child = _rows(ROOT, name, 32), _rows(ROOT.child(9, 4e-4, "subres"), name, 32)
    same = float(np.mean(parent == child))
    assert 0.8 < same < 1.0  # below half a BF16 ulp for most weights, yet not a copy
    full = _rows(ROOT.child(9, 3e-2, "continued"), name, 32)
    assert np.mean(parent == full) < 0.3


def test_token_names_the_update_model_and_kind() -> None:
    a = ROOT.child(3, 0.1)
    assert a == Lineage(L7, 11, ((3, 0.1),))  # the old (seed, delta) steps still mean full fine-tuning
    assert a.token() != ROOT.child(3, 0.1, "subres").token()
    assert a.token() == Lineage(L7, 11, (Step(3, 0.1, "full"),)).token()
    with pytest.raises(BadInputError, match="lora-qv"):
        ROOT.child(3, 0.1, "adapter")  # type: ignore[arg-type]
