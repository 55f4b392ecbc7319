"""PEFT adapters: configs and tensors saved by the real `peft`, checked against peft's own merged weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import AdaLoraConfig, LoHaConfig, LoKrConfig, LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from errors import AdapterError
from sketches.adapter import (
    AdapterConfig,
    check_compatibility,
    difference_singular_values,
    factor_sets,
    lora_updates,
    parse_adapter_config,
    saved_modules,
    tail_norm,
    update_distance,
    update_distances,
    update_norm,
)

BASE = "org/tiny-llama"


def tiny_llama(seed: int = 0, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}


def perturb(peft_model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """LoRA B starts at zero (no update): give every factor random values, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)


def save_adapter(tmp: Path, model: torch.nn.Module, config: LoraConfig, *, seed: int, base: str = BASE,
                 ) -> tuple[Path, dict[str, np.ndarray]]:
    """(adapter folder, the merged weights peft computes) for `config` applied to `model`."""
    peft_model = get_peft_model(model, config)
    perturb(peft_model, seed)
    peft_model.save_pretrained(tmp)
    # the base's name goes in after saving: with a name, save_pretrained looks the base up on the Hub
    path = tmp / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"base_model_name_or_path": base}))
    merged = state(peft_model.merge_and_unload())
    return tmp, merged


def read_adapter(folder: Path) -> tuple[AdapterConfig, dict[str, np.ndarray]]:
    config = parse_adapter_config((folder / "adapter_config.json").read_bytes())
    return config, safetensors.numpy.load_file(folder / "adapter_model.safetensors")


LLAMA_LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                  rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 3})


@pytest.mark.parametrize("rslora", [False, True])
def test_updates_equal_peft_merged_minus_base(tmp_path: Path, rslora: bool) -> None:
    model = tiny_llama()
    base = state(model)
    lora = dict(LLAMA_LORA, use_rslora=rslora)
    if rslora:  # peft refuses patterns together with rslora
        lora.pop("rank_pattern"), lora.pop("alpha_pattern")
    folder, merged = save_adapter(tmp_path, model, LoraConfig(**lora), seed=1)
    config, tensors = read_adapter(folder)
    assert config.base_model == BASE and config.use_rslora is rslora
    updates = lora_updates(config, tensors)
    changed = sorted(k for k in base if not np.array_equal(base[k], merged[k]))
    assert sorted(updates) == changed  # every tensor peft changed, and nothing else
    assert "model.embed_tokens.weight" in updates and updates["model.embed_tokens.weight"].transposed
    for weight, update in updates.items():
        delta = merged[weight] - base[weight]
        np.testing.assert_allclose(update.dense(), delta, rtol=1e-4, atol=1e-6, err_msg=weight)
        assert update_norm(update) == pytest.approx(float(np.linalg.norm(delta)), rel=1e-4)
    if not rslora:
        assert updates["model.layers.0.self_attn.v_proj.weight"].rank == 2
        assert updates["model.layers.1.self_attn.q_proj.weight"].scale == pytest.approx(3 / 4)
        assert updates["model.layers.0.self_attn.q_proj.weight"].scale == pytest.approx(8 / 4)
    else:
        assert updates["model.layers.0.self_attn.q_proj.weight"].scale == pytest.approx(8 / 2)


def test_gpt2_fan_in_fan_out_and_saved_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=24, n_layer=2, n_head=2)).eval()
    base = state(model)
    lora = LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn"], fan_in_fan_out=True, modules_to_save=["ln_f"])
    folder, merged = save_adapter(tmp_path, model, lora, seed=2)
    config, tensors = read_adapter(folder)
    assert config.fan_in_fan_out and config.modules_to_save == ("ln_f",)
    updates = lora_updates(config, tensors)
    for weight, update in updates.items():
        assert update.transposed and update.weight_shape == base[weight].shape == (24, 72)
        np.testing.assert_allclose(update.dense(), merged[weight] - base[weight], rtol=1e-4, atol=1e-6)
    saved = saved_modules(tensors)
    assert sorted(saved) == ["transformer.ln_f.bias", "transformer.ln_f.weight"]
    verdict = check_compatibility(updates, {k: tensors[v].shape for k, v in saved.items()},
                                  {k: v.shape for k, v in base.items()})
    assert verdict.verdict == "compatible" and verdict.matched == 2
    assert verdict.saved_match == ("transformer.ln_f.bias", "transformer.ln_f.weight")


def test_distances_and_spectra_match_dense(tmp_path: Path) -> None:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"])
    first, _ = save_adapter(tmp_path / "a", tiny_llama(), config, seed=1)
    second, _ = save_adapter(tmp_path / "b", tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]), seed=2)
    a = lora_updates(*read_adapter(first))
    b = lora_updates(*read_adapter(second))
    distances = update_distances(a, b)
    assert sorted(distances) == ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    for weight, distance in distances.items():
        diff = a[weight].dense() - b[weight].dense()
        assert distance == pytest.approx(float(np.linalg.norm(diff)), rel=1e-9)
        svals = difference_singular_values(a[weight], b[weight])
        dense_svals = np.linalg.svd(diff, compute_uv=False)
        assert len(svals) == 6  # r_a + r_b: the difference has rank at most 6 of 32
        np.testing.assert_allclose(svals, dense_svals[:6], rtol=1e-9, atol=1e-12)
        assert tail_norm(svals, 4) == pytest.approx(float(np.sqrt(np.sum(dense_svals[4:] ** 2))), rel=1e-6)
    one = a["model.layers.0.self_attn.o_proj.weight"]
    assert update_distance(one, one) == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_allclose(difference_singular_values(one), np.linalg.svd(one.dense(), compute_uv=False)[:4], rtol=1e-9)


def test_chain_of_checkpoints_is_low_rank_apart(tmp_path: Path) -> None:
    """An adapter trained further from another moves a few directions: its difference has a short
    spectrum; an unrelated adapter of the same rank differs by 2r full directions."""
    parent_dir, _ = save_adapter(tmp_path / "p", tiny_llama(), LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"]), seed=1)
    config, tensors = read_adapter(parent_dir)
    child = dict(tensors)
    rng = np.random.default_rng(0)
    for name in tensors:  # one more step of training: a small change of A along one direction
        if "lora_A" in name:
            child[name] = tensors[name] + 0.002 * np.outer(rng.standard_normal(4), rng.standard_normal(tensors[name].shape[1])).astype(np.float32)
    stranger_dir, _ = save_adapter(tmp_path / "s", tiny_llama(), LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"]), seed=9)
    parent, kid = lora_updates(config, tensors), lora_updates(config, child)
    stranger = lora_updates(*read_adapter(stranger_dir))
    w = "model.layers.0.self_attn.q_proj.weight"
    assert update_distance(parent[w], kid[w]) < 0.1 * update_distance(parent[w], stranger[w])
    assert tail_norm(difference_singular_values(parent[w], kid[w]), 1) < 1e-3 * update_norm(parent[w])


def test_compatibility_with_the_wrong_base(tmp_path: Path) -> None:
    folder, _ = save_adapter(tmp_path, tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                modules_to_save=["lm_head"]), seed=1)
    config, tensors = read_adapter(folder)
    updates = lora_updates(config, tensors)
    saved = {k: tensors[v].shape for k, v in saved_modules(tensors).items()}
    assert sorted(saved) == ["lm_head.weight"]
    right = {k: v.shape for k, v in state(tiny_llama(seed=5)).items()}
    ok = check_compatibility(updates, saved, right)
    assert ok.verdict == "compatible" and ok.reasons == () and ok.saved_match == ("lm_head.weight",)
    wider = {k: v.shape for k, v in state(tiny_llama(hidden=64)).items()}
    bad = check_compatibility(updates, saved, wider)
    assert bad.verdict == "incompatible"
    assert "model.layers.0.self_attn.q_proj.weight: update is [32, 32], the base has [64, 64]" in bad.reasons
    assert any("lm_head.weight (modules_to_save)" in r for r in bad.reasons)
    # a base saved without the task model's `model.` prefix still resolves by normalised name
    bare = {k.removeprefix("model."): v for k, v in right.items()}
    resolved = check_compatibility(updates, {}, bare)
    assert resolved.verdict == "compatible" and resolved.base_names["model.layers.1.self_attn.q_proj.weight"] == "layers.1.self_attn.q_proj.weight"
    unrelated = check_compatibility(updates, {}, {"encoder.weight": (3, 3)})
    assert unrelated.verdict == "incompatible" and unrelated.matched == 0


@pytest.mark.parametrize("targets, saved_names", [
    (["q_proj"], ["lm_head.weight", "model.embed_tokens.weight"]),
    (["q_proj", "embed_tokens"], ["model.embed_tokens.weight"]),  # a LoRA on the resized embeddings too
])
def test_resized_vocabulary_saved_with_the_adapter_is_compatible(tmp_path: Path, targets: list[str],
                                                                 saved_names: list[str]) -> None:
    """A chat fine-tune that added tokens: PEFT saves the resized embed_tokens (and lm_head) with the LoRA
    (`save_embedding_layers`; a LoRA-wrapped one under `base_layer`); the base, before its resize, is still
    its base. A hidden size that differs is not."""
    base = {k: v.shape for k, v in state(tiny_llama(seed=5)).items()}
    model = tiny_llama()
    model.resize_token_embeddings(64 + 2)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    perturb(peft_model, 3)
    peft_model.save_pretrained(tmp_path, save_embedding_layers=True)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"base_model_name_or_path": BASE}))
    config, tensors = read_adapter(tmp_path)
    saved = {k: tensors[v].shape for k, v in saved_modules(tensors).items()}
    assert sorted(saved) == saved_names and all(shape[0] == 66 for shape in saved.values())
    updates = lora_updates(config, tensors)
    ok = check_compatibility(updates, saved, base)
    assert ok.verdict == "compatible" and ok.reasons == () and ok.matched == len(updates)
    assert {r.split(":")[0] for r in ok.saved_resized} >= set(saved_names)
    assert all(r.endswith("64 -> 66 tokens") for r in ok.saved_resized)
    narrower = check_compatibility({}, {"model.embed_tokens.weight": (66, 16)}, base)
    assert narrower.verdict == "incompatible" and "modules_to_save" in narrower.reasons[0]


def test_new_saved_module_is_not_held_against_the_adapter() -> None:
    u = lora_updates(AdapterConfig(BASE, "LORA", 2, 2, ("q",)),
                     {"base_model.model.q.lora_A.weight": np.ones((2, 4), np.float32),
                      "base_model.model.q.lora_B.weight": np.ones((3, 2), np.float32)})
    result = check_compatibility(u, {"classifier.weight": (5, 4)}, {"q.weight": (3, 4)})
    assert result.verdict == "compatible" and result.saved_new == ("classifier.weight",)


# --- config and names ---------------------------------------------------------------------------------


def test_names_with_and_without_default() -> None:
    names = ["base_model.model.a.lora_A.default.weight", "base_model.model.a.lora_B.default.weight",
             "base_model.model.b.lora_A.weight", "base_model.model.b.lora_B.weight",
             "base_model.model.e.lora_embedding_A", "base_model.model.e.lora_embedding_B",
             "base_model.model.b.lora_B.bias", "base_model.model.head.modules_to_save.default.weight"]
    sets = factor_sets(names)
    assert {w: (f.kind, f.parts["A"], f.parts["B"], f.embedding) for w, f in sets.items()} == {
        "a.weight": ("lora", names[0], names[1], False), "b.weight": ("lora", names[2], names[3], False),
        "e.weight": ("lora", names[4], names[5], True)}
    assert saved_modules(names) == {"head.weight": names[7]}
    with pytest.raises(AdapterError, match=r"incomplete lora factor set \(A\)"):
        factor_sets(["base_model.model.x.lora_A.weight"])


CONFIG = {"base_model_name_or_path": "meta/base", "peft_type": "LORA", "r": 8, "lora_alpha": 16,
          "target_modules": ["q_proj", "v_proj"], "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}


@pytest.mark.parametrize("raw,reason", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe", "not UTF-8"),
    (b"[1, 2]", "a JSON list, not an object"),
    (json.dumps({**CONFIG, "base_model_name_or_path": None}).encode(), "names no base model"),
    (json.dumps({**CONFIG, "base_model_name_or_path": "  "}).encode(), "names no base model"),
    (json.dumps({k: v for k, v in CONFIG.items() if k != "base_model_name_or_path"}).encode(), "names no base model"),
    (json.dumps({**CONFIG, "r": 0}).encode(), "r must be a positive whole number"),
    (json.dumps({**CONFIG, "r": 4.5}).encode(), "r must be a positive whole number"),
    (json.dumps({**CONFIG, "lora_alpha": "big"}).encode(), "lora_alpha must be a positive number"),
    (json.dumps({**CONFIG, "peft_type": "no such type!"}).encode(), "is not a PEFT type name"),
    (json.dumps({**CONFIG, "target_modules": [1]}).encode(), "target_modules must be a list"),
    (json.dumps({**CONFIG, "rank_pattern": {"v": -1}}).encode(), "v must be a positive whole number"),
    (b" " * (1024 * 1024 + 1), "over the 1048576-byte cap"),
])
def test_bad_configs_say_why(raw: bytes, reason: str) -> None:
    with pytest.raises(AdapterError, match=reason) as info:
        parse_adapter_config(raw, name="repo/adapter_config.json")
    assert info.value.thing == "repo/adapter_config.json"


def test_a_config_without_a_usable_base_takes_the_cards() -> None:
    """PEFT writes null for a base built from a config, and a trainer's local path names nothing on the
    Hub: the repo card's base_model (the first of several) stands in; a Hub id in the config wins."""
    null = json.dumps({**CONFIG, "base_model_name_or_path": None}).encode()
    assert parse_adapter_config(null, card_base="org/card;org/other").base_model == "org/card"
    with pytest.raises(AdapterError, match="no base_model in the model card"):
        parse_adapter_config(null)
    for path in ("/content/drive/llama", "./out/base", "~/models/x", "C:\\models\\x", "a/b/c"):
        local = json.dumps({**CONFIG, "base_model_name_or_path": path}).encode()
        assert parse_adapter_config(local, card_base="org/card").base_model == "org/card", path
        assert parse_adapter_config(local).base_model == path  # no card: the path, resolved as it can be
    assert parse_adapter_config(json.dumps(CONFIG).encode(), card_base="org/card").base_model == "meta/base"


def test_a_cache_path_resolves_to_its_repo() -> None:
    from indexer.relations.adapters import resolve_base

    known = {"meta-llama/Llama-2-7b-hf": "meta-llama/Llama-2-7b-hf"}.get
    for path in ("/root/.cache/huggingface/hub/models--meta-llama--Llama-2-7b-hf/snapshots/0123abcd",
                 "C:\\hf\\models--meta-llama--Llama-2-7b-hf\\snapshots\\0123abcd", "/data/meta-llama/Llama-2-7b-hf"):
        assert resolve_base(path, known) == "meta-llama/Llama-2-7b-hf", path
    assert resolve_base("/data/llama", known) is None


def test_config_fields_and_regex_targets() -> None:
    config = parse_adapter_config(json.dumps({**CONFIG, "target_modules": ".*attn.*", "use_rslora": True}).encode())
    assert config.target_modules == ".*attn.*" and config.scale_for("x.q_proj") == pytest.approx(16 / np.sqrt(8))
    patterned = parse_adapter_config(json.dumps({**CONFIG, "rank_pattern": {"layers.0.v_proj": 2}}).encode())
    assert patterned.rank_for("model.layers.0.v_proj") == 2 and patterned.rank_for("model.layers.10.v_proj") == 8
    assert patterned.modules_to_save == ()


def test_dora_pairs_need_their_magnitudes() -> None:
    """A DoRA pair without its magnitude, magnitudes of the wrong length or not finite, and magnitudes in an
    adapter that does not say use_dora are each refused, naming the tensor."""
    dora = parse_adapter_config(json.dumps({**CONFIG, "use_dora": True}).encode())
    pair = {"base_model.model.q.lora_A.weight": np.ones((2, 4)), "base_model.model.q.lora_B.weight": np.ones((3, 2))}
    with pytest.raises(AdapterError, match="no lora_magnitude_vector") as info:
        lora_updates(dora, pair)
    assert info.value.thing == "q.weight"
    magnitude = "base_model.model.q.lora_magnitude_vector"
    with pytest.raises(AdapterError, match="4 magnitudes for a weight of 3 output rows"):
        lora_updates(dora, pair | {magnitude: np.ones(4)})
    with pytest.raises(AdapterError, match="NaN or Inf"):
        lora_updates(dora, pair | {magnitude: np.array([1.0, np.nan, 1.0])})
    with pytest.raises(AdapterError, match="does not set use_dora") as info:
        lora_updates(parse_adapter_config(json.dumps(CONFIG).encode()), pair | {magnitude: np.ones(3)})
    assert info.value.thing == magnitude
    found = lora_updates(dora, pair | {magnitude + ".default.weight": np.arange(3.0)})  # an older PEFT's name
    assert found["q.weight"].magnitude.tolist() == [0.0, 1.0, 2.0]


def test_factors_that_do_not_multiply() -> None:
    config = AdapterConfig(BASE, "LORA", 2, 2, ("q",))
    with pytest.raises(AdapterError, match="do not multiply"):
        lora_updates(config, {"q.lora_A.weight": np.ones((2, 4)), "q.lora_B.weight": np.ones((3, 3))})


FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=8)


@FAST
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_adapter_errors(raw: bytes) -> None:
    try:
        parse_adapter_config(raw)
    except AdapterError:
        pass


@FAST
@given(st.dictionaries(st.sampled_from(sorted(CONFIG) + ["use_rslora", "fan_in_fan_out", "use_dora"]), JSON, max_size=8))
def test_random_json_configs_raise_only_adapter_errors(fields: dict) -> None:
    try:
        config = parse_adapter_config(json.dumps({**CONFIG, **fields}).encode())
    except AdapterError:
        return
    assert config.r > 0 and config.lora_alpha > 0 and config.base_model
    config.scale_for("model.layers.0.q_proj")


class _ConvNet(torch.nn.Module):
    """A conv layer and a linear one: LoHa / LoKr keep a conv kernel's update flattened, or as a 4-D W2."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 8, 3)
        self.fc = torch.nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3)))


KINDS = {  # the PEFT types whose updates are low-rank factors besides LoRA, each as PEFT writes it
    "adalora": lambda: AdaLoraConfig(init_r=6, target_r=4, lora_alpha=12, target_modules=["q_proj", "v_proj"], total_step=10),
    "loha": lambda: LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "lokr": lambda: LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "lokr-both": lambda: LoKrConfig(r=2, alpha=3, decompose_both=True, decompose_factor=4, target_modules=["q_proj", "down_proj"]),
    "loha-conv": lambda: LoHaConfig(r=3, alpha=6, target_modules=["conv", "fc"]),
    "lokr-conv": lambda: LoKrConfig(r=2, alpha=4, target_modules=["conv", "fc"]),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_other_low_rank_peft_types_equal_peft_merged_minus_base(tmp_path: Path, kind: str) -> None:
    """AdaLoRA (B diag(E) A), LoHa (a Hadamard product of two low-rank products) and LoKr (a Kronecker
    product), saved by PEFT, read as low-rank factors whose product is PEFT's merged weight minus the
    base. Before, each was refused ("only LORA")."""
    model = _ConvNet() if kind.endswith("conv") else tiny_llama()
    base = state(model)
    peft_model = get_peft_model(model, KINDS[kind]())
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # B / W2 start at zero (no update): random factors, as training would leave
        for name, param in peft_model.named_parameters():
            if any(k in name for k in ("lora_", "hada_", "lokr_")):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    peft_model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"base_model_name_or_path": BASE}))
    merged = state(peft_model.merge_and_unload())
    config, tensors = read_adapter(tmp_path)
    updates = lora_updates(config, tensors)
    changed = sorted(k for k in base if not np.array_equal(base[k], merged[k]))
    assert sorted(updates) == changed
    for weight, update in updates.items():
        delta = (merged[weight] - base[weight]).reshape(update.weight_shape)
        np.testing.assert_allclose(update.dense(), delta, rtol=1e-4, atol=1e-5, err_msg=weight)
    verdict = check_compatibility(updates, {}, {k: v.shape for k, v in base.items()})
    assert verdict.verdict == "compatible" and verdict.matched == len(updates)
