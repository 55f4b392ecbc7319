"""A Qwen2 family as the Hub holds one: transformers' own Qwen2ForCausalLM (tied embeddings: no lm_head;
q / k / v biases; grouped-query attention), a fine-tune of it, and its copies -- GGUF Q8_0 and Q4_K_M under
llama.cpp's qwen2 names (no rotary permutation), an MLX 4-bit copy by mlx, a folded-scale AWQ copy -- each
placed under the model it copies, in batch and over HTTP alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_crawl_relations import Hub, _options, emu, hub  # noqa: F401

from indexer.crawl import crawl
from indexer.hub_emulator import HubEmulator
from indexer.lineage.methods import Options
from indexer.lineage.recover import recover
from store.tables import read_records

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
HEADS, KV_HEADS = 4, 2


@pytest.fixture()
def qwen_hub(hub: Hub) -> Hub:  # noqa: F811
    from safetensors.numpy import load_file

    from indexer.zoo.quantize import write_awq, write_llama_gguf

    cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    for repo, seed in (("qwen/base", 0), ("other/scratch", 1)):
        torch.manual_seed(seed)
        transformers.Qwen2ForCausalLM(cfg).save_pretrained(hub.root / repo)
    model = transformers.Qwen2ForCausalLM.from_pretrained(hub.root / "qwen/base")
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * p.std() * torch.randn(p.shape, generator=gen))
    model.save_pretrained(hub.root / "lab/instruct")
    child = load_file(str(hub.root / "lab/instruct/model.safetensors"))
    config = json.loads((hub.root / "lab/instruct/config.json").read_text())
    assert "lm_head.weight" not in child and "model.layers.0.self_attn.q_proj.bias" in child
    for repo, qtype in (("q/instruct-GGUF", "Q8_0"), ("q/instruct-Q4_K_M-GGUF", "Q4_K_M")):
        (hub.root / repo).mkdir(parents=True)
        write_llama_gguf(hub.root / repo / f"instruct-{qtype.lower()}.gguf", child, qtype, heads=HEADS,
                         kv_heads=KV_HEADS, arch="qwen2")
    write_awq(hub.root / "q/instruct-AWQ", child, config, fold_seed=5)
    repos = ["qwen/base", "other/scratch", "lab/instruct", "q/instruct-GGUF", "q/instruct-Q4_K_M-GGUF", "q/instruct-AWQ"]
    try:
        from indexer.zoo.quantize import write_mlx

        write_mlx(hub.root / "mlx-community/instruct-4bit", child, config)
        repos.append("mlx-community/instruct-4bit")
    except ImportError:  # mlx is an optional extra
        pass
    for month, repo in enumerate(repos, start=1):
        hub.repo(repo, month)
    return hub


def test_qwen2_copies_are_quantized_children_in_batch_and_over_http(emu: HubEmulator, qwen_hub: Hub,  # noqa: F811
                                                                   tmp_path: Path) -> None:
    rows = {r.repo_id: (r.parent, r.relation) for r in recover(qwen_hub.root, Options(device="cpu")).rows}
    assert rows["lab/instruct"] == ("qwen/base", "finetune") and rows["other/scratch"] == ("", "")
    copies = [r for r in rows if r.startswith(("q/", "mlx-community/"))]
    assert len(copies) >= 3 and all(rows[c] == ("lab/instruct", "quantized") for c in copies), rows
    home = tmp_path / "home"
    report = crawl(home, _options(emu)).as_dict()
    assert not report["failed"], report
    assert {e.repo_id: (e.parent, e.relation) for e in read_records(home, "edges")} == rows  # type: ignore[union-attr]
