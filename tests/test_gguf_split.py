"""A gguf-split set (llama.cpp's gguf-split, `convert_hf_to_gguf.py --split-max-size`) is read as one model:
real shards from gguf-py's GGUFWriter(split_max_tensors=...), read from files, over HTTP from the Hub
emulator and from a local folder; the same family, plan and arrays as the model written as one file.

Before: one shard was picked and read alone, so a third of a model never joined its family (and a later
shard has no architecture at all)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from test_crawl_relations import HEADS, KV_HEADS, LLAMA_CONFIG, Hub, _options, emu, hub, llama_state, tuned  # noqa: F401

from errors import GGUFError
from indexer.crawl import IndexedModel, crawl, read_folder
from indexer.hub_emulator import HubEmulator
from indexer.readers import QuantizedRead, choose_gguf, gguf_candidates, read_gguf, read_gguf_split
from indexer.zoo.quantize import write_llama_gguf
from sketches.gguf import read_header
from sketches.safetensors import FileSource
from store.tables import read_records

SHARD_TENSORS = 7  # the tiny llama has 21 tensors: three shards
CARD = "base_model: lab/child\nbase_model_relation: quantized"


def shards(folder: Path, stem: str = "model-Q8_0") -> list[Path]:
    return sorted(folder.glob(f"{stem}-*-of-*.gguf"))


def write_split(folder: Path, state: dict[str, np.ndarray], qtype: str = "Q8_0") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    write_llama_gguf(folder / f"model-{qtype}.gguf", state, qtype, heads=HEADS, kv_heads=KV_HEADS,
                     split_max_tensors=SHARD_TENSORS)
    return shards(folder, f"model-{qtype}")


def patch_kv(path: Path, key: str, fmt: str, value: int) -> None:
    """Overwrite the value of metadata `key` (a scalar of struct format `fmt`) in place."""
    raw = path.read_bytes()
    at = raw.index(struct.pack("<Q", len(key)) + key.encode()) + 8 + len(key) + 4  # past the key and its type
    path.write_bytes(raw[:at] + struct.pack(fmt, value) + raw[at + struct.calcsize(fmt):])


def rename_tensor(path: Path, old: str, new: str) -> None:
    """Rename a tensor in its info (same length: every offset stays where it was)."""
    assert len(old) == len(new)
    raw = path.read_bytes()
    entry = struct.pack("<Q", len(old)) + old.encode()
    assert raw.count(entry) == 1
    path.write_bytes(raw.replace(entry, struct.pack("<Q", len(new)) + new.encode()))


def read_set(paths: list[Path], budget: int) -> tuple[QuantizedRead, list[FileSource]]:
    sources = [FileSource(p) for p in paths]
    try:
        return read_gguf_split(sources, budget=budget), sources
    finally:
        for source in sources:
            source.close()


# --- one model in N files == the same model in one file ---------------------------------------------------


@pytest.mark.parametrize("budget", [1 << 30, 2000])  # all of it; 15 rows of one tensor
def test_a_split_set_reads_exactly_as_the_same_model_in_one_file(tmp_path: Path, budget: int) -> None:
    state = llama_state(1)
    single = write_llama_gguf(tmp_path / "model-Q8_0.gguf", state, "Q8_0", heads=HEADS, kv_heads=KV_HEADS)
    paths = write_split(tmp_path / "split", state)
    assert [p.name for p in paths] == [f"model-Q8_0-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    with FileSource(single) as source:
        whole = read_gguf(source, budget=budget)
    split, sources = read_set(paths, budget)
    assert split.family == whole.family and split.plan == whole.plan and split.shapes == whole.shapes
    assert list(split.arrays) == list(whole.arrays) and split.quant == whole.quant
    for name, array in whole.arrays.items():
        np.testing.assert_array_equal(split.arrays[name], array, err_msg=name)
    assert split.details["split"] == {"files": 3} and "split" not in whole.details
    assert split.details["qtypes"] == whole.details["qtypes"] == {"F32": 5, "Q8_0": 16}
    assert split.details["architecture"] == "llama" and split.details["file"] == paths[0].name
    # every shard's header was read (each file is under the first read), and the sum is the header cost
    assert split.header_bytes == sum(p.stat().st_size for p in paths)
    if budget > 1 << 20:  # the whole model: every shard served blocks of its own, past its header read
        assert all(s.bytes_read > s.size for s in sources)


def test_later_shards_hold_no_model_metadata(tmp_path: Path) -> None:
    """What makes reading one shard alone wrong: only the first names the architecture and heads."""
    paths = write_split(tmp_path, llama_state(1))
    with FileSource(paths[0]) as first, FileSource(paths[2]) as last:
        assert read_header(first).architecture == "llama"
        meta = read_header(last).metadata
    assert meta == {"split.count": 3, "split.no": 2, "split.tensors.count": 21}


# --- choosing among a repo's GGUF files --------------------------------------------------------------------


def test_a_complete_set_is_one_candidate_ranked_by_its_stem() -> None:
    bf16 = [f"m-BF16-0000{i}-of-00002.gguf" for i in (1, 2)]
    assert choose_gguf([*bf16, "m-Q4_K_M.gguf", "README.md"]) == tuple(bf16)
    assert choose_gguf(["m-Q4_K_M.gguf", *bf16[::-1], "sub/m-F32.gguf"]) == tuple(bf16)  # in shard order
    assert choose_gguf(["m-Q2_K-00001-of-00002.gguf", "m-Q2_K-00002-of-00002.gguf", "m-Q8_0.gguf"]) == ("m-Q8_0.gguf",)


def test_a_multimodal_projector_is_never_the_model() -> None:
    """A vision-language GGUF repo holds its language model and llama.cpp's image encoder (`mmproj-*.gguf`,
    often F16 beside a Q4_K_M model): the projector outranked the model by its precision tag."""
    assert choose_gguf(["m-Q4_K_M.gguf", "mmproj-m-F16.gguf", "mmproj-F32.gguf"]) == ("m-Q4_K_M.gguf",)
    assert choose_gguf(["m-f16-mmproj.gguf", "m-Q8_0.gguf"]) == ("m-Q8_0.gguf",)
    assert choose_gguf(["mmproj-model-f16.gguf"]) is None


def _projector(path: Path, general_type: str = "mmproj") -> Path:
    """A llama.cpp multimodal projector file: clip architecture, general.type mmproj, one vision matrix."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_string("general.type", general_type)
    writer.add_tensor("v.blk.0.attn_q.weight", np.ones((8, 8), np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_projector_under_another_name_is_refused_by_its_type(tmp_path: Path) -> None:
    from errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="multimodal projector"), \
            FileSource(_projector(tmp_path / "vision-f16.gguf")) as source:
        read_gguf(source, budget=1 << 20)


def test_an_incomplete_set_is_no_candidate() -> None:
    gappy = ["m-BF16-00001-of-00003.gguf", "m-BF16-00003-of-00003.gguf"]
    assert choose_gguf([*gappy, "m-Q4_K_M.gguf"]) == ("m-Q4_K_M.gguf",)
    assert gguf_candidates([*gappy, "m-Q4_K_M.gguf"]) == ([("m-Q4_K_M.gguf",)], ["m-BF16-00002-of-00003.gguf"])
    assert choose_gguf(gappy) is None


# --- sets that are not one model -----------------------------------------------------------------------------


@pytest.mark.parametrize(("shard", "key", "fmt", "value", "reason"), [
    (1, "split.count", "<H", 4, "split.count is 4 but the set has 3 files"),
    (2, "split.no", "<H", 1, "split.no is 1 but this is file 3 of 3 (expected 2)"),
    (0, "split.tensors.count", "<i", 22, "split.tensors.count is 22 but the 3 shards hold 21 tensors"),
])
def test_a_shard_that_disagrees_is_named(tmp_path: Path, shard: int, key: str, fmt: str, value: int,
                                         reason: str) -> None:
    paths = write_split(tmp_path, llama_state(1))
    patch_kv(paths[shard], key, fmt, value)
    with pytest.raises(GGUFError) as info:
        read_set(paths, 1 << 30)
    assert info.value.thing == str(paths[shard]) and info.value.reason.startswith(reason)


def test_a_tensor_in_two_shards_is_named(tmp_path: Path) -> None:
    paths = write_split(tmp_path, llama_state(1))
    with FileSource(paths[0]) as first, FileSource(paths[1]) as second:
        here, there = read_header(first).names(), read_header(second).names()
    old, new = next((b, a) for a in here for b in there if len(a) == len(b))
    rename_tensor(paths[1], old, new)
    with pytest.raises(GGUFError) as info:
        read_set(paths, 1 << 30)
    assert info.value.thing == str(paths[1])
    assert info.value.reason.startswith(f"tensor {new!r} is also in {paths[0]}")


# --- over HTTP (the emulator) and from a local folder --------------------------------------------------------


def test_a_split_copy_is_crawled_into_its_family_as_the_single_file_copy_is(emu: HubEmulator, hub: Hub,  # noqa: F811
                                                                            tmp_path: Path) -> None:
    base = llama_state(1)
    child = tuned(base, 3)
    hub.repo("meta/base", 1, weights=base)
    (hub.root / "meta/base/config.json").write_text(json.dumps(LLAMA_CONFIG))
    hub.repo("lab/child", 2, weights=child, card="base_model: meta/base")
    one = hub.repo("q/child-Q8_0-GGUF", 3, card=CARD)
    write_llama_gguf(one / "model-Q8_0.gguf", child, "Q8_0", heads=HEADS, kv_heads=KV_HEADS)
    write_split(hub.repo("q/child-split-GGUF", 4, card=CARD), child)
    gappy = write_split(hub.repo("q/child-gappy-GGUF", 5, card=CARD), child)
    gappy[1].unlink()
    bad = write_split(hub.repo("q/child-bad-GGUF", 6, card=CARD), child)
    patch_kv(bad[2], "split.count", "<H", 2)
    vl = hub.repo("q/child-vl-GGUF", 7, card=CARD)  # a vision-language repo: the model and its projector
    write_llama_gguf(vl / "model-Q8_0.gguf", child, "Q8_0", heads=HEADS, kv_heads=KV_HEADS)
    _projector(vl / "mmproj-model-f16.gguf")
    _projector(hub.repo("q/projector-only-GGUF", 8, card=CARD) / "mmproj-model-f16.gguf")
    home = tmp_path / "home"
    report = crawl(home, _options(emu)).as_dict()
    assert report["indexed"] == 5 and report["skipped"] == {"gguf-incomplete": 1, "gguf-projector-only": 1}, report
    assert report["failed"] == {"gguf-invalid": 1}, report
    models = {m.repo_id: m for m in read_records(home, "models")}  # type: ignore[union-attr]
    assert "model-Q8_0-00002-of-00003.gguf" in models["q/child-gappy-GGUF"].reason  # type: ignore[union-attr]
    assert models["q/child-gappy-GGUF"].reason.startswith("gguf-incomplete:")  # type: ignore[union-attr]
    assert "model-Q8_0-00003-of-00003.gguf: split.count is 2" in models["q/child-bad-GGUF"].reason  # type: ignore[union-attr]
    split = models["q/child-split-GGUF"]
    assert split.weights_format == "gguf" and json.loads(split.details)["split"] == {"files": 3}  # type: ignore[union-attr]
    assert split.family == models["q/child-Q8_0-GGUF"].family == models["lab/child"].family  # type: ignore[union-attr]
    edges = {e.repo_id: e for e in read_records(home, "edges")}  # type: ignore[union-attr]
    placed = {r: (edges[r].parent, edges[r].relation) for r in ("q/child-split-GGUF", "q/child-Q8_0-GGUF",  # type: ignore[attr-defined]
                                                                 "q/child-vl-GGUF")}
    assert placed["q/child-split-GGUF"] == placed["q/child-Q8_0-GGUF"] == ("lab/child", "quantized"), placed
    assert placed["q/child-vl-GGUF"] == ("lab/child", "quantized"), placed
    assert json.loads(models["q/child-vl-GGUF"].details)["file"] == "model-Q8_0.gguf"  # type: ignore[union-attr]


def test_a_local_folder_reads_a_split_set_as_the_crawl_does(emu: HubEmulator, hub: Hub,  # noqa: F811
                                                            tmp_path: Path) -> None:
    folder = hub.repo("q/child-split-GGUF", 1, card=CARD)
    write_split(folder, tuned(llama_state(1), 3))
    seen: list[IndexedModel] = []
    options = _options(emu)
    assert crawl(tmp_path / "home", options, on_indexed=seen.append).as_dict()["indexed"] == 1
    local, entry = read_folder(folder, budget=options.budget)
    crawled = seen[0]
    assert entry.declared_base_model == "lab/child" and crawled.weights_format == local.weights_format == "gguf"
    assert (local.family, local.plan, local.quant) == (crawled.family, crawled.plan, crawled.quant)
    assert list(local.arrays) == list(crawled.arrays)
    for name, array in crawled.arrays.items():
        np.testing.assert_array_equal(local.arrays[name], array, err_msg=name)
    assert local.details["split"] == {"files": 3}
