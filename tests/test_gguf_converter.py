"""GGUFs made by llama.cpp's own converter (convert_hf_to_gguf's model classes), read under their sources' names.

The pairs in tests/data/gguf_converter are small random models of five transformers architectures (BF16
safetensors, as the Hub's checkpoints are) and their Q8_0 GGUFs, both written by `bench/gguf_converter.py
--fixtures` with llama-cpp-python 0.3.36's copy of llama.cpp. Each shows a way the reader went wrong before
the converter's names were measured (sketches/gguf_names.json):
- qwen3: `q_norm` / `k_norm` read as Persimmon's `q_layernorm` (the first of gguf's aliases);
- phi3: the fused `qkv_proj` and `gate_up_proj` read as `query_key_value` / `up_proj`;
- olmo: q / k rows left in the converter's rotary order (OlmoModel permutes them like LlamaModel);
- mamba: nothing read (`backbone.layers.N.mixer.*` matched no decoder naming), A = -exp(A_log) stored for A_log;
- lfm2: `feed_forward.w1/w2/w3`, `self_attn.out_proj` and the conv blocks read under Llama's names.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from model_support import perturb_matrices, same_in_incremental_and_crawl
from safetensors.torch import load_file, save_file
from test_crawl_relations import Hub

from errors import GGUFError
from sketches.gguf import (
    MEASURED_NAMES,
    MEASURED_NAMES_VERSION,
    QUANT_RELATIVE_ERROR,
    hf_names,
    read_header,
    read_hf_tensor,
)
from sketches.layers import normalise_name
from sketches.safetensors import FileSource, open_local_repo

DATA = Path(__file__).parent / "data" / "gguf_converter"
ARCHS = ("lfm2", "mamba", "olmo", "phi3", "qwen3")
# per architecture: source tensors the converter rewrites (never read), and ones the old reader got wrong
REWRITTEN = {"mamba": ("mixer.A_log", "mixer.conv1d.weight")}
ONCE_MISREAD = {"qwen3": ("self_attn.q_norm.weight", "self_attn.k_norm.weight"),
                "phi3": ("self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight"),
                "olmo": ("self_attn.q_proj.weight", "self_attn.k_proj.weight"),
                "mamba": ("mixer.in_proj.weight", "mixer.x_proj.weight", "mixer.dt_proj.weight", "mixer.out_proj.weight"),
                "lfm2": ("feed_forward.w1.weight", "feed_forward.w2.weight", "self_attn.out_proj.weight",
                         "conv.in_proj.weight", "conv.out_proj.weight")}


def _source(arch: str) -> dict[str, np.ndarray]:
    with open_local_repo(DATA / arch / "source") as repo:
        return {normalise_name(n): repo.read(n) for n in repo.tensors()}


def _gguf(arch: str) -> dict[str, np.ndarray]:
    with FileSource(DATA / arch / "gguf" / "model-Q8_0.gguf") as source:
        header = read_header(source)
        return {normalise_name(h.hf_name): read_hf_tensor(source, header, h) for h in hf_names(header).values()}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_tensor_read_is_its_source_tensor_within_q8_0_error(arch: str) -> None:
    source, read = _source(arch), _gguf(arch)
    assert read, arch
    for name, values in read.items():
        assert name in source, f"{arch}: {name} is no tensor of the source"
        want = source[name].astype(np.float32)
        assert values.shape == want.shape, name
        if values.ndim == 2 and values.shape[1] % 32 == 0:  # Q8_0 blocks: the rest is stored as F32 / F16
            error = np.linalg.norm(values - want) / np.linalg.norm(want)
            assert error < 3 * QUANT_RELATIVE_ERROR["Q8_0"], f"{arch}: {name} differs by {error:.3f}"
        else:
            np.testing.assert_allclose(values, want, rtol=1e-2, atol=1e-3, err_msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_matrices_once_misread_are_read_and_rewritten_ones_are_not(arch: str) -> None:
    read = set(_gguf(arch))
    layers = {name.split(".", 2)[1] for name in read if name.startswith("layers.")}
    for suffix in ONCE_MISREAD[arch]:
        assert any(name.endswith(suffix) for name in read), f"{arch}: no *{suffix} read"
    for suffix in REWRITTEN.get(arch, ()):
        assert not any(name.endswith(suffix) for name in read), f"{arch}: {suffix} read though the converter rewrote it"
    assert layers, arch
    matrices = {n for n, v in _source(arch).items() if v.ndim == 2 and not n.endswith(REWRITTEN.get(arch, ("-",)))}
    assert matrices - read <= {"embed_tokens.weight", "lm_head.weight"} | {n for n in matrices if "embed" in n}, arch


def _hub(root: Path) -> tuple[Path, dict[str, tuple[str, str]]]:
    """Per architecture: the source, a fine-tune of it (every matrix moved by 0.05 std, still BF16), and the
    converter's Q8_0 GGUF of the source, uploaded in that order."""
    hub = Hub(root)
    root.mkdir()
    truth: dict[str, tuple[str, str]] = {}
    for i, arch in enumerate(ARCHS):
        month = 1 + i  # families overlap in time; each one's three uploads are in order
        base, tuned, copy = f"lab/{arch}-base", f"tuners/{arch}-ft", f"quants/{arch}-base-GGUF"
        folder = hub.repo(base, month)
        shutil.copy(DATA / arch / "source" / "model.safetensors", folder / "model.safetensors")
        shutil.copy(DATA / arch / "source" / "config.json", folder / "config.json")
        state = load_file(str(folder / "model.safetensors"))
        model = torch.nn.Module()
        for i, t in enumerate(state.values()):
            model.register_parameter(f"p{i}", torch.nn.Parameter(t.clone(), requires_grad=False))
        perturb_matrices(model, 0.05, seed=month)
        moved = dict(zip(state, (p.detach().contiguous() for p in model.parameters()), strict=True))
        folder = hub.repo(tuned, month + 1)
        save_file(moved, str(folder / "model.safetensors"))
        (folder / "config.json").write_text((DATA / arch / "source" / "config.json").read_text())
        folder = hub.repo(copy, month + 2)
        shutil.copy(DATA / arch / "gguf" / "model-Q8_0.gguf", folder / "model-Q8_0.gguf")
        truth |= {base: ("", ""), tuned: (base, "finetune"), copy: (base, "quantized")}
    return root, truth


def test_converter_ggufs_are_quantized_copies_of_their_sources_everywhere(tmp_path: Path) -> None:
    """Batch, the incremental index in both arrival orders and the crawl over HTTP place each GGUF under its
    source, not under the later fine-tune, and label it `quantized`."""
    root, truth = _hub(tmp_path / "hub")
    same_in_incremental_and_crawl(root, tmp_path, truth, batch=True)


def test_the_measured_table_is_well_formed() -> None:
    import gguf

    table = json.loads(MEASURED_NAMES.read_text(encoding="utf-8"))
    assert table["version"] == MEASURED_NAMES_VERSION and table["llama_cpp"] and table["transformers"]
    relations = {"exact", "permuted", "transposed", "regrouped", "reshaped", "changed", "unmatched", "ambiguous"}
    for arch, names in table["architectures"].items():
        assert arch in gguf.MODEL_ARCH_NAMES.values(), arch
        for name, entry in names.items():
            assert entry["values"] in relations, (arch, name)
            assert (entry["hf"] is None) == (entry["values"] in ("unmatched", "ambiguous")), (arch, name)
            if entry["hf"] is not None and name.startswith("blk."):
                assert "{bid}" in entry["hf"], (arch, name)


def test_a_table_of_another_version_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sketches.gguf as reader

    bad = tmp_path / "gguf_names.json"
    bad.write_text(json.dumps({"version": 99, "architectures": {}}))
    monkeypatch.setattr(reader, "MEASURED_NAMES", bad)
    reader._measured_table.cache_clear()
    try:
        with pytest.raises(GGUFError, match="version 99"):
            reader._measured("llama")
    finally:
        reader._measured_table.cache_clear()
