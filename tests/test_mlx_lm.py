"""MLX copies made by mlx-lm itself (its models' `sanitize`, `quantize_model`, `save_model`), as mlx-community's are.

mlx-lm stacks a MoE's experts into one `switch_mlp` tensor per matrix: (E, out, words) codes with (E, out,
groups) scales and biases; Mixtral's under its `block_sparse_moe`. Every such copy (mlx-community's Qwen3-MoE,
Mixtral, OLMoE, gpt-oss ...) was refused whole ("stacked experts are not supported"): a failed row. They now read
as one matrix per expert under the names every MoE layout reads as, and mlx-lm's per-module quantization
(its default recipe keeps down_proj at 8 bits in some models) is found by the stacked module's name.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from model_support import same_in_incremental_and_crawl
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_crawl_relations import Hub

from indexer.readers import read_packed
from sketches.layers import normalise_name
from sketches.safetensors import open_local_repo

pytest.importorskip("mlx.core")
mlx_utils = pytest.importorskip("mlx_lm.utils")
transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0)


def _mixtral() -> torch.nn.Module:
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **SMALL))


def _olmoe() -> torch.nn.Module:
    return transformers.OlmoeForCausalLM(transformers.OlmoeConfig(num_experts=4, num_experts_per_tok=2, **SMALL))


MAKERS = {"mixtral": _mixtral, "olmoe": _olmoe}


def _save(model: torch.nn.Module, folder: Path) -> Path:
    """As a Hub checkpoint: BF16 safetensors and config.json, rope_theta at the top as transformers 4 wrote it."""
    model.to(torch.bfloat16).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.setdefault("rope_theta", SMALL["rope_theta"])
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _source(arch: str, folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    return _save(MAKERS[arch](), folder)


def _fine_tune(source: Path, out: Path, *, seed: int) -> None:
    """Every stored matrix (and stacked expert tensor) of `source` moved by 0.05 of its std, same names."""
    g = torch.Generator().manual_seed(seed)
    moved = {n: (t.float() + 0.05 * t.float().std() * torch.randn(t.shape, generator=g)).to(t.dtype) if t.ndim >= 2 else t
             for n, t in load_file(str(source / "model.safetensors")).items()}
    save_file(moved, str(out / "model.safetensors"))
    (out / "config.json").write_text((source / "config.json").read_text())


def _mlx_copy(source: Path, out: Path, bits: int = 4) -> Path:
    model, config = mlx_utils.load_model(source)
    model, config = mlx_utils.quantize_model(model, config, 64, bits)
    mlx_utils.save_model(out, model)
    mlx_utils.save_config(config, out / "config.json")
    return out


def _read(folder: Path) -> tuple[dict[str, np.ndarray], float]:
    config = json.loads((folder / "config.json").read_text())
    with open_local_repo(folder) as repo:
        read, _ = read_packed(repo.sources(), repo.locations(), config, budget=1 << 40)
    return dict(read.arrays), read.quant.predicted_error


@pytest.mark.parametrize("arch", sorted(MAKERS))
def test_every_expert_of_an_mlx_lm_copy_reads_as_its_source_matrix(tmp_path: Path, arch: str) -> None:
    source = _source(arch, tmp_path / "hf")
    copy = _mlx_copy(source, tmp_path / "mlx")
    with safe_open(str(copy / "model.safetensors"), "np") as stored:
        assert any(".switch_mlp." in k and len(stored.get_slice(k).get_shape()) == 3 for k in stored.keys())
    with open_local_repo(source) as repo:
        want = {normalise_name(n): repo.read(n).astype(np.float32) for n in repo.tensors()}
    got, predicted = _read(copy)
    experts = [n for n in got if ".experts." in n]
    assert len(experts) == 2 * 4 * 3, sorted(got)  # layers x experts x (gate, up, down)
    for name, values in got.items():
        assert name in want and values.shape == want[name].shape, name
        error = np.linalg.norm(values - want[name]) / np.linalg.norm(want[name])
        assert error < 3 * predicted, f"{name}: {error:.4f} against {predicted:.4f}"


def test_mlx_lm_moe_copies_are_quantized_under_their_sources_everywhere(tmp_path: Path) -> None:
    """A source, its fine-tune (uploaded after it) and mlx-lm's 4-bit copy of the source, per architecture:
    batch, the incremental index in both orders and the crawl put the copy under the source, `quantized`."""
    root = tmp_path / "hub"
    hub = Hub(root)
    root.mkdir()
    truth = {}
    for i, arch in enumerate(sorted(MAKERS)):
        base, tuned, copy = f"lab/{arch}-base", f"tuners/{arch}-ft", f"mlx-community/{arch}-base-4bit"
        source = _source(arch, hub.repo(base, 1 + i), seed=i)  # unrelated families: other initial weights
        hub.repo(tuned, 2 + i)
        _fine_tune(source, root / tuned, seed=7 + i)
        hub.repo(copy, 3 + i)
        _mlx_copy(source, root / copy)
        truth |= {base: ("", ""), tuned: (base, "finetune"), copy: (base, "quantized")}
    same_in_incremental_and_crawl(root, tmp_path, truth, batch=True)

