"""Stable Diffusion 3 / 3.5 single-file checkpoints (sketches.sd3): read as the diffusers transformer they
convert to, checked against diffusers' own converter, and placed in the family of a diffusers pipeline."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from indexer.crawl import add_local
from indexer.lineage.methods import Options
from indexer.lineage.recover import recover
from sketches.layers import canonical_tensors
from sketches.safetensors import RepoWeights
from sketches.sd3 import PREFIX
from store.tables import read_records

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from model_support import perturb_matrices
from safetensors.torch import save_file  # noqa: E402

SD3 = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=4, num_attention_heads=2,
           joint_attention_dim=12, caption_projection_dim=8, pooled_projection_dim=6, out_channels=4,
           pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm")  # SD3.5 Medium's features, small


def _transformer(seed: int, base: diffusers.SD3Transformer2DModel | None = None) -> diffusers.SD3Transformer2DModel:
    torch.manual_seed(seed)
    model = diffusers.SD3Transformer2DModel(**SD3)
    if base is not None:
        model.load_state_dict(base.state_dict())
        perturb_matrices(model, 0.05, seed)
    return model


def _as_original(model: diffusers.SD3Transformer2DModel) -> dict[str, torch.Tensor]:
    """Stability AI's layout of a diffusers SD3 transformer: the renames of diffusers' converter undone, q / k
    / v concatenated back, the swapped halves swapped back. Written here as a community checkpoint is."""
    from sketches import sd3

    sd = {n: v.detach().clone() for n, v in model.state_dict().items()}
    last = SD3["num_layers"] - 1
    out = {orig + ("" if orig == "pos_embed" else f".{s}"): sd[f"{diff}.{s}" if orig != "pos_embed" else diff]
           for orig, diff in sd3._FIXED.items() for s in ("weight", "bias")
           if (f"{diff}.{s}" if orig != "pos_embed" else diff) in sd}

    def swapped(t: torch.Tensor) -> torch.Tensor:
        return torch.cat(t.chunk(2)[::-1])

    for s in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{s}"] = swapped(sd[f"norm_out.linear.{s}"])
        for i in range(SD3["num_layers"]):
            j, t = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
            for (side, module), parts in sd3._QKV.items():
                if f"{t}{parts[0]}.{s}" in sd:
                    out[f"{j}{side}.{module}.{s}"] = torch.cat([sd[f"{t}{p}.{s}"] for p in parts])
            for (side, module), diff in sd3._BLOCK_MODULES.items():
                if f"{t}{diff}.{s}" in sd:
                    out[f"{j}{side}.{module}.{s}"] = sd[f"{t}{diff}.{s}"]
            if i == last:
                out[f"{j}context_block.adaLN_modulation.1.{s}"] = swapped(sd[f"{t}norm1_context.linear.{s}"])
    return {n: v.contiguous() for n, v in out.items()}


def _read(path: Path) -> dict[str, np.ndarray]:
    with RepoWeights(str(path.parent), (path.name,)) as w:
        return {n: np.asarray(w.read(raw)) for n, raw in canonical_tensors(w.tensors()).items()}


@pytest.mark.parametrize("prefix", ["", PREFIX])
def test_an_original_sd3_file_reads_as_diffusers_converter_writes_it(tmp_path: Path, prefix: str) -> None:
    """Every tensor diffusers' converter writes from the file, under its name and with its values, read from
    the file's byte ranges; the ones it reorders (halves swapped) are left out, nothing else. An all-in-one
    file's text encoder is not read."""
    from diffusers.loaders.single_file_utils import (
        convert_sd3_transformer_checkpoint_to_diffusers,
    )

    ckpt = _as_original(_transformer(0))
    extra = {"text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight": torch.ones(4, 4)} if prefix else {}
    save_file({prefix + n: v for n, v in ckpt.items()} | extra, str(tmp_path / "sd3.5-ft.safetensors"))
    want = convert_sd3_transformer_checkpoint_to_diffusers({n: v.clone() for n, v in ckpt.items()})
    got = _read(tmp_path / "sd3.5-ft.safetensors")
    swapped = {"norm_out.linear.weight", "norm_out.linear.bias", f"transformer_blocks.{SD3['num_layers'] - 1}.norm1_context.linear.weight",
               f"transformer_blocks.{SD3['num_layers'] - 1}.norm1_context.linear.bias"}
    assert set(got) == set(want) - swapped
    for name, array in got.items():
        assert np.array_equal(array, want[name].numpy()), name
    assert set(want) == set(_transformer(0).state_dict())  # the inverse above is the converter's, whole


def _pipeline(folder: Path, model: diffusers.SD3Transformer2DModel) -> None:
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusion3Pipeline", "_diffusers_version": diffusers.__version__,
        "transformer": ["diffusers", "SD3Transformer2DModel"]}))
    model.save_pretrained(folder / "transformer")


def test_a_single_file_sd3_fine_tune_joins_its_pipeline_family(tmp_path: Path) -> None:
    """A pipeline base, a BF16 all-in-one single-file fine-tune of it, a pipeline fine-tuned from that file
    and a transformer trained from scratch: every parent right, in batch and in `index add`."""
    hub = tmp_path / "hub"
    base = _transformer(0)
    ft = _transformer(1, base)
    _pipeline(hub / "sai/sd3.5-medium", base)
    (hub / "fan/sd3-ft").mkdir(parents=True)
    save_file({PREFIX + n: v.to(torch.bfloat16) for n, v in _as_original(ft).items()}
              | {"text_encoders.clip_g.transformer.text_model.final_layer_norm.weight": torch.ones(8)},
              str(hub / "fan/sd3-ft/sd3-ft.safetensors"))
    _pipeline(hub / "fan/sd3-ft-ft", perturb_matrices(copy.deepcopy(ft).to(torch.bfloat16).to(torch.float32), 0.05, 2))
    _pipeline(hub / "x/sd3-scratch", _transformer(9))
    order = ("sai/sd3.5-medium", "fan/sd3-ft", "fan/sd3-ft-ft", "x/sd3-scratch")
    (hub / "hub.json").write_text(json.dumps({"version": 1, "repos": {
        r: {"createdAt": f"2024-0{i + 1}-01T00:00:00.000Z"} for i, r in enumerate(order)}}))
    truth = {"sai/sd3.5-medium": "", "fan/sd3-ft": "sai/sd3.5-medium", "fan/sd3-ft-ft": "fan/sd3-ft", "x/sd3-scratch": ""}
    assert recover(hub, Options(device="cpu")).parents() == truth
    add_local(tmp_path / "home", [hub / r for r in order], budget=64 << 20, device="cpu", progress=False)
    edges = {e.repo_id: e.parent for e in read_records(tmp_path / "home", "edges")}  # type: ignore[union-attr]
    assert edges == truth


def test_an_sd3_file_whose_qkv_does_not_split_is_refused_naming_it(tmp_path: Path) -> None:
    from indexer.crawl import read_folder

    ckpt = _as_original(_transformer(0))
    ckpt["joint_blocks.1.x_block.attn.qkv.weight"] = torch.zeros(7, 8)
    (tmp_path / "bad").mkdir()
    save_file(ckpt, str(tmp_path / "bad/sd3.safetensors"))
    with pytest.raises(Exception, match=r"joint_blocks\.1\.x_block\.attn\.qkv\.weight.*not q, k and v"):
        read_folder(tmp_path / "bad", budget=64 << 20)


def test_an_sd3_gguf_reads_as_its_transformer_and_is_the_quantized_child_of_its_source(tmp_path: Path) -> None:
    """city96's SD3 GGUFs (architecture `sd3`, Stability AI's names): q / k / v split by rows as the
    safetensors are; Q8_0 of the single file hangs under it, labelled quantized, in batch and `index add`."""
    from indexer.crawl import read_folder
    from indexer.zoo.quantize import write_flux_gguf

    hub = tmp_path / "hub"
    base = _transformer(0)
    _pipeline(hub / "sai/sd3.5-medium", base)
    ft = {n: v.numpy() for n, v in _as_original(_transformer(1, base)).items()}
    (hub / "fan/sd3-ft").mkdir(parents=True)
    save_file({n: torch.from_numpy(v) for n, v in ft.items()}, str(hub / "fan/sd3-ft/sd3-ft.safetensors"))
    (hub / "fan/sd3-ft-GGUF").mkdir(parents=True)
    write_flux_gguf(hub / "fan/sd3-ft-GGUF/sd3-ft-Q8_0.gguf", ft, "Q8_0", arch="sd3")
    order = ("sai/sd3.5-medium", "fan/sd3-ft", "fan/sd3-ft-GGUF")
    (hub / "hub.json").write_text(json.dumps({"version": 1, "repos": {
        r: {"createdAt": f"2024-0{i + 1}-01T00:00:00.000Z"} for i, r in enumerate(order)}}))
    read, _ = read_folder(hub / "fan/sd3-ft-GGUF", budget=64 << 20)
    source = _read(hub / "fan/sd3-ft/sd3-ft.safetensors")
    assert set(read.arrays) <= set(source) and "transformer_blocks.0.attn2.to_v.weight" in read.arrays
    for name, array in read.arrays.items():
        assert np.abs(array - source[name]).max() <= 0.02 * np.abs(source[name]).max() + 1e-3, name
    rows = {r.repo_id: (r.parent, r.relation) for r in recover(hub, Options(device="cpu")).rows}
    assert rows["fan/sd3-ft-GGUF"] == ("fan/sd3-ft", "quantized") and rows["fan/sd3-ft"] == ("sai/sd3.5-medium", "finetune")
    add_local(tmp_path / "home", [hub / r for r in order], budget=64 << 20, device="cpu", progress=False)
    edges = {e.repo_id: (e.parent, e.relation) for e in read_records(tmp_path / "home", "edges")}  # type: ignore[union-attr]
    assert edges["fan/sd3-ft-GGUF"] == ("fan/sd3-ft", "quantized")
