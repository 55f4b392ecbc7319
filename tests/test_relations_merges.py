"""indexer.relations.merges.fit: linear / TIES-like / DARE-like merges are found with their parents and
weights; fine-tunes, quantized copies and duplicates are not merges."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from model_support import perturb_matrices

from indexer.relations.merges import (
    MASK_EQUAL,
    equal_share,
    fit,
    rounding_flips,
    uncovered_share,
)


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


def test_a_run_shrunk_by_weight_decay_is_no_merge_of_its_siblings() -> None:
    # wild-conv-s1's long high-lr run: weight decay shrank it to ~0.4 of its root; two siblings (root + own
    # update each) combine to 0.4 x root with weights summing to 0.4, far nearer than either one as is
    m = family(5)
    rng = np.random.default_rng(6)
    shrunk = {n: 0.4 * a + 0.05 * rng.standard_normal(a.shape).astype(np.float32) for n, a in m["base"].items()}
    got = fit(shrunk, {k: m[k] for k in ("a", "b", "c")})
    assert got is not None and not got.is_merge, got
    assert got.ratio > 0.5  # against the rescaled sibling the combination explains little


def _bf16(a: np.ndarray) -> np.ndarray:
    """Round float32 to BF16 (nearest even) and back: what a BF16 checkpoint stores."""
    bits = np.asarray(a, np.float32).view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16 << 16).astype(np.uint32).view(np.float32)


def test_a_sub_resolution_child_is_no_masked_merge_of_its_siblings() -> None:
    """Regression (bench/crawl_rate.py, 12 false merges in 80 virtual 7B models): a BF16 child whose update is
    mostly below resolution, fitted while its own parent is not among the candidates. Over one sibling (as
    base: most entries bit-equal), the other sibling's and a relative's task vectors "explain" it (residual
    ratio 0.45, weights summing to 1: their common part is the missing parent's), but 1.3 % of the entries
    it changed are entries none of them changed, which no TIES / DARE merge of them can do."""
    rng = np.random.default_rng(0)
    shape = (4, 128, 128)

    def step(src: np.ndarray, size: float) -> np.ndarray:
        return _bf16(src + 0.02 * size * rng.standard_normal(shape))

    root = _bf16(0.02 * rng.standard_normal(shape))
    parent = step(root, 5e-3)
    child = step(parent, 4e-4)  # sub-resolution: most entries stay bit-equal to the parent
    siblings = [step(parent, 5e-3), step(parent, 5e-3)]
    relative = step(root, 1e-2)

    def arrays(a: np.ndarray) -> dict[str, np.ndarray]:
        return {f"l{i}": a[i] for i in range(shape[0])}

    names = [f"l{i}" for i in range(shape[0])]
    base, others = arrays(siblings[1]), [arrays(siblings[0]), arrays(relative)]
    assert equal_share(arrays(child), base, names) >= MASK_EQUAL
    assert not rounding_flips(arrays(child), base, names)  # the earlier gates let it through
    assert uncovered_share(arrays(child), base, others, names) > 1e-3
    got = fit(arrays(child), {"s1": arrays(siblings[0]), "s2": arrays(siblings[1]), "r": arrays(relative)})
    assert got is not None and not got.is_merge, got
    # with its parent among the candidates it is that parent's child, as before
    got = fit(arrays(child), {"p": arrays(parent), "s1": arrays(siblings[0]), "s2": arrays(siblings[1])})
    assert got is not None and not got.is_merge and got.single == "p", got


def mergekit_bf16(tmp_path, step: float, doc: dict, base: str | None = "base") -> dict[str, dict[str, np.ndarray]]:  # type: ignore[no-untyped-def,type-arg]
    """A tiny BF16 llama base, two BF16 fine-tunes a and b (every matrix moved by `step` x its std,
    Gaussian) and mergekit's merge of them by `doc` (its models filled in, and `base` as its base model),
    read back as the index compares."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from transformers import LlamaConfig, LlamaForCausalLM

    from indexer.relations.batch import compared_arrays

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
                         torch_dtype="bfloat16")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    for name, seed in (("a", 1), ("b", 2)):
        model = LlamaForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.bfloat16)
        perturb_matrices(model, step, seed).save_pretrained(tmp_path / name)
    doc = doc | {"dtype": "bfloat16", **({"base_model": str(tmp_path / base)} if base else {}),
                 "models": [{"model": str(tmp_path / m), **m_params} for m, m_params in zip("ab", doc["models"], strict=True)]}
    run_merge(MergeConfiguration.model_validate(doc), str(tmp_path / "merged"),
              MergeOptions(copy_tokenizer=False, write_model_card=False, random_seed=0, quiet=True))

    def read(name: str) -> dict[str, np.ndarray]:
        with torch.no_grad():
            state = LlamaForCausalLM.from_pretrained(tmp_path / name, torch_dtype=torch.float32).state_dict()
        return compared_arrays({n: t.numpy() for n, t in state.items()})

    return {m: read(m) for m in ("base", "a", "b", "merged")}


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_real_mergekit_masked_merges_in_bf16_stay_merges(tmp_path, method: str) -> None:  # type: ignore[no-untyped-def]
    """mergekit's TIES and DARE-TIES over a BF16 base: every entry the merge changed is changed by one of
    its parents (uncovered share exactly 0), and the fit finds both parents."""
    weights = {"parameters": {"weight": 0.5, "density": 0.5}}
    models = mergekit_bf16(tmp_path, 0.2, {"merge_method": method, "parameters": {"normalize": True},
                                           "models": [weights, weights]})
    names = sorted(models["merged"])
    assert uncovered_share(models["merged"], models["base"], [models["a"], models["b"]], names) == 0.0
    got = fit(models["merged"], {m: models[m] for m in ("base", "a", "b")})
    assert got is not None and got.is_merge and got.base == "base", got
    assert {p for p, _ in got.parents} == {"a", "b"}


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_real_mergekit_bf16_merges_of_fine_tunes_a_bf16_step_apart_are_found(tmp_path, method: str) -> None:  # type: ignore[no-untyped-def]
    """mergekit's linear and SLERP merges saved in BF16, of BF16 fine-tunes that moved 3e-3 of each
    weight's std (about half a BF16 step): the merge's own rounding is most of what its parents leave
    unexplained, and only the combination rounded to BF16 tells it from a fine-tune."""
    doc = ({"merge_method": "linear", "models": [{"parameters": {"weight": 0.6}}, {"parameters": {"weight": 0.4}}]}
           if method == "linear" else {"merge_method": "slerp", "parameters": {"t": 0.4}, "models": [{}, {}]})
    models = mergekit_bf16(tmp_path, 3e-3, doc, None if method == "linear" else "a")
    got = fit(models["merged"], {m: models[m] for m in ("base", "a", "b")})
    assert got is not None and got.is_merge and {p for p, _ in got.parents} == {"a", "b"}, got


def layered(seed: int = 0, layers: int = 6) -> dict[str, dict[str, np.ndarray]]:
    """A base of `layers` attention and MLP blocks; two fine-tunes; a chain P -> X -> C whose two steps
    moved different layers (the first the lower half, the second the upper half, each a little of the
    rest)."""
    rng = np.random.default_rng(seed)
    base = {f"layers.{i}.{m}.weight": rng.standard_t(4, (32, 32)).astype(np.float32)
            for i in range(layers) for m in ("self_attn.q_proj", "mlp.up_proj")}

    def tune(src: dict[str, np.ndarray], scale: Callable[[int], float]) -> dict[str, np.ndarray]:
        return {n: a + scale(int(n.split(".")[1])) * rng.standard_normal(a.shape).astype(np.float32)
                for n, a in src.items()}

    x = tune(base, lambda i: 0.2 if i < layers // 2 else 0.02)
    return {"base": base, "a": tune(base, lambda i: 0.2), "b": tune(base, lambda i: 0.2), "x": x,
            "c": tune(x, lambda i: 0.02 if i < layers // 2 else 0.2)}


def test_a_slerp_with_t_by_layer_is_a_merge_of_its_two_parents() -> None:
    """mergekit's README SLERP: t from 0 to 1 across the layers, attention and MLP opposed. One weight per
    parent explains it by about half; a weight per block, exactly."""
    m = layered()
    t_attn = np.linspace(0.0, 1.0, 6)
    merged = {n: ((1 - t) * m["a"][n] + t * m["b"][n]).astype(np.float32)
              for n in m["base"] for i in [int(n.split(".")[1])]
              for t in [t_attn[i] if "self_attn" in n else 1 - t_attn[i]]}
    got = fit(merged, {k: m[k] for k in ("base", "a", "b", "x")})
    assert got is not None and got.is_merge, got
    assert [p for p, _ in got.parents] == ["a", "b"] and got.parents[0][1] == pytest.approx(0.5, abs=0.02)


def test_a_chain_middle_whose_steps_moved_different_layers_is_no_merge() -> None:
    """X's own step moved the lower layers, its child's the upper: block by block X is its parent or its
    child, but not in the blocks both steps moved; X (or a re-upload of it, whose pool holds the child)
    is no merge of its parent and child."""
    m = layered(1)
    got = fit(m["x"], {k: m[k] for k in ("base", "a", "c")})
    assert got is not None and not got.is_merge, got


def bf16(a: np.ndarray) -> np.ndarray:
    """float32 rounded to BF16 (nearest even), as float32."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)).view(np.float32)


@pytest.mark.parametrize("drift", [1e-2, 3e-3])
def test_a_bf16_merge_of_fine_tunes_near_bf16_resolution_is_found_and_their_children_are_not(drift: float) -> None:
    """A BF16 linear merge of BF16 fine-tunes whose updates are 0.5-2 BF16 steps: the saved merge's
    rounding is a residual no weights remove (0.08 / 0.40 of the best single's at these drifts); judged
    with the combination rounded to BF16 as the merge was, it is found. A fine-tune's own update is not
    rounding: a child stays no merge."""
    rng = np.random.default_rng(0)
    base = {f"l{i}": bf16(0.02 * rng.standard_normal((128, 128))) for i in range(4)}

    def tune(src: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {n: bf16(a + drift * 0.02 * rng.standard_normal(a.shape)) for n, a in src.items()}

    models = {"base": base, "a": tune(base), "b": tune(base), "c": tune(base)}
    merged = {n: bf16(0.6 * models["a"][n] + 0.4 * models["b"][n]) for n in base}
    got = fit(merged, models)
    assert got is not None and got.is_merge and {p for p, _ in got.parents} == {"a", "b"}, got
    child = fit(tune(models["a"]), models)
    assert child is not None and not child.is_merge, child


def test_a_pair_cache_gives_every_fit_the_numbers_it_would_compute_and_computes_each_pair_once() -> None:
    """PairCache: products and masked-merge verdicts kept between fits by tag give the same fits as
    computing them afresh, whichever model is the fit's x; a pair's products are computed once."""
    from indexer.relations import merges as m

    rng = np.random.default_rng(5)
    base = {f"l{i}": rng.normal(0, 0.02, (16, 32)).astype(np.float32) for i in range(3)}
    tune = {r: {n: a + rng.normal(0, 0.002, a.shape).astype(np.float32) for n, a in base.items()} for r in "abc"}
    merged = {n: 0.5 * tune["a"][n] + 0.5 * tune["b"][n] for n in base}
    models = {"base": base, **tune, "merge": merged}
    cache = m.PairCache()
    calls: list[int] = []
    real = m._dots
    kept = {}
    try:
        m._dots = lambda a, b, names: calls.append(1) or real(a, b, names)  # type: ignore[assignment]
        for x in models:
            pool = {r: v for r, v in models.items() if r != x}
            kept[x] = m.fit(models[x], pool, cache=cache, keys={r: r for r in pool}, x_key=x)
    finally:
        m._dots = real  # type: ignore[assignment]
    for x in models:  # afresh, no cache: the same fits
        assert kept[x] == m.fit(models[x], {r: v for r, v in models.items() if r != x})
    assert len(calls) == 5 * 6 // 2  # each of the 10 pairs and 5 squares once, over 5 fits
    assert kept["merge"] is not None and kept["merge"].parents == (("a", 0.5), ("b", 0.5))


def _layered(seed: int, depth: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"model.layers.{i}.{m}.weight": rng.standard_t(4, (24, 24)).astype(np.float32)
            for i in range(depth) for m in ("q", "up")}


def test_a_passthrough_stack_of_another_depth_is_a_merge_of_its_sources() -> None:
    """mergekit's passthrough, depth up-scaled: layers 0-1 of a, then a's layer 1 again and b's layer 1.
    Its layers 2-3 are named in no candidate; every tensor is a copy of one, renumbered. One source
    repeated is no merge; a layer trained from scratch among the copies is no passthrough."""
    base = _layered(0, 2)
    rng = np.random.default_rng(1)
    a, b = ({n: w + 0.3 * rng.standard_normal(w.shape).astype(np.float32) for n, w in base.items()} for _ in range(2))
    models = {"base": base, "a": a, "b": b}

    def stack(*sources: tuple[dict[str, np.ndarray], int]) -> dict[str, np.ndarray]:
        return {f"model.layers.{i}.{m}.weight": src[f"model.layers.{j}.{m}.weight"]
                for i, (src, j) in enumerate(sources) for m in ("q", "up")}

    got = fit(stack((a, 0), (a, 1), (a, 1), (b, 1)), models)
    assert got is not None and got.is_merge and dict(got.parents) == {"a": 0.75, "b": 0.25}
    same = fit(stack((a, 0), (a, 1), (a, 1)), models)  # its own layer repeated: a's, no merge
    assert same is not None and not same.is_merge and same.single == "a"
    trained = stack((a, 0), (a, 1), (b, 1)) | {"model.layers.3.q.weight": rng.standard_normal((24, 24)).astype(np.float32)}
    assert not fit(trained, models).is_merge


def test_a_known_merge_is_no_masked_base_of_its_own_parents() -> None:
    """Without upload order a base's pool holds its fine-tunes a, b and their TIES merge T (which keeps the
    base's entries where the task vectors were trimmed). Over T as the masked base, base - T is fitted on
    a - T and b - T inside the masking noise, so the base came out a merge of its own children. A masked
    base is the ancestor its parents' task vectors start from, and T descends from a and b: told that T is a
    merge of them, the fit refuses that base."""
    m = family(1)
    ties = {}
    for n, base in m["base"].items():
        delta = np.zeros_like(base)
        for name in "ab":
            tau = m[name][n] - base
            delta += tau * (np.abs(tau) >= np.quantile(np.abs(tau), 0.5))  # mergekit's weight 1, density 0.5
        ties[n] = base + delta
    pool = {"a": m["a"], "b": m["b"], "t": ties}
    unordered = fit(m["base"], pool, merges=["t"])
    assert unordered is not None and unordered.is_merge and unordered.base == "t"  # the failure, without parents
    got = fit(m["base"], pool, merges={"t": ["a", "b"]})
    assert got is not None and not got.is_merge, got
    found = fit(ties, {"base": m["base"], "a": m["a"], "b": m["b"]})  # T itself is still a merge over the base
    assert found is not None and found.is_merge and {p for p, _ in found.parents} == {"a", "b"}
