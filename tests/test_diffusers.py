"""Diffusers pipelines (model_index.json + one folder per component) are one model each, read through
their denoiser (`unet/`, `transformer/`): in the crawl over HTTP and in `index recover`, with the same rows.

The components are written by diffusers itself (`save_pretrained`: its file names, fp16 variants and
shard index); a fine-tune changes the UNet and keeps the base's autoencoder bit for bit, as DreamBooth
runs on the Hub do.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import save_file
from test_crawl_relations import Hub, _options, emu, hub  # noqa: F401

from indexer.crawl import crawl
from indexer.hub_emulator import HubEmulator
from indexer.lineage.methods import Options
from indexer.lineage.recover import discover_repos, recover
from store.tables import read_records

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

UNET = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "block_out_channels": (32, 64),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 32, "attention_head_dim": 8, "norm_num_groups": 8}


def _unet(seed: int, *, from_unet=None, step: float = 0.05):  # noqa: ANN001, ANN202
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**UNET)
    if from_unet is not None:  # a fine-tune: the base's weights moved by a small update
        unet.load_state_dict(from_unet.state_dict())
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in unet.parameters():
                if p.ndim >= 2:
                    p.add_(step * p.std() * torch.randn(p.shape, generator=gen))
    return unet


def _pipeline(folder: Path, unet, vae, *, variant: bool = False, shard: str | None = None) -> None:  # noqa: ANN001
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}))
    unet.save_pretrained(folder / "unet", **({"max_shard_size": shard} if shard else {}))
    if variant:  # the fp16 variant beside the full weights, as most SD repos carry
        unet.half().save_pretrained(folder / "unet", variant="fp16")
        unet.float()
    vae.save_pretrained(folder / "vae")


@pytest.fixture()
def sd_hub(hub: Hub) -> Hub:  # noqa: F811
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4, sample_size=8)
    base = _unet(1)
    _pipeline(hub.root / "sd/base", base, vae, variant=True)
    # SD 1.5 / SDXL base repos also carry a single-file checkpoint under the original LDM names (here: the
    # UNet's tensors under model.diffusion_model., not a full conversion): the pipeline is what is read,
    # since the diffusers-format fine-tunes hold the pipeline's names
    save_file({f"model.diffusion_model.{n}": t.contiguous() for n, t in base.state_dict().items()},
              str(hub.root / "sd/base/v1-5-pruned-emaonly.safetensors"))
    _pipeline(hub.root / "lab/dreambooth", _unet(2, from_unet=base), vae)
    _pipeline(hub.root / "lab/sharded-ft", _unet(3, from_unet=base), vae, shard="200KB")
    _pipeline(hub.root / "other/scratch", _unet(4), vae)
    for month, repo in enumerate(("sd/base", "lab/dreambooth", "lab/sharded-ft", "other/scratch"), start=1):
        hub.repo(repo, month)
    return hub


def test_a_pipeline_is_one_repo_read_through_its_unet(sd_hub: Hub) -> None:
    assert [r for r, _ in discover_repos(sd_hub.root)] == ["lab/dreambooth", "lab/sharded-ft", "other/scratch", "sd/base"]
    assert (sd_hub.root / "lab/sharded-ft/unet/diffusion_pytorch_model.safetensors.index.json").is_file()
    forest = recover(sd_hub.root, Options(device="cpu"))
    assert not forest.failures()
    rows = {r.repo_id: r for r in forest.rows}
    assert rows["lab/dreambooth"].parent == "sd/base" and rows["lab/sharded-ft"].parent == "sd/base"
    assert rows["sd/base"].parent == "" and rows["other/scratch"].parent == ""


def test_pipelines_over_http_get_the_rows_of_the_folder(emu: HubEmulator, sd_hub: Hub, tmp_path: Path) -> None:  # noqa: F811
    home = tmp_path / "home"
    report = crawl(home, _options(emu)).as_dict()
    assert report["indexed"] == 4 and not report["failed"], report
    edges = {e.repo_id: e.parent for e in read_records(home, "edges")}  # type: ignore[union-attr]
    batch = {r.repo_id: r.parent for r in recover(sd_hub.root, Options(device="cpu")).rows}
    assert edges == batch and edges["lab/sharded-ft"] == "sd/base", (edges, batch)


def _single_file(path: Path, unet, vae, *, half: bool = True) -> None:  # noqa: ANN001
    """A community single-file checkpoint: the UNet under its original LDM names beside the autoencoder
    (first_stage_model.) and a text-encoder tensor (cond_stage_model.), in F16 as most are published."""
    from sketches.ldm import LDM_UNET, ldm_names

    ldm = ldm_names(unet.state_dict())
    state = {LDM_UNET + ldm[n]: t for n, t in unet.state_dict().items()}
    state |= {f"first_stage_model.{n}": t for n, t in vae.state_dict().items()}
    state["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.ones(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({n: (t.half() if half else t).contiguous() for n, t in state.items()}, str(path))


@pytest.fixture()
def ldm_hub(sd_hub: Hub) -> Hub:
    """Single-file fine-tunes among pipelines: one of the pipeline base (its F32 full file beside the F16
    pruned one), and a pipeline fine-tuned from that single file."""
    base = _unet(1)
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4, sample_size=8)
    photoreal = _unet(5, from_unet=base)
    _single_file(sd_hub.root / "civit/photoreal/photoreal_v1_pruned.safetensors", photoreal, vae)
    _single_file(sd_hub.root / "civit/photoreal/photoreal_v1_full.safetensors", photoreal, vae, half=False)
    _pipeline(sd_hub.root / "lab/photoreal-v2", _unet(6, from_unet=photoreal), vae)
    _single_file(sd_hub.root / "civit/scratch-single/model_v1.safetensors", _unet(7), vae)
    for month, repo in enumerate(("civit/photoreal", "lab/photoreal-v2", "civit/scratch-single"), start=5):
        sd_hub.repo(repo, month)
    return sd_hub


LDM_EXPECTED = {"lab/dreambooth": "sd/base", "lab/sharded-ft": "sd/base", "civit/photoreal": "sd/base",
                "lab/photoreal-v2": "civit/photoreal", "civit/scratch-single": "", "other/scratch": "", "sd/base": ""}


def test_single_file_checkpoints_join_their_pipeline_family(ldm_hub: Hub, emu: HubEmulator, tmp_path: Path) -> None:  # noqa: F811
    forest = recover(ldm_hub.root, Options(device="cpu"))
    assert not forest.failures()
    rows = {r.repo_id: r for r in forest.rows}
    assert {r: rows[r].parent for r in LDM_EXPECTED} == LDM_EXPECTED
    assert rows["civit/photoreal"].family == rows["sd/base"].family == rows["lab/photoreal-v2"].family
    home = tmp_path / "home"
    report = crawl(home, _options(emu)).as_dict()
    assert report["indexed"] == len(LDM_EXPECTED) and not report["failed"], report
    edges = {e.repo_id: e.parent for e in read_records(home, "edges")}  # type: ignore[union-attr]
    assert edges == LDM_EXPECTED, edges


def test_a_comfy_gguf_of_an_sd_unet_joins_its_pipeline_family(sd_hub: Hub, tmp_path: Path) -> None:
    """city96's SD 1.x / SDXL GGUFs hold the UNet under its LDM names (conv kernels flattened to rows of 256,
    their shapes in comfy.gguf.orig_shape.*): read under diffusers' names, a Q8_0 of the pipeline's UNet is its
    quantized copy. Before: skipped, "GGUF architecture 'sd1' has no Hugging Face name map"."""
    from indexer.zoo.quantize import write_comfy_gguf
    from sketches.ldm import LDM_UNET, ldm_names

    unet = _unet(1)  # sd/base's UNet
    ldm = ldm_names(unet.state_dict())
    state = {ldm[n]: t.numpy() for n, t in unet.state_dict().items()}
    (sd_hub.root / "city96/sd-gguf").mkdir(parents=True)
    write_comfy_gguf(sd_hub.root / "city96/sd-gguf/unet-Q8_0.gguf", state, "Q8_0", arch="sd1", prefix=LDM_UNET)
    sd_hub.repo("city96/sd-gguf", 9)
    forest = recover(sd_hub.root, Options(device="cpu"))
    assert not forest.failures()
    rows = {r.repo_id: r for r in forest.rows}
    assert (rows["city96/sd-gguf"].parent, rows["city96/sd-gguf"].relation) == ("sd/base", "quantized")
    assert rows["city96/sd-gguf"].family == rows["sd/base"].family
