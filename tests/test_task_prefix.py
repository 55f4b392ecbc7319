"""A bare base (`XModel`, no prefix) and its task fine-tunes (`XForY`, the backbone under the architecture's
`base_model_prefix`): one family (sketches.layers._TASK_PREFIXES). facebook/dinov2-base is published bare and
its fine-tunes as Dinov2ForImageClassification (`dinov2.` + `classifier.`); before, they shared 0 % of their
core and every such fine-tune was a root."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from indexer.crawl import add_local
from indexer.lineage.methods import Options
from indexer.lineage.recover import recover
from sketches.layers import normalise_name
from store.tables import read_records

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.mark.parametrize(("stored", "compared"), [
    ("dinov2.encoder.layer.0.attention.attention.query.weight", "encoder.layer.0.attention.attention.query.weight"),
    ("hubert.encoder.layers.0.attention.k_proj.weight", "encoder.layers.0.attention.k_proj.weight"),
    ("wav2vec2.feature_extractor.conv_layers.0.conv.weight", "feature_extractor.conv_layers.0.conv.weight"),
    ("timm_model.layer1.0.conv1.weight", "layer1.0.conv1.weight"),  # transformers' TimmWrapper around timm names
    ("module.segformer.encoder.block.0.0.attention.self.query.weight", "encoder.block.0.0.attention.self.query.weight"),
    # a vision-language model's language tower: the LLM it was made from (`model.` then stripped as for Llama)
    ("language_model.model.layers.0.self_attn.q_proj.weight", "layers.0.self_attn.q_proj.weight"),
    ("model.language_model.layers.0.self_attn.q_proj.weight", "layers.0.self_attn.q_proj.weight"),
    ("language_model.lm_head.weight", "lm_head.weight"),
    # a tower or half of a model holding several: kept, or two parts would read as one
    ("decoder.block.0.layer.0.SelfAttention.q.weight", "decoder.block.0.layer.0.SelfAttention.q.weight"),
    ("text_model.encoder.layers.0.mlp.fc1.weight", "text_model.encoder.layers.0.mlp.fc1.weight"),
    ("vision_model.encoder.layers.0.mlp.fc1.weight", "vision_model.encoder.layers.0.mlp.fc1.weight"),
    ("layer1.0.conv1.weight", "layer1.0.conv1.weight"),
    # wrappers around one submodule, inside a name: FSDP, activation checkpointing, torch.compile
    ("model.layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.self_attn.q_proj.weight",
     "layers.0.self_attn.q_proj.weight"),
    ("_fsdp_wrapped_module.model.layers.0._orig_mod.mlp.up_proj.weight", "layers.0.mlp.up_proj.weight"),
])
def test_an_architectures_own_backbone_prefix_is_stripped(stored: str, compared: str) -> None:
    assert normalise_name(stored) == compared


def _config():  # noqa: ANN202 -- a transformers config
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        image_size=16, patch_size=4, num_labels=3)


def _train(model, seed: int, steps: int = 25):  # noqa: ANN001, ANN202 -- transformers models
    """A short real fine-tune (AdamW on a fixed random batch), in place."""
    gen = torch.Generator().manual_seed(seed)
    images, labels = torch.randn(16, 3, 16, 16, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        optimiser.zero_grad()
        model(pixel_values=images, labels=labels).loss.backward()
        optimiser.step()
    return model.eval()


def test_a_bare_base_and_its_task_fine_tunes_are_one_family(tmp_path: Path) -> None:
    from transformers import Dinov2ForImageClassification, Dinov2Model

    hub = tmp_path / "hub"
    torch.manual_seed(0)
    base = Dinov2Model(_config())
    base.save_pretrained(hub / "fb/dinov2-tiny")  # names without a prefix
    torch.manual_seed(1)
    task = Dinov2ForImageClassification(_config())
    task.dinov2.load_state_dict(base.state_dict())
    _train(task, 2).save_pretrained(hub / "lab/dinov2-cls")  # `dinov2.` + `classifier.`
    _train(task, 3).save_pretrained(hub / "lab/dinov2-cls-more")  # trained further
    torch.manual_seed(4)
    _train(Dinov2ForImageClassification(_config()), 5).save_pretrained(hub / "other/dinov2-scratch")  # a stranger
    order = ("fb/dinov2-tiny", "lab/dinov2-cls", "other/dinov2-scratch", "lab/dinov2-cls-more")
    (hub / "hub.json").write_text(json.dumps({"version": 1, "repos": {
        r: {"createdAt": f"2024-0{i + 1}-01T00:00:00.000Z"} for i, r in enumerate(order)}}))
    want = {"fb/dinov2-tiny": "", "lab/dinov2-cls": "fb/dinov2-tiny", "other/dinov2-scratch": "",
            "lab/dinov2-cls-more": "lab/dinov2-cls"}
    assert {r.repo_id: r.parent for r in recover(hub, Options(device="cpu")).rows} == want
    add_local(tmp_path / "home", [hub / r for r in order], budget=64 << 20, device="cpu", progress=False)
    assert {e.repo_id: e.parent for e in read_records(tmp_path / "home", "edges")} == want  # type: ignore[union-attr]
    from indexer.lineage.compare import compare, load_local

    result = compare(load_local(hub / "fb/dinov2-tiny"), load_local(hub / "lab/dinov2-cls"))  # `index compare`
    assert result.comparable and result.related


def test_a_vision_language_model_compares_with_the_llm_it_was_made_from(tmp_path: Path) -> None:
    """LLaVA saves its language tower as `language_model.model.layers.N` (transformers 5 writes that legacy
    layout), its base LLM as `model.layers.N`: before, 0 % of a shared core."""
    from model_support import perturb_matrices
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlamaForCausalLM,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from indexer.lineage.compare import compare, load_local

    text = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    llm = LlamaForCausalLM(text)
    llm.save_pretrained(tmp_path / "lm")
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=16, patch_size=4)
    vlm = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_index=127))
    vlm.model.language_model.load_state_dict(llm.model.state_dict())
    vlm.lm_head.load_state_dict(llm.lm_head.state_dict())
    perturb_matrices(vlm.model.language_model, 0.02, 1)
    vlm.save_pretrained(tmp_path / "vlm")
    result = compare(load_local(tmp_path / "lm"), load_local(tmp_path / "vlm"))
    assert result.comparable and result.related


def test_a_family_registered_under_older_names_is_kept_and_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A store written before a prefix was learned keeps that family as it is (its models' rows and edges), and
    says so when opened; a family under current names says nothing."""
    from store.families import FamilyRegistry

    old = {"dinov2.encoder.layer.0.attention.attention.query.weight": [32, 32]}
    new = {"encoder.layer.0.attention.attention.query.weight": [32, 32]}
    doc = {"version": 1, "families": {"vit-old": old, "vit-new": new}, "aliases": {"vit-old": "vit-old", "vit-new": "vit-new"}}
    (tmp_path / "families.json").write_text(json.dumps(doc))
    with caplog.at_level("WARNING", logger="store.families"):
        registry = FamilyRegistry(tmp_path)
    assert "1 families were registered under tensor names read differently since (vit-old)" in caplog.text
    assert registry.families["vit-old"] == {n: tuple(s) for n, s in old.items()}  # kept as it was
    assert registry.resolve("vit-other", {n: tuple(s) for n, s in new.items()}) == "vit-new"
    caplog.clear()
    del doc["families"]["vit-old"]
    (tmp_path / "families.json").write_text(json.dumps(doc))
    with caplog.at_level("WARNING", logger="store.families"):
        FamilyRegistry(tmp_path)
    assert caplog.text == ""
