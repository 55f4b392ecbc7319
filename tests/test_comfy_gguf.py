"""Diffusion GGUFs as city96's ComfyUI-GGUF converter writes them for its own architectures (Wan, HunyuanVideo,
LTX-Video, Qwen-Image, HiDream, SDXL, ...): the checkpoint's own names, conv kernels and a 5-D patch embedding
flattened to rows of 256 with their shapes in `comfy.gguf.orig_shape.<name>`. Each is its source's `quantized`
copy in batch, in the incremental index and in the crawl.

Before, every such file was skipped: "GGUF architecture 'wan' has no Hugging Face name map".
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from model_support import same_in_incremental_and_crawl
from test_crawl_relations import Hub, tuned

from errors import GGUFError
from indexer.lineage.methods import Options
from indexer.lineage.recover import recover
from indexer.zoo.quantize import write_comfy_gguf
from sketches.gguf import hf_names, hf_shape, read_header, read_hf_tensor
from sketches.safetensors import FileSource


def wan_state(seed: int, width: int = 256, blocks: int = 3) -> dict[str, np.ndarray]:
    """A Wan-style DiT in its own layout (`blocks.N.self_attn.q`, a Conv3d patch embedding), heavy-tailed."""
    rng = np.random.default_rng(seed)
    state = {"patch_embedding.weight": rng.standard_t(4, (width, 16, 1, 2, 2)), "patch_embedding.bias": np.zeros(width),
             "head.head.weight": rng.standard_t(4, (64, width)), "text_embedding.0.weight": rng.standard_t(4, (width, 96)),
             "head.modulation.weight": rng.standard_t(4, (2, 3, 1, 2, 2))}  # 5-D and small: stored as one row
    for b in range(blocks):
        for m in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k", "ffn.0"):
            state[f"blocks.{b}.{m}.weight"] = rng.standard_t(4, (width, width))
            state[f"blocks.{b}.{m}.bias"] = np.zeros(width)
        state[f"blocks.{b}.ffn.2.weight"] = rng.standard_t(4, (width, width))
        state[f"blocks.{b}.norm3.weight"] = np.ones(width)
    return {n: (0.02 * a if a.ndim > 1 else a).astype(np.float32) for n, a in state.items()}


TRUTH = {"Wan-AI/base": ("", ""), "lab/child": ("Wan-AI/base", "finetune"), "other/stranger": ("", ""),
         "city96/child-gguf": ("lab/child", "quantized"), "city96/base-gguf": ("Wan-AI/base", "quantized")}


@pytest.fixture(scope="module")
def wan_hub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    hub = Hub(tmp_path_factory.mktemp("wan") / "hub")
    hub.root.mkdir()
    base = wan_state(1)
    child = tuned(base, 2, step=0.1)
    hub.repo("Wan-AI/base", 1, weights=base)
    hub.repo("lab/child", 2, weights=child)
    hub.repo("other/stranger", 2, weights=wan_state(7))
    for month, (repo, state, qtype, prefix) in enumerate(
            (("city96/child-gguf", child, "Q8_0", "model.diffusion_model."), ("city96/base-gguf", base, "Q4_0", "")),
            start=3):
        (hub.root / repo).mkdir(parents=True)
        write_comfy_gguf(hub.root / repo / f"wan-{qtype}.gguf", state, qtype, arch="wan", prefix=prefix)
        hub.repo(repo, month)
    return hub.root


def test_flattened_tensors_read_back_in_their_shape_and_rows(wan_hub: Path) -> None:
    child = tuned(wan_state(1), 2, step=0.1)
    with FileSource(wan_hub / "city96/child-gguf/wan-Q8_0.gguf") as source:
        header = read_header(source)
        names = {h.hf_name.removeprefix("model.diffusion_model."): h for h in hf_names(header).values()}
        patch = names["patch_embedding.weight"]
        assert patch.shape == (256, 16, 1, 2, 2) and hf_shape(header, patch) == (256, 16, 1, 2, 2)
        assert len(header.get(patch.gguf_name).shape) == 2  # stored as rows of 256
        whole = read_hf_tensor(source, header, patch)
        np.testing.assert_allclose(whole, child["patch_embedding.weight"], atol=2e-3)
        np.testing.assert_array_equal(read_hf_tensor(source, header, patch, rows=(37, 101)), whole[37:101])
        small = names["head.modulation.weight"]
        assert small.shape == (2, 3, 1, 2, 2) and len(header.get(small.gguf_name).shape) == 1
        np.testing.assert_allclose(read_hf_tensor(source, header, small), child["head.modulation.weight"], atol=2e-3)
        text = names["text_embedding.0.weight"]  # 96 wide: flattened too
        assert text.shape == (256, 96)
        np.testing.assert_array_equal(read_hf_tensor(source, header, text, rows=(5, 9)),
                                      read_hf_tensor(source, header, text)[5:9])


def test_a_bad_recorded_shape_is_refused_naming_the_key(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(tmp_path / "bad.gguf", "wan")
    writer.add_array("comfy.gguf.orig_shape.blocks.0.x.weight", [3, 7])  # 21 values for a tensor of 512
    writer.add_tensor("blocks.0.x.weight", np.zeros((2, 256), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with FileSource(tmp_path / "bad.gguf") as source, pytest.raises(GGUFError, match=r"orig_shape.blocks.0.x.weight"):
        hf_names(read_header(source))


@pytest.mark.parametrize("use_time", [True, False])
def test_comfy_ggufs_are_quantized_copies_in_batch(wan_hub: Path, use_time: bool) -> None:
    forest = recover(wan_hub, Options(device="cpu", use_time=use_time))
    assert not forest.failures()
    assert {r.repo_id: (r.parent, r.relation) for r in forest.rows} == TRUTH


def test_comfy_ggufs_in_the_incremental_index_and_the_crawl(wan_hub: Path, tmp_path: Path) -> None:
    same_in_incremental_and_crawl(wan_hub, tmp_path, TRUTH)
