"""GGUFs of architectures outside the llama family, read under their HF checkpoints' names: encoders (llama.cpp's
BertModel / NomicBertModel conversions: bge, e5, MiniLM, nomic-embed-text ...; T5EncoderModel: the T5 v1.1 text
encoders of FLUX / SD3 workflows) and StarCoder (GPTBigCode: GPT-2's names on nn.Linear layers, not transposed).
Before: skipped, "GGUF architecture 'bert' has no Hugging Face name map" -- the gguf package's aliases for their
tensors were filtered by the decoders' naming."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from model_support import perturb_matrices, same_in_incremental_and_crawl
from safetensors.torch import save_file
from test_crawl_relations import Hub

from indexer.zoo.quantize import write_hf_gguf
from sketches.gguf import hf_names, read_header, read_hf_tensor
from sketches.layers import normalise_name
from sketches.safetensors import FileSource

transformers = pytest.importorskip("transformers")


def _bert(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=32)
    return transformers.BertModel(config).state_dict()


def _nomic(seed: int) -> dict[str, torch.Tensor]:
    """nomic-embed-text's own layout (custom code on the Hub: fused Wqkv, SwiGLU fc11 / fc12 / fc2)."""
    g = torch.Generator().manual_seed(seed)
    state = {"embeddings.word_embeddings.weight": torch.randn(64, 64, generator=g) * 0.02,
             "embeddings.token_type_embeddings.weight": torch.randn(2, 64, generator=g) * 0.02,
             "emb_ln.weight": torch.ones(64), "emb_ln.bias": torch.zeros(64)}
    for b in range(2):
        p = f"encoder.layers.{b}."
        state |= {p + "attn.Wqkv.weight": torch.randn(192, 64, generator=g) * 0.02,
                  p + "attn.out_proj.weight": torch.randn(64, 64, generator=g) * 0.02,
                  p + "mlp.fc11.weight": torch.randn(128, 64, generator=g) * 0.02,
                  p + "mlp.fc12.weight": torch.randn(128, 64, generator=g) * 0.02,
                  p + "mlp.fc2.weight": torch.randn(64, 128, generator=g) * 0.02,
                  p + "norm1.weight": torch.ones(64), p + "norm2.weight": torch.ones(64)}
    return state


def _t5_encoder(seed: int) -> dict[str, torch.Tensor]:
    """T5 v1.1's encoder (gated-GELU feed-forward: wi_0, wi_1), as FLUX / SD3 load it; its embed_tokens is
    `shared`, saved once."""
    torch.manual_seed(seed)
    config = transformers.T5Config(vocab_size=64, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                   feed_forward_proj="gated-gelu")
    state = transformers.T5EncoderModel(config).state_dict()
    return {n: t for n, t in state.items() if n != "encoder.embed_tokens.weight"}


def _starcoder(seed: int) -> dict[str, torch.Tensor]:
    """GPTBigCode (StarCoder): GPT-2's names on nn.Linear layers (out, in), multi-query c_attn."""
    torch.manual_seed(seed)
    config = transformers.GPTBigCodeConfig(vocab_size=64, n_embd=64, n_layer=2, n_head=4, n_positions=32)
    state = transformers.GPTBigCodeForCausalLM(config).state_dict()
    return {n: t for n, t in state.items() if n != "lm_head.weight" and not n.endswith((".attn.bias", ".masked_bias"))}


MAKERS = {"bert": _bert, "nomic-bert": _nomic, "t5encoder": _t5_encoder, "starcoder": _starcoder}


@pytest.mark.parametrize("arch", sorted(MAKERS))
def test_every_tensor_reads_back_under_its_hf_name(tmp_path: Path, arch: str) -> None:
    state = {n: t.numpy() for n, t in MAKERS[arch](1).items()}
    write_hf_gguf(tmp_path / "m.gguf", state, "F32", arch=arch)
    with FileSource(tmp_path / "m.gguf") as source:
        header = read_header(source)
        names = hf_names(header)
        got = {normalise_name(h.hf_name): read_hf_tensor(source, header, h) for h in names.values()}
    kept = {normalise_name(n): a for n, a in state.items() if "pooler" not in n and "position_ids" not in n}
    assert set(got) == set(kept)
    for name, array in kept.items():
        np.testing.assert_array_equal(got[name], array, err_msg=name)


def _perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    model = torch.nn.Module()
    for i, t in enumerate(state.values()):
        model.register_parameter(f"p{i}", torch.nn.Parameter(t.clone().float(), requires_grad=False))
    perturb_matrices(model, 0.1, seed)
    return dict(zip(state, (p.detach() for p in model.parameters()), strict=True))


TRUTH = {"BAAI/bert-base": ("", ""), "lab/bert-ft": ("BAAI/bert-base", "finetune"),
         "gguf/bert-ft-Q8_0": ("lab/bert-ft", "quantized"), "nomic-ai/nomic": ("", ""),
         "lab/nomic-ft": ("nomic-ai/nomic", "finetune"), "gguf/nomic-ft-F16": ("lab/nomic-ft", "quantized")}


@pytest.fixture(scope="module")
def encoder_hub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    hub = Hub(tmp_path_factory.mktemp("enc") / "hub")
    hub.root.mkdir()
    month = 1
    for arch, base, ft, copy, qtype in (("bert", "BAAI/bert-base", "lab/bert-ft", "gguf/bert-ft-Q8_0", "Q8_0"),
                                        ("nomic-bert", "nomic-ai/nomic", "lab/nomic-ft", "gguf/nomic-ft-F16", "F16")):
        state = MAKERS[arch](1)
        tuned = _perturbed(state, 2)
        for repo, tensors in ((base, state), (ft, tuned)):
            save_file({n: t.contiguous() for n, t in tensors.items()}, str(hub.repo(repo, month) / "model.safetensors"))
            month += 1
        (hub.root / copy).mkdir(parents=True)
        write_hf_gguf(hub.root / copy / f"model-{qtype}.gguf", {n: t.numpy() for n, t in tuned.items()}, qtype, arch=arch)
        hub.repo(copy, month)
        month += 1
    return hub.root


def test_encoder_ggufs_are_quantized_copies_everywhere(encoder_hub: Path, tmp_path: Path) -> None:
    same_in_incremental_and_crawl(encoder_hub, tmp_path, TRUTH, batch=True)
