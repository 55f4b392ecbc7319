"""Single-file SD checkpoints (LDM names) read under diffusers' UNet names (sketches.ldm), checked against
diffusers' own converter (`convert_ldm_unet_checkpoint`), which is an independent implementation: it must
turn our LDM names back into exactly the UNet's state-dict names."""

from __future__ import annotations

import pytest

from sketches.layers import canonical_tensors
from sketches.ldm import LDM_UNET, ldm_names, unet_names
from sketches.safetensors import TensorInfo

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: E402

SMALL = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "cross_attention_dim": 32, "attention_head_dim": 8,
         "norm_num_groups": 8}
# SD 1.x / 2.x: attentions in every level but the last, two resnets a level; SDXL: no attention in the
# first level, deeper transformers, the text-time embedding (label_emb); plus a one-resnet SD-like layout
LAYOUTS = {
    "sd": {**SMALL, "layers_per_block": 2, "block_out_channels": (32, 32, 64),
           "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
           "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")},
    "sd-one": {**SMALL, "layers_per_block": 1, "block_out_channels": (32, 64),
               "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
               "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")},
    "sdxl": {**SMALL, "layers_per_block": 2, "block_out_channels": (32, 32, 64),
             "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
             "transformer_layers_per_block": (1, 2, 2), "use_linear_projection": True,
             "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
             "projection_class_embeddings_input_dim": 32 + 6 * 8},
}


def _unet(layout: str):  # noqa: ANN202
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(**LAYOUTS[layout])


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_our_ldm_names_are_what_diffusers_converts_back(layout: str) -> None:
    unet = _unet(layout)
    names = sorted(unet.state_dict())
    back = ldm_names(names)
    assert sorted(back) == names  # every UNet tensor has an LDM name, and no two share one
    assert len(set(back.values())) == len(names)
    checkpoint = {LDM_UNET + back[n]: n for n in names}  # each LDM name holds the diffusers name it should get
    converted = convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))
    assert converted == {n: n for n in names}
    assert unet_names(checkpoint) == {ldm: n for ldm, n in checkpoint.items()}  # and ours reads them back alike


def test_a_single_file_checkpoint_reads_its_unet_only_under_diffusers_names() -> None:
    unet = _unet("sdxl")
    back = ldm_names(unet.state_dict())
    infos = {LDM_UNET + back[n]: TensorInfo(LDM_UNET + back[n], "F16", tuple(t.shape), 0, 0)
             for n, t in unet.state_dict().items()}
    infos |= {name: TensorInfo(name, "F16", (8, 8), 0, 0) for name in (  # the VAE and the text encoders
        "first_stage_model.encoder.conv_in.weight", "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight")}
    assert canonical_tensors(infos) == {n: LDM_UNET + back[n] for n in unet.state_dict()}


def test_names_that_are_not_an_ldm_unet_are_left_alone() -> None:
    # diffusers names under the LDM prefix (a partial conversion), and an LDM-like list that breaks the
    # structure (a level with fewer resnets): nothing is renamed or dropped
    unet = _unet("sd-one")
    partial = {LDM_UNET + n: n for n in unet.state_dict()}
    assert unet_names(partial) == {}
    back = ldm_names(_unet("sd").state_dict())
    broken = [LDM_UNET + v for v in back.values() if not v.startswith("input_blocks.2.")]
    assert unet_names(broken) == {}
    assert ldm_names(["encoder.layer.0.attention.self.query.weight"]) == {}
