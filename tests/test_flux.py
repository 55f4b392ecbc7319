"""FLUX.1 single-file checkpoints (sketches.flux): read as the diffusers transformer they convert to, checked
against diffusers' own converter, and placed in the family of a diffusers pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from indexer.crawl import add_local
from indexer.lineage.methods import Options
from indexer.lineage.recover import recover
from sketches.flux import COMFY
from sketches.layers import canonical_tensors
from sketches.safetensors import RepoWeights
from store.tables import read_records

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from model_support import perturb_matrices
from safetensors.torch import save_file  # noqa: E402


def _bfl_checkpoint(seed: int = 0) -> dict[str, torch.Tensor]:
    """A FLUX.1-shaped original-layout checkpoint, small where the converter allows: diffusers' converter
    assumes FLUX.1's inner width (3,072) for the single blocks' row splits, so those tensors keep its row
    counts and have 2 columns; everything else is 8 wide. Two double and two single blocks."""
    gen = torch.Generator().manual_seed(seed)

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    inner, mlp, w = 3072, 4 * 3072, 8
    ckpt = {}
    for stem in ("time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer",
                 "guidance_in.in_layer", "guidance_in.out_layer", "txt_in", "img_in", "final_layer.linear",
                 "final_layer.adaLN_modulation.1"):
        ckpt[f"{stem}.weight"], ckpt[f"{stem}.bias"] = t(2 * w, w), t(2 * w)
    for i in range(2):
        d = f"double_blocks.{i}."
        for side in ("img", "txt"):
            ckpt[f"{d}{side}_attn.qkv.weight"], ckpt[f"{d}{side}_attn.qkv.bias"] = t(3 * w, w), t(3 * w)
            ckpt[f"{d}{side}_attn.proj.weight"], ckpt[f"{d}{side}_attn.proj.bias"] = t(w, w), t(w)
            ckpt[f"{d}{side}_mod.lin.weight"], ckpt[f"{d}{side}_mod.lin.bias"] = t(6 * w, w), t(6 * w)
            for k, shape in (("0", (4 * w, w)), ("2", (w, 4 * w))):
                ckpt[f"{d}{side}_mlp.{k}.weight"], ckpt[f"{d}{side}_mlp.{k}.bias"] = t(*shape), t(shape[0])
            for norm in ("query_norm", "key_norm"):
                ckpt[f"{d}{side}_attn.norm.{norm}.scale"] = t(4)
        s = f"single_blocks.{i}."
        ckpt[f"{s}linear1.weight"], ckpt[f"{s}linear1.bias"] = t(3 * inner + mlp, 2), t(3 * inner + mlp)
        ckpt[f"{s}linear2.weight"], ckpt[f"{s}linear2.bias"] = t(inner, 2), t(inner)
        ckpt[f"{s}modulation.lin.weight"], ckpt[f"{s}modulation.lin.bias"] = t(3 * inner, 2), t(3 * inner)
        for norm in ("query_norm", "key_norm"):
            ckpt[f"{s}norm.{norm}.scale"] = t(4)
    return ckpt


def _read(path: Path) -> dict[str, np.ndarray]:
    with RepoWeights(str(path.parent), (path.name,)) as w:
        return {n: np.asarray(w.read(raw)) for n, raw in canonical_tensors(w.tensors()).items()}


@pytest.mark.parametrize("prefix", ["", COMFY])
def test_an_original_flux_file_reads_as_diffusers_converter_writes_it(tmp_path: Path, prefix: str) -> None:
    """Every tensor diffusers' converter writes, under its name and with its values, read from the file's
    byte ranges; the one it reorders (norm_out.linear: halves swapped) is left out, nothing else."""
    from diffusers.loaders.single_file_utils import (
        convert_flux_transformer_checkpoint_to_diffusers,
    )

    ckpt = _bfl_checkpoint()
    save_file({prefix + n: v.contiguous() for n, v in ckpt.items()}, str(tmp_path / "flux1-ft.safetensors"))
    want = convert_flux_transformer_checkpoint_to_diffusers({n: v.clone() for n, v in ckpt.items()})
    got = _read(tmp_path / "flux1-ft.safetensors")
    assert set(got) == {n for n in want if not n.startswith("norm_out.")}
    for name, array in got.items():
        assert np.array_equal(array, want[name].numpy()), name


def _transformer(seed: int, base: diffusers.FluxTransformer2DModel | None = None) -> diffusers.FluxTransformer2DModel:
    torch.manual_seed(seed)
    model = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                            pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    if base is not None:
        model.load_state_dict(base.state_dict())
        perturb_matrices(model, 0.05, seed)
    return model


def _as_bfl(model: diffusers.FluxTransformer2DModel) -> dict[str, torch.Tensor]:
    """The original layout of a diffusers FLUX transformer: the converter's renames undone, q / k / v (and a
    single block's MLP input) concatenated back. Written here as a community fine-tune is published."""
    sd = {n: v.detach().clone() for n, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    from sketches import flux

    back = {v: k for k, v in flux._FIXED.items()}
    for suffix in ("weight", "bias"):
        for diff, orig in back.items():
            if f"{diff}.{suffix}" in sd:
                out[f"{orig}.{suffix}"] = sd[f"{diff}.{suffix}"]
        out[f"final_layer.adaLN_modulation.1.{suffix}"] = torch.cat(sd[f"norm_out.linear.{suffix}"].chunk(2)[::-1])
        for i in range(1):
            d, t = f"double_blocks.{i}.", f"transformer_blocks.{i}."
            for orig, parts in flux._QKV.items():
                out[f"{d}{orig}.{suffix}"] = torch.cat([sd[f"{t}{p}.{suffix}"] for p in parts])
            for orig, diff in flux._DOUBLE.items():
                if f"{t}{diff}.{suffix}" in sd:
                    out[f"{d}{orig}.{'scale' if 'norm' in orig else suffix}"] = sd[f"{t}{diff}.{suffix}"]
        for i in range(2):
            s, t = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
            out[f"{s}linear1.{suffix}"] = torch.cat([sd[f"{t}{p}.{suffix}"] for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")])
            for orig, diff in flux._SINGLE.items():
                if f"{t}{diff}.{suffix}" in sd:
                    out[f"{s}{orig}.{'scale' if 'norm' in orig else suffix}"] = sd[f"{t}{diff}.{suffix}"]
    return {n: v.contiguous() for n, v in out.items()}


def _pipeline(folder: Path, model: diffusers.FluxTransformer2DModel) -> None:
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxPipeline", "_diffusers_version": diffusers.__version__,
        "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    model.save_pretrained(folder / "transformer")


def test_a_single_file_flux_fine_tune_joins_its_pipeline_family(tmp_path: Path) -> None:
    """A FLUX base as a diffusers pipeline, a fine-tune of it published as one original-layout file (BF16,
    under ComfyUI's prefix), a pipeline fine-tuned from that file, and a transformer trained from scratch:
    every parent right, in batch and in the incremental index; the single file's tensors equal the
    fine-tune's transformer, rounded."""
    base = _transformer(0)
    ft = _transformer(1, base)
    _pipeline(tmp_path / "bfl/flux-base", base)
    (tmp_path / "lab/flux-ft").mkdir(parents=True)
    save_file({COMFY + n: v.to(torch.bfloat16) for n, v in _as_bfl(ft).items()},
              str(tmp_path / "lab/flux-ft/flux-ft-bf16.safetensors"))
    _pipeline(tmp_path / "lab/flux-ft-ft", _transformer(2, ft))
    _pipeline(tmp_path / "other/flux-scratch", _transformer(3))
    order = ("bfl/flux-base", "lab/flux-ft", "lab/flux-ft-ft", "other/flux-scratch")
    (tmp_path / "hub.json").write_text(json.dumps({"version": 1, "repos": {
        r: {"createdAt": f"2024-0{i + 1}-01T00:00:00.000Z"} for i, r in enumerate(order)}}))
    single = _read(tmp_path / "lab/flux-ft/flux-ft-bf16.safetensors")
    sd = ft.state_dict()
    assert set(single) == {n for n in sd if not n.startswith("norm_out.")}
    for name, array in single.items():
        assert np.array_equal(array, sd[name].to(torch.bfloat16).float().numpy()), name
    forest = recover(tmp_path, Options(device="cpu"))
    assert not forest.failures()
    want = {"bfl/flux-base": "", "lab/flux-ft": "bfl/flux-base", "lab/flux-ft-ft": "lab/flux-ft", "other/flux-scratch": ""}
    assert forest.parents() == want
    add_local(tmp_path / "home", [tmp_path / r for r in order], budget=64 << 20, device="cpu", progress=False)
    assert {e.repo_id: e.parent for e in read_records(tmp_path / "home", "edges")} == want  # type: ignore[union-attr]


def _kohya_flux_lora(dims: dict[str, tuple[int, int]], rank: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """A kohya-format FLUX LoRA (lora_unet_<module>.lora_down / lora_up / alpha) over the original modules
    named in `dims` (module -> (out rows, in)), alpha = 2 r."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for module, (rows, cols) in dims.items():
        out[f"lora_unet_{module}.lora_down.weight"] = torch.randn(rank, cols, generator=gen)
        out[f"lora_unet_{module}.lora_up.weight"] = torch.randn(rows, rank, generator=gen)
        out[f"lora_unet_{module}.alpha"] = torch.tensor(2.0 * rank)
    return out


def test_kohya_flux_lora_updates_are_diffusers_converter_ones() -> None:
    """Fused modules (img / txt q-k-v, a single block's linear1 at FLUX.1's widths) split by rows, renamed
    ones renamed: per diffusers weight, s B A equals B A of diffusers' own conversion (its scales folded)."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_kohya_flux_lora_to_diffusers,
    )

    from sketches.adapter import AdapterConfig, lora_updates

    dims = {"double_blocks_0_img_attn_qkv": (3 * 8, 8), "double_blocks_0_txt_attn_qkv": (3 * 8, 8),
            "double_blocks_0_img_attn_proj": (8, 8), "double_blocks_0_img_mlp_0": (32, 8),
            "double_blocks_0_txt_mod_lin": (48, 8), "single_blocks_1_linear1": (7 * 3072, 8),
            "single_blocks_1_linear2": (8, 8), "single_blocks_1_modulation_lin": (24, 8)}
    state = _kohya_flux_lora(dims)
    ours = lora_updates(AdapterConfig("x", "LORA", 2, 2.0, (), layout="kohya"), {n: t.numpy() for n, t in state.items()})
    theirs = _convert_kohya_flux_lora_to_diffusers({n: t.clone() for n, t in state.items()})
    want = {n.removeprefix("transformer.").removesuffix(".lora_A.weight") + ".weight":
            (theirs[n.replace("lora_A", "lora_B")] @ theirs[n]).numpy() for n in theirs if n.endswith("lora_A.weight")}
    assert set(ours) == set(want) and len(want) == 3 + 3 + 3 + 4 + 2
    for weight, update in ours.items():
        np.testing.assert_allclose(update.dense(), want[weight], rtol=1e-5, atol=1e-6, err_msg=weight)


def test_a_kohya_flux_lora_is_an_adapter_of_its_diffusers_base(tmp_path: Path) -> None:
    """A kohya FLUX LoRA over the tiny base's modules (fused q/k/v, linear1 and renamed ones), its card
    naming the base pipeline: an adapter of it, every update resolved with its shape (confidence 1.0), in
    batch and in the incremental index. Before the split it read `unknown` (no name resolved: 0.5)."""
    base = _transformer(0)
    _pipeline(tmp_path / "bfl/flux-base", base)
    inner, mlp = 16, 64
    dims = {"double_blocks_0_img_attn_qkv": (3 * inner, inner), "double_blocks_0_txt_attn_proj": (inner, inner),
            "single_blocks_0_linear1": (3 * inner + mlp, inner), "single_blocks_1_linear2": (inner, inner + mlp)}
    (tmp_path / "lab/flux-lora").mkdir(parents=True)
    save_file(_kohya_flux_lora(dims), str(tmp_path / "lab/flux-lora/my_flux_lora.safetensors"))
    (tmp_path / "lab/flux-lora/README.md").write_text("---\nbase_model: bfl/flux-base\n---\n")
    order = ("bfl/flux-base", "lab/flux-lora")
    (tmp_path / "hub.json").write_text(json.dumps({"version": 1, "repos": {
        r: {"createdAt": f"2024-0{i + 1}-01T00:00:00.000Z"} for i, r in enumerate(order)}}))
    rows = {r.repo_id: r for r in recover(tmp_path, Options(device="cpu")).rows}
    lora = rows["lab/flux-lora"]
    assert (lora.parent, lora.relation, lora.confidence) == ("bfl/flux-base", "adapter", 1.0)
    add_local(tmp_path / "home", [tmp_path / r for r in order], budget=64 << 20, device="cpu", progress=False)
    e = {e.repo_id: e for e in read_records(tmp_path / "home", "edges")}["lab/flux-lora"]  # type: ignore[union-attr]
    assert (e.parent, e.relation, e.confidence) == ("bfl/flux-base", "adapter", 1.0)  # type: ignore[attr-defined]


def test_a_flux_gguf_reads_as_its_transformer_and_is_the_quantized_child_of_its_source(tmp_path: Path) -> None:
    """city96-style FLUX GGUFs (architecture `flux`, the original names, Q8_0 by gguf-py's quantizer) of a
    single-file fine-tune: every diffusers tensor read from its rows of the file (q / k / v parts too), within
    Q8_0's error of the source; in batch and in the incremental index a `quantized` child of the fine-tune
    (the base pipeline holds the same layout, farther)."""
    from indexer.crawl import read_folder
    from indexer.zoo.quantize import write_flux_gguf

    def wide(seed: int, base: diffusers.FluxTransformer2DModel | None = None) -> diffusers.FluxTransformer2DModel:
        torch.manual_seed(seed)  # inner 32, MLP 128: rows of whole Q8_0 blocks
        model = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=32, num_layers=1, num_single_layers=2,
                                                attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                                                pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
        if base is not None:
            model.load_state_dict(base.state_dict())
            perturb_matrices(model, 0.05)
        return model

    base = wide(0)
    ft = wide(1, base)
    _pipeline(tmp_path / "bfl/flux-base", base)
    (tmp_path / "lab/flux-ft").mkdir(parents=True)
    bfl = _as_bfl(ft)
    save_file(bfl, str(tmp_path / "lab/flux-ft/flux-ft.safetensors"))
    (tmp_path / "q/flux-ft-gguf").mkdir(parents=True)
    write_flux_gguf(tmp_path / "q/flux-ft-gguf/flux-ft-Q8_0.gguf", {n: v.numpy() for n, v in bfl.items()}, "Q8_0")
    order = ("bfl/flux-base", "lab/flux-ft", "q/flux-ft-gguf")
    (tmp_path / "hub.json").write_text(json.dumps({"version": 1, "repos": {
        r: {"createdAt": f"2024-0{i + 1}-01T00:00:00.000Z"} for i, r in enumerate(order)}}))
    read, _ = read_folder(tmp_path / "q/flux-ft-gguf", budget=64 << 20)
    source = _read(tmp_path / "lab/flux-ft/flux-ft.safetensors")
    assert set(read.arrays) <= set(source) and "single_transformer_blocks.1.attn.to_k.weight" in read.arrays
    for name, array in read.arrays.items():
        assert np.abs(array - source[name]).max() <= 0.01 * np.abs(source[name]).max() + 1e-6, name
    want = {"bfl/flux-base": ("", ""), "lab/flux-ft": ("bfl/flux-base", "finetune"), "q/flux-ft-gguf": ("lab/flux-ft", "quantized")}
    rows = {r.repo_id: (r.parent, r.relation) for r in recover(tmp_path, Options(device="cpu")).rows}
    assert rows == want
    add_local(tmp_path / "home", [tmp_path / r for r in order], budget=64 << 20, device="cpu", progress=False)
    assert {e.repo_id: (e.parent, e.relation) for e in read_records(tmp_path / "home", "edges")} == want  # type: ignore[union-attr]


def test_a_flux_file_whose_fused_tensor_does_not_split_is_refused_naming_it(tmp_path: Path) -> None:
    """q/k/v rows not a multiple of 3: one line naming the file and tensor, not a model read as less than it is."""
    from errors import SafetensorsError

    ckpt = _bfl_checkpoint()
    ckpt["double_blocks.1.txt_attn.qkv.weight"] = ckpt["double_blocks.1.txt_attn.qkv.weight"][:-1]
    save_file({n: v.contiguous() for n, v in ckpt.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(SafetensorsError, match=r"bad.safetensors: double_blocks.1.txt_attn.qkv.weight.*23 rows do not split"):
        _read(tmp_path / "bad.safetensors")
