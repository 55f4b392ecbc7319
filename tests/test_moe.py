"""Mixture-of-experts layouts (sketches.experts) and mergekit-moe merges, batch and incremental.

mergekit-moe writes a Mixtral whose attention, norms and embeddings are its base's and whose every expert is
a copy of a dense model's MLP. Before, such a MoE was a family of its own (its body shares a third of a
dense model's values by name), never compared with the models it was made of."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from indexer.crawl import add_local
from indexer.lineage.methods import Options
from indexer.lineage.recover import recover
from indexer.zoo.relations import mergekit_moe, word_tokenizer
from sketches.experts import expert_alias, expert_views, is_router, mixtral_name
from sketches.layers import canonical_tensors, core_overlap, family_key
from sketches.safetensors import RepoWeights, TensorInfo
from store.tables import read_records

torch = pytest.importorskip("torch")
pytest.importorskip("mergekit")

LLAMA = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
from model_support import perturb_matrices


def _dense(root: Path) -> None:
    """o/base (random init, with a tokenizer for mergekit-moe) and o/a, o/b: every matrix moved by 0.1 of its
    std (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**LLAMA)).save_pretrained(root / "o/base")
    for name, seed in (("o/a", 1), ("o/b", 2)):
        perturb_matrices(LlamaForCausalLM.from_pretrained(root / "o/base"), 0.1, seed).save_pretrained(root / name)
    word_tokenizer(root / "o/base")


def _moe(root: Path, name: str, dtype: str) -> None:
    """mergekit-moe (random routers) of o/a and o/b over o/base, written by mergekit as transformers 5 does:
    fused (E, 2I, H) gate_up and (E, H, I) down tensors."""
    mergekit_moe(root / name, root / "o/base", (root / "o/a", root / "o/b"), dtype=dtype)


def _legacy(root: Path, source: str, name: str) -> None:
    """A re-save in transformers 4's layout (block_sparse_moe.experts.E.w1/w2/w3, one matrix per expert):
    transformers' own reverse of its Mixtral weight conversion, the one `save_original_format` applies."""
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(root / source)
    model._weight_conversions = None  # loaded from a fused file: no conversion recorded, so take the default's reverse
    model.save_pretrained(root / name)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("moe")
    _dense(root)
    _moe(root, "o/moe", "float32")
    _moe(root, "o/moe-bf16", "bfloat16")  # from F32 sources: each expert is its source rounded
    _legacy(root, "o/moe", "o/moe-legacy")
    order = ("o/base", "o/a", "o/b", "o/moe", "o/moe-bf16", "o/moe-legacy")
    (root / "hub.json").write_text(json.dumps({"version": 1, "repos": {
        r: {"createdAt": f"2024-01-0{i + 1}T00:00:00.000Z"} for i, r in enumerate(order)}}))
    return root


def _infos(folder: Path) -> dict[str, TensorInfo]:
    with RepoWeights(str(folder), ("model.safetensors",)) as w:
        return w.tensors()


def _arrays(folder: Path) -> dict[str, np.ndarray]:
    with RepoWeights(str(folder), ("model.safetensors",)) as w:
        return {n: np.asarray(w.read(raw)) for n, raw in canonical_tensors(w.tensors()).items()}


def test_both_layouts_read_as_one_matrix_per_expert_under_one_name(hub: Path) -> None:
    """The fused file (mergekit, transformers 5) and transformers' legacy re-save of it: the same names,
    shapes and values after normalising, each fused expert view a contiguous range of the file."""
    fused, legacy = _arrays(hub / "o/moe"), _arrays(hub / "o/moe-legacy")
    assert "layers.0.mlp.experts.1.gate_proj.weight" in fused and "layers.1.mlp.gate.weight" in fused
    assert not any(n.endswith(("gate_up_proj", "experts.down_proj")) for n in fused)
    assert fused.keys() == legacy.keys()
    assert all(np.array_equal(fused[n], legacy[n]) for n in fused)
    infos = _infos(hub / "o/moe")
    assert infos["model.layers.0.mlp.experts.1.up_proj.weight"].shape == (128, 64)
    assert infos["model.layers.0.mlp.experts.1.down_proj.weight"].shape == (64, 128)


def test_each_expert_is_its_source_models_mlp(hub: Path) -> None:
    moe, a, b = _arrays(hub / "o/moe"), _arrays(hub / "o/a"), _arrays(hub / "o/b")
    for layer in (0, 1):
        for part in ("gate_proj", "up_proj", "down_proj"):
            dense = f"layers.{layer}.mlp.{part}.weight"
            assert np.array_equal(moe[f"layers.{layer}.mlp.experts.0.{part}.weight"], a[dense])
            assert np.array_equal(moe[f"layers.{layer}.mlp.experts.1.{part}.weight"], b[dense])


def test_a_moe_is_in_its_dense_relatives_family(hub: Path) -> None:
    dense = {n: tuple(i.shape) for n, i in _infos(hub / "o/base").items()}
    moe = {n: tuple(i.shape) for n, i in _infos(hub / "o/moe").items()}
    assert family_key(dense) != family_key(moe)
    assert core_overlap(dense, moe) == core_overlap(moe, dense) == 1.0
    # by name alone (the rule before experts were aliased) the MoE held a fraction of the dense body
    renamed = {n.replace(".experts.", ".moe_experts."): s for n, s in moe.items()}
    assert core_overlap(dense, renamed) < 0.75


def test_names() -> None:
    assert mixtral_name("model.layers.3.block_sparse_moe.experts.7.w3.weight") == "model.layers.3.mlp.experts.7.up_proj.weight"
    assert mixtral_name("model.layers.3.block_sparse_moe.gate.weight") == "model.layers.3.mlp.gate.weight"
    assert expert_alias("layers.3.mlp.experts.7.down_proj.weight") == "layers.3.mlp.down_proj.weight"
    assert expert_alias("layers.3.mlp.shared_expert.gate_proj.weight") == "layers.3.mlp.gate_proj.weight"
    assert expert_alias("layers.3.mlp.down_proj.weight") is None
    assert is_router("layers.3.mlp.gate.weight") and not is_router("layers.3.mlp.gate_proj.weight")


def test_other_fused_orientations_stay_as_stored() -> None:
    """GPT-OSS / Llama 4 fuse (E, H, 2I) with gate and up interleaved by column: no row block is one
    expert's matrix, so nothing is split (a 3-D tensor the plan does not read)."""
    def info(name: str, shape: tuple[int, ...]) -> tuple[str, TensorInfo]:
        return "f", TensorInfo(name, "F32", shape, 0, 4 * int(np.prod(shape)))

    where = {"m.layers.0.mlp.experts.gate_up_proj": info("m.layers.0.mlp.experts.gate_up_proj", (4, 64, 256)),
             "m.layers.0.mlp.experts.down_proj": info("m.layers.0.mlp.experts.down_proj", (4, 128, 64))}
    assert expert_views(where) == where


def _row(forest, repo: str) -> tuple[str, str, frozenset[str]]:  # type: ignore[no-untyped-def]
    e = next(x for x in forest.rows if x.repo_id == repo)
    return e.parent, e.relation, frozenset(p for p, _ in e.parents)


def test_mergekit_moe_is_a_merge_of_its_base_and_expert_sources_batch_and_incremental(hub: Path, tmp_path: Path) -> None:
    """Batch: each MoE is a merge of the base (its attention) and the two experts' sources; the BF16 one
    too (its experts are the F32 sources rounded; its F32 twin o/moe, a known merge, holds them all too,
    so the models that are no merges are asked first). The legacy re-save of o/moe is bit-identical to it:
    a `duplicate` leaf under it, never fitted as a merge (issue 11: a re-upload is a duplicate of the
    earliest copy). The incremental index (`index add`) agrees per model."""
    order = ("o/base", "o/a", "o/b", "o/moe", "o/moe-bf16", "o/moe-legacy")
    batch = recover(hub, Options(device="cpu"))
    assert not batch.failures()
    sources = frozenset({"o/base", "o/a", "o/b"})
    for moe in ("o/moe", "o/moe-bf16"):
        assert _row(batch, moe) == ("o/base", "merge", sources), moe
    assert _row(batch, "o/moe-legacy") == ("o/moe", "duplicate", frozenset({"o/moe"}))
    add_local(tmp_path / "home", [hub / r for r in order], budget=64 << 20, device="cpu", progress=False)
    edges = {e.repo_id: e for e in read_records(tmp_path / "home", "edges")}  # type: ignore[union-attr]
    for repo in order:
        e = edges[repo]
        assert _row(batch, repo) == (e.parent, e.relation, frozenset(p for p, _ in e.parents)), repo  # type: ignore[attr-defined]


def test_a_bf16_moe_of_f32_sources_is_their_merge(tmp_path: Path, hub: Path) -> None:
    """Without its F32 twin in the folder, the BF16 MoE's experts are found as its sources rounded."""
    import shutil

    root = tmp_path / "hub"
    for repo in ("o/base", "o/a", "o/b", "o/moe-bf16"):
        shutil.copytree(hub / repo, root / repo)
    order = ("o/base", "o/a", "o/b", "o/moe-bf16")
    (root / "hub.json").write_text(json.dumps({"version": 1, "repos": {
        r: {"createdAt": f"2024-01-0{i + 1}T00:00:00.000Z"} for i, r in enumerate(order)}}))
    batch = recover(root, Options(device="cpu"))
    assert _row(batch, "o/moe-bf16") == ("o/base", "merge", frozenset({"o/base", "o/a", "o/b"}))


def _virtual(moe: bool) -> dict[str, TensorInfo]:
    """Mistral-7B's or Mixtral-8x7B's (transformers 5, fused) BF16 header, canonical names -> views."""
    where: dict[str, tuple[str, TensorInfo]] = {}
    at = 0

    def add(name: str, shape: tuple[int, ...]) -> None:
        nonlocal at
        size = 2 * int(np.prod(shape))
        where[name] = ("f", TensorInfo(name, "BF16", shape, at, at + size))
        at += size

    add("model.embed_tokens.weight", (32000, 4096))
    add("lm_head.weight", (32000, 4096))
    for layer in range(32):
        p = f"model.layers.{layer}."
        for m, shape in (("q", (4096, 4096)), ("k", (1024, 4096)), ("v", (1024, 4096)), ("o", (4096, 4096))):
            add(f"{p}self_attn.{m}_proj.weight", shape)
        if moe:
            add(p + "mlp.experts.gate_up_proj", (8, 2 * 14336, 4096))
            add(p + "mlp.experts.down_proj", (8, 4096, 14336))
            add(p + "mlp.gate.weight", (8, 4096))
        else:
            for m, shape in (("gate", (14336, 4096)), ("up", (14336, 4096)), ("down", (4096, 14336))):
                add(f"{p}mlp.{m}_proj.weight", shape)
    views = expert_views(where)
    return {n: views[raw][1] for n, raw in canonical_tensors({n: i for n, (_, i) in views.items()}).items()}


def test_at_7b_a_moe_reads_its_dense_relatives_blocks_and_a_block_of_each_expert() -> None:
    """The 16 MiB plan: Mixtral reads Mistral's 32 value blocks, plus 16 rows of each expert's gate
    matrix at the first layer (1 MiB beyond the budget); each view's bytes lie inside its fused tensor."""
    from sketches.plan import plan_reads

    dense, moe = _virtual(False), _virtual(True)
    assert core_overlap({n: i.shape for n, i in dense.items()}, {n: i.shape for n, i in moe.items()}) == 1.0
    plans = [plan_reads(t, family="f", budget=16 << 20) for t in (dense, moe)]
    assert {b for b in plans[0].blocks} <= {b for b in plans[1].blocks}
    extra = sorted(b.tensor for b in plans[1].blocks if b not in plans[0].blocks)
    assert extra == [f"layers.0.mlp.experts.{e}.gate_proj.weight" for e in range(8)]
    assert plans[1].nbytes - plans[0].nbytes == 8 * 16 * 4096 * 2
    up = moe["layers.5.mlp.experts.3.up_proj.weight"]
    first = moe["layers.5.mlp.experts.0.gate_proj.weight"]
    assert up.shape == (14336, 4096) and up.begin == first.begin + (2 * 3 + 1) * 14336 * 4096 * 2


def test_read_in_part_a_moe_is_no_duplicate_of_its_base(hub: Path, tmp_path: Path) -> None:
    """A budget under the model's size (the crawl's plan at 7B): the MoE reads its base's attention bit
    for bit and its experts' first rows, the base no MLP row. It is no `duplicate` of its base: the fit
    reads the first rows of its pool's MLP matrices where they live (the index's base reader, by range on
    the Hub) and finds each expert's source. The legacy re-save, bit-identical on what it read, is a
    `duplicate` of o/moe, as in batch."""
    order = ("o/base", "o/a", "o/b", "o/moe", "o/moe-legacy")
    add_local(tmp_path / "home", [hub / r for r in order], budget=16 << 10, device="cpu", progress=False)
    edges = {e.repo_id: e for e in read_records(tmp_path / "home", "edges")}  # type: ignore[union-attr]
    moe = edges["o/moe"]
    assert (moe.parent, moe.relation) == ("o/base", "merge")  # type: ignore[attr-defined]
    assert {p for p, _ in moe.parents} == {"o/base", "o/a", "o/b"}  # type: ignore[attr-defined]
    legacy = edges["o/moe-legacy"]
    assert (legacy.parent, legacy.relation) == ("o/moe", "duplicate")  # type: ignore[attr-defined]
    models = {m.repo_id: m for m in read_records(tmp_path / "home", "models")}  # type: ignore[union-attr]
    for repo in ("o/base", "o/moe"):  # neither was read whole
        assert models[repo].bytes_read < (hub / repo / "model.safetensors").stat().st_size / 2, repo  # type: ignore[attr-defined]


def test_a_gguf_of_a_moe_reads_its_stacked_experts_and_hangs_under_that_moe(hub: Path, tmp_path: Path) -> None:
    """convert_hf_to_gguf.py's Mixtral layout (blk.N.ffn_{gate,up,down}_exps: every expert stacked), Q8_0 by
    gguf-py: each expert reads as its own matrix (a contiguous range of whole blocks), so the copy holds
    the MoE's experts and is its quantized child, not its base's (whose attention it holds too)."""
    import shutil

    from safetensors.numpy import load_file

    from indexer.zoo.quantize import write_llama_gguf

    root = tmp_path / "hub"
    order = ("o/base", "o/a", "o/b", "o/moe", "o/moe-GGUF")
    for repo in order[:-1]:
        shutil.copytree(hub / repo, root / repo)
    (root / "o/moe-GGUF").mkdir(parents=True)
    write_llama_gguf(root / "o/moe-GGUF/moe-Q8_0.gguf", load_file(str(hub / "o/moe/model.safetensors")), "Q8_0",
                     heads=4, kv_heads=2)
    (root / "hub.json").write_text(json.dumps({"version": 1, "repos": {
        r: {"createdAt": f"2024-01-0{i + 1}T00:00:00.000Z"} for i, r in enumerate(order)}}))
    from indexer.crawl import read_folder

    read, _ = read_folder(root / "o/moe-GGUF", budget=64 << 20)
    moe = _arrays(hub / "o/moe")
    expert = "layers.1.mlp.experts.1.down_proj.weight"
    assert read.arrays[expert].shape == moe[expert].shape
    assert np.abs(read.arrays[expert] - moe[expert]).max() < 0.02 * np.abs(moe[expert]).max()
    batch = recover(root, Options(device="cpu"))
    assert _row(batch, "o/moe-GGUF") == ("o/moe", "quantized", frozenset({"o/moe"}))
    add_local(tmp_path / "home", [root / r for r in order], budget=64 << 20, device="cpu", progress=False)
    edges = {e.repo_id: e for e in read_records(tmp_path / "home", "edges")}  # type: ignore[union-attr]
    for repo in order:
        e = edges[repo]
        assert _row(batch, repo) == (e.parent, e.relation, frozenset(p for p, _ in e.parents)), repo  # type: ignore[attr-defined]


def test_an_older_rule_index_is_kept_only_where_rule_7_weighs_its_pairs_alike() -> None:
    """Rule 7 changed which layers an arrival's comparisons use when its family holds models of several
    body layouts, and rule 6 the pairs of a MoE: a rule-6 family of one layout, or a rule-5 one of one
    layout without experts, is kept; any other is refused in one line."""
    from errors import StoreError
    from indexer.incremental.exact import PAIR_RULE
    from indexer.incremental.index import _check_pair_rule

    assert PAIR_RULE == 7
    dense = {"layers.0.self_attn.v_proj.weight": (32, 64), "layers.0.mlp.gate_proj.weight": (128, 64)}
    moe = {"layers.0.self_attn.v_proj.weight": (32, 64), "layers.0.mlp.experts.0.gate_proj.weight": (128, 64)}
    _check_pair_rule("llama-dense", [{"pair_rule": 5}, {"pair_rule": 6}, {"pair_rule": 7}], dense, 1)
    _check_pair_rule("llama-moe", [{"pair_rule": 6}, {"pair_rule": 7}], moe, 1)
    with pytest.raises(StoreError, match="llama-moe.*pair rule \\[5, 7\\]"):
        _check_pair_rule("llama-moe", [{"pair_rule": 5}, {"pair_rule": 6}, {"pair_rule": 7}], moe, 1)
    with pytest.raises(StoreError, match="llama-dense.*pair rule \\[6, 7\\]"):
        _check_pair_rule("llama-dense", [{"pair_rule": 6}, {"pair_rule": 7}], dense, 2)
    with pytest.raises(StoreError, match="pair rule \\[4\\]"):
        _check_pair_rule("llama-dense", [{"pair_rule": 4}], dense, 1)


def test_every_comparison_of_one_arrival_is_on_one_set_of_layers(hub: Path, tmp_path: Path) -> None:
    """A dense arrival compared first with dense relatives (attention and MLP), then with a MoE (attention
    only, no dense MLP) in a later round: the earlier comparisons are measured again on the layers the MoE
    shares, so its candidate parents stand on one scale (relx, order 0: b-ft2 under its sibling)."""
    import copy

    from transformers import LlamaForCausalLM

    from indexer.incremental.exact import measure
    from indexer.incremental.folder import read_local
    from indexer.incremental.index import LineageIndex, _prepare, _restricted

    late = tmp_path / "o/c"
    perturb_matrices(copy.deepcopy(LlamaForCausalLM.from_pretrained(hub / "o/a")), 0.1, 3).save_pretrained(late)
    with LineageIndex.open(tmp_path / "home", k=4, device="cpu") as index:
        for repo in ("o/base", "o/a", "o/b", "o/moe"):
            index.add_many([read_local(repo, hub / repo)])
        p = _prepare(0, read_local("o/c", late), index.dim, index.seed)
        state = index.family(p.arrival.family)
        views = {r: index._with_arrays(state, r) for r in ("o/a", "o/base", "o/moe")}
        first = measure(p.mine, [views["o/a"]], device="cpu")
        p.layers = frozenset(n for n in p.mine.arrays if n in views["o/a"].arrays)
        pairs, more = index._measure_later(state, p, first, [views["o/base"], views["o/moe"]])
    assert not any("mlp" in n for n in p.layers) and any("self_attn" in n for n in p.layers)
    want = {q.other: q for q in measure(_restricted(p.mine, p.layers), list(views.values()), device="cpu")}
    assert [q.other for q in pairs] == ["o/a", "o/base", "o/moe"] and [q.other for q in more] == ["o/base", "o/moe"]
    for q in pairs:
        assert q.tier_distance == pytest.approx(want[q.other].tier_distance, rel=1e-9), q.other


def _card(folder: Path, bases: tuple[str, ...]) -> None:
    lines = "".join(f"- {b}\n" for b in bases)
    (folder / "README.md").write_text(f"---\nbase_model:\n{lines}base_model_relation: merge\n---\n# a MoE\n")


@pytest.mark.parametrize("declared", [("o/base", "o/a", "o/b"), ("o/n1",), ()])
def test_a_moe_whose_sources_are_far_takes_them_from_its_card_and_checks_them(hub: Path, tmp_path: Path,
                                                                              declared: tuple[str, ...]) -> None:
    """Six near-copies of the base (every matrix moved by 0.01 of its std) sit between the MoE and its
    experts' sources (0.1), so the five nearest relatives the merge pool takes hold no source. The card's
    `base_model` list (mergekit-moe's LazyMergekit card) puts them in the pool, batch and incremental
    alike; the fit still checks each expert bit for bit, so a card naming a wrong model finds no merge."""
    import shutil

    from transformers import LlamaForCausalLM

    root = tmp_path / "hub"
    near = tuple(f"o/n{i}" for i in range(1, 7))
    order = ("o/base", "o/a", "o/b", *near, "o/moe")
    for repo in ("o/base", "o/a", "o/b", "o/moe"):
        shutil.copytree(hub / repo, root / repo)
    for i, repo in enumerate(near):
        perturb_matrices(LlamaForCausalLM.from_pretrained(root / "o/base"), 0.01, 10 + i).save_pretrained(root / repo)
    if declared:
        _card(root / "o/moe", declared)
    (root / "hub.json").write_text(json.dumps({"version": 1, "repos": {
        r: {"createdAt": f"2024-01-{i + 1:02d}T00:00:00.000Z"} for i, r in enumerate(order)}}))
    batch = recover(root, Options(device="cpu"))
    want = ("o/base", "merge", frozenset({"o/base", "o/a", "o/b"})) if "o/a" in declared else ("o/base", "finetune", frozenset({"o/base"}))
    assert _row(batch, "o/moe") == want
    add_local(tmp_path / "home", [root / r for r in order], budget=64 << 20, device="cpu", progress=False)
    e = {e.repo_id: e for e in read_records(tmp_path / "home", "edges")}["o/moe"]  # type: ignore[union-attr]
    assert (e.parent, e.relation, frozenset(p for p, _ in e.parents)) == want  # type: ignore[attr-defined]


def test_index_compare_names_the_experts_copied_from_a_dense_model(hub: Path) -> None:
    """An auditor's question, "is this MoE made from our model?": `index compare` says which experts are the
    dense model's MLP bit for bit (a BF16 MoE's: rounded from the F32 source), and how many matrices each
    side holds that the other lacks (never compared)."""
    from indexer.lineage.compare import compare, load_local, render

    got = compare(load_local(hub / "o/a"), load_local(hub / "o/moe-bf16"))
    assert got.experts_of == "B" and got.expert_copies == (0,)  # type: ignore[union-attr]
    assert (got.only_a, got.only_b) == (6, 14)  # type: ignore[union-attr]  # A's MLP; B's experts and routers
    assert "B's experts [0] are A's MLP, bit for bit" in render(got)
    other = compare(load_local(hub / "o/moe"), load_local(hub / "o/base"))
    assert other.experts_of == "A" and other.expert_copies == ()  # type: ignore[union-attr]
    assert "none of A's experts is B's MLP" in render(other)
