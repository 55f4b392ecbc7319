"""LoRA files without an adapter_config.json -- the Hub's Stable Diffusion LoRAs, written by diffusers
(`save_lora_weights`: unet.<module>.lora.down / .lora.up) and in kohya's layout (diffusers'
`convert_state_dict_to_kohya`: lora_unet_<module>.lora_down / .lora_up / .alpha) -- are adapters of the
base their model card names, placed and chained in batch and in the crawl alike. Before, each was read as
a model of its own family (its factors its "weights"), and independent LoRAs drawn from one seed tested
related to each other: fine-tunes of one another."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file
from test_crawl_relations import Hub, _options, emu, hub  # noqa: F401
from test_diffusers import _unet, sd_hub  # noqa: F401

from indexer.crawl import crawl
from indexer.hub_emulator import HubEmulator
from indexer.lineage.methods import Options
from indexer.lineage.recover import recover
from sketches.adapter import AdapterConfig, lora_updates, loose_layout
from sketches.ldm import ldm_names
from store.tables import read_records

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _peft_state(seed: int, *, start: dict | None = None, step: float = 0.02) -> dict:
    """PEFT's LoRA state of the base UNet (_unet(1)): A as PEFT draws it, B random (a trained update), or
    `start` moved by a small step (the same run trained further)."""
    from peft.utils import get_peft_model_state_dict

    unet = _unet(1)
    torch.manual_seed(seed)
    unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" not in name:
                continue
            if start is not None:
                key = name.replace(".default", "")
                p.copy_(start[key] + step * start[key].std() * torch.randn(p.shape, generator=gen))
            elif "lora_B" in name:
                p.normal_(0, 0.05, generator=gen)
    return {n: t.detach().clone() for n, t in get_peft_model_state_dict(unet).items()}


def _diffusers_file(folder: Path, state: dict) -> None:
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers

    diffusers.StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=convert_state_dict_to_diffusers(state))


def _kohya_file(folder: Path, state: dict, name: str, *, alpha_times: float = 1.0) -> None:
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    kohya = convert_state_dict_to_kohya({f"unet.{n}": t for n, t in state.items()})
    kohya = {n: (t * alpha_times if n.endswith(".alpha") else t).contiguous() for n, t in kohya.items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(kohya, str(folder / f"{name}.safetensors"))


def _lycoris_loha(folder: Path, seed: int) -> None:
    """A LoHa in LyCORIS's file layout (lora_unet_<module>.hada_w1_a ... and .alpha): PEFT's LoHa factors of
    the base UNet under kohya's flattened names (the lycoris package is not a dependency)."""
    from peft.utils import get_peft_model_state_dict

    unet = _unet(1)
    torch.manual_seed(seed)
    unet.add_adapter(peft.LoHaConfig(r=4, alpha=4, target_modules=TARGETS))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "hada_" in name:
                p.normal_(0, 0.1, generator=gen)
    out = {}
    for name, t in get_peft_model_state_dict(unet).items():
        module, _, role = name.rpartition(".")
        flat = "lora_unet_" + module.replace(".", "_")
        out[f"{flat}.{role}"] = t.contiguous()
        out[f"{flat}.alpha"] = torch.tensor(4.0)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(out, str(folder / "loha.safetensors"))


def _flat_module(name: str) -> str:
    return name.removesuffix(".weight").replace(".", "_")


def _module_renamed(name: str, flat: dict[str, str]) -> str:
    """A kohya name (lora_unet_<module>.<role>) with its module renamed by `flat`."""
    module, _, role = name.removeprefix("lora_unet_").partition(".")
    return f"lora_unet_{flat[module]}.{role}" if module in flat else name


@pytest.fixture()
def lora_hub(sd_hub: Hub) -> Hub:  # noqa: F811
    first = _peft_state(20)
    _diffusers_file(sd_hub.root / "l/pixel-art", _peft_state(21))
    _kohya_file(sd_hub.root / "l/pixel-art", _peft_state(21), "pixel_art_kohya")  # the same adapter, twice
    _kohya_file(sd_hub.root / "l/watercolor", first, "watercolor")
    _kohya_file(sd_hub.root / "l/watercolor-v2", _peft_state(20, start=first), "watercolor_v2")
    _kohya_file(sd_hub.root / "l/no-card", _peft_state(22), "style")
    # kohya's SDXL files name the original checkpoint's modules (input_blocks_4_1_...), not diffusers'
    _kohya_file(sd_hub.root / "l/ldm-names", _peft_state(23), "ldm")
    ldm = sd_hub.root / "l/ldm-names/ldm.safetensors"
    from safetensors.torch import load_file

    flat = {_flat_module(n): _flat_module(old) for n, old in ldm_names(_unet(1).state_dict()).items()}
    save_file({_module_renamed(n, flat): t for n, t in load_file(str(ldm)).items()}, str(ldm))
    # names of no UNet layout at all: the adapter's base is unknown, not incompatible
    _kohya_file(sd_hub.root / "l/odd-names", _peft_state(25), "odd")
    odd = sd_hub.root / "l/odd-names/odd.safetensors"
    save_file({n.replace("lora_unet_down_blocks_", "lora_unet_input_blocks_").replace("lora_unet_up_blocks_", "lora_unet_output_blocks_")
               .replace("lora_unet_mid_block_", "lora_unet_middle_block_"): t
               for n, t in load_file(str(odd)).items()}, str(odd))
    _lycoris_loha(sd_hub.root / "l/loha", 24)
    bad = sd_hub.root / "l/tucker"
    bad.mkdir(parents=True)
    save_file({"lora_unet_down_blocks_0_resnets_0_conv1.hada_t1": torch.zeros(4, 4, 3, 3),
               "lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a": torch.zeros(4, 4)}, str(bad / "tucker.safetensors"))
    for month, repo in enumerate(("l/pixel-art", "l/watercolor", "l/watercolor-v2", "l/no-card", "l/loha", "l/ldm-names",
                                  "l/tucker", "l/odd-names"), start=5):
        sd_hub.repo(repo, month, card=None if repo == "l/no-card" else "base_model: sd/base")
    return sd_hub


EXPECTED = {"l/pixel-art": ("sd/base", "adapter"), "l/watercolor": ("sd/base", "adapter"),
            "l/watercolor-v2": ("l/watercolor", "adapter"), "l/ldm-names": ("sd/base", "adapter"),
            "l/loha": ("sd/base", "adapter"), "l/odd-names": ("sd/base", "adapter")}
FAILED = {"l/no-card": "names no base_model", "l/tucker": "Tucker core"}


def test_kohya_and_diffusers_files_give_peft_updates() -> None:
    """Both layouts give back PEFT's update s B A per UNet weight, kohya's alpha setting s = alpha / r."""
    state = _peft_state(30)
    peft_updates = lora_updates(AdapterConfig("x", "LORA", 4, 4, ()), {n: t.numpy() for n, t in state.items()})
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya

    diffusers_state = {f"unet.{n}": t.numpy() for n, t in convert_state_dict_to_diffusers(state).items()}
    kohya_state = {n: t.numpy() * (2.0 if n.endswith(".alpha") else 1.0)
                   for n, t in convert_state_dict_to_kohya({f"unet.{n}": t for n, t in state.items()}).items()}
    assert loose_layout(diffusers_state) == "diffusers" and loose_layout(kohya_state) == "kohya"
    from_diffusers = lora_updates(AdapterConfig("x", "LORA", 4, 4.0, (), layout="diffusers"), diffusers_state)
    from_kohya = lora_updates(AdapterConfig("x", "LORA", 4, 4.0, (), layout="kohya"), kohya_state)
    assert sorted(from_diffusers) == sorted(peft_updates) and len(from_kohya) == len(peft_updates)
    for weight, u in peft_updates.items():
        np.testing.assert_allclose(from_diffusers[weight].dense(), u.dense(), rtol=1e-6)
        flat = weight.removesuffix(".weight").replace(".", "_") + ".weight"
        np.testing.assert_allclose(from_kohya[flat].dense(), 2.0 * u.dense(), rtol=1e-6)  # alpha = 2 r
    assert loose_layout({"model.layers.0.q.weight": np.zeros(2)}) is None  # a model is not a LoRA file
    # nor is one holding a name LyCORIS uses, beside its own
    assert loose_layout({"model.layers.0.q.weight": np.zeros(2), "model.x.oft_r": np.zeros(2)}) is None


def test_lora_files_are_adapters_of_their_card_base_in_batch_and_over_http(lora_hub: Hub, emu: HubEmulator,  # noqa: F811
                                                                           tmp_path: Path) -> None:
    forest = recover(lora_hub.root, Options(device="cpu"))
    rows = {r.repo_id: r for r in forest.rows}
    for repo, (parent, relation) in EXPECTED.items():
        assert (rows[repo].parent, rows[repo].relation) == (parent, relation), repo
    assert rows["l/pixel-art"].confidence == 1.0 and rows["l/watercolor"].confidence == 1.0  # names fit the UNet
    assert rows["l/ldm-names"].confidence == 1.0  # its LDM names resolve to the diffusers UNet's (sketches.ldm)
    assert rows["l/odd-names"].confidence == 0.5  # none of its names is the UNet's: unknown, not incompatible
    assert rows["l/loha"].confidence == 1.0
    assert rows["l/pixel-art"].family == rows["sd/base"].family
    failed = {r.repo_id: r.reason for r in forest.failures()}
    assert set(failed) == set(FAILED)
    for repo, words in FAILED.items():
        assert words in failed[repo], failed[repo]
    home = tmp_path / "home"
    crawl(home, _options(emu))
    edges = {e.repo_id: e for e in read_records(home, "edges")}  # type: ignore[union-attr]
    for repo in EXPECTED:
        e = edges[repo]
        assert (e.parent, e.relation) == (rows[repo].parent, rows[repo].relation), repo
        assert e.confidence == pytest.approx(rows[repo].confidence), repo
    models = {m.repo_id: m for m in read_records(home, "models")}  # type: ignore[union-attr]
    assert models["l/watercolor"].weights_format == "adapter" and "Tucker core" in models["l/tucker"].reason
    assert "names no base_model" in models["l/no-card"].reason
    from safetensors.numpy import load_file as load_numpy

    one_file = sum(n.endswith("lora.down.weight") for n in load_numpy(str(lora_hub.root / "l/pixel-art/pytorch_lora_weights.safetensors")))
    assert json.loads(models["l/pixel-art"].details)["lora_pairs"] == one_file  # one of its two files read
