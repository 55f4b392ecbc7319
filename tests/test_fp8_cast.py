"""F8 files without a scale (ComfyUI's and Kijai's `*_fp8_e4m3fn` / `*_fp8_e5m2` checkpoints: PyTorch's
`.to(torch.float8_e4m3fn)` of each weight, norms and some layers kept in 16 bits) and ComfyUI's scaled fp8
(`scale_weight` beside each weight, an empty `scaled_fp8` marker). Each is its source's `quantized` copy, in
batch, in the incremental index in both orders, and in the crawl; an equal F32 file stays a `duplicate`.

Before: any F8 tensor sent the file to the packed-quantization reader, which found no scale and failed it
("quantization markers but no scheme detected").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from model_support import same_in_incremental_and_crawl
from safetensors.torch import save_file
from test_crawl_relations import Hub, llama_state, tuned

from indexer.lineage.methods import Options, cast_dtype
from indexer.lineage.recover import recover
from indexer.readers import looks_packed
from indexer.zoo.quantize import comfy_fp8

KEPT = ("model.layers.1.mlp.down_proj.weight",)  # a layer the partial cast keeps in BF16, as ComfyUI keeps some


TRUTH = {"a/base": ("", ""), "b/child": ("a/base", "finetune"), "s/stranger": ("", ""),
         "c/child-fp8-e4m3fn": ("b/child", "quantized"), "c/base-fp8-e5m2": ("a/base", "quantized"),
         "c/child-fp8-partial": ("b/child", "quantized"), "c/child-fp8-scaled": ("b/child", "quantized"),
         "d/child-copy": ("b/child", "duplicate")}


@pytest.fixture(scope="module")
def fp8_hub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    hub = Hub(tmp_path_factory.mktemp("fp8") / "hub")
    hub.root.mkdir()
    base = llama_state(1)
    child = tuned(base, 2)
    hub.repo("a/base", 1, weights=base)
    hub.repo("b/child", 2, weights=child)
    hub.repo("s/stranger", 2, weights=llama_state(5))
    files = {"c/child-fp8-e4m3fn": comfy_fp8(child, "e4m3fn"), "c/base-fp8-e5m2": comfy_fp8(base, "e5m2"),
             "c/child-fp8-partial": comfy_fp8(child, "e4m3fn", kept=KEPT), "c/child-fp8-scaled": comfy_fp8(child, "scaled"),
             "d/child-copy": {n: torch.from_numpy(a) for n, a in child.items()}}
    for month, (repo, tensors) in enumerate(files.items(), start=3):
        save_file(tensors, str(hub.repo(repo, month) / "model.safetensors"))
    return hub.root


def _rows(recovered: object) -> dict[str, tuple[str, str]]:
    return {r.repo_id: (r.parent, r.relation) for r in recovered.rows}  # type: ignore[attr-defined]


def test_a_plain_cast_is_read_as_floats_and_a_scaled_one_as_fp8(fp8_hub: Path) -> None:
    from indexer.crawl import read_folder

    for repo, packed in (("c/child-fp8-e4m3fn", False), ("c/child-fp8-scaled", True)):
        read, _ = read_folder(fp8_hub / repo, budget=1 << 24)
        assert read.weights_format == ("fp8" if packed else "safetensors"), repo
        assert "scaled_fp8" not in read.tensors and not any(n.endswith("scale_weight") for n in read.tensors)
    child = {n: np.asarray(a) for n, a in llama_state(1).items()}
    narrowed = {n: t.float().numpy() for n, t in comfy_fp8(child, "e4m3fn").items() if t.ndim == 2}
    child = {n: a for n, a in child.items() if a.ndim == 2}
    assert cast_dtype(child, narrowed) == "F8_E4M3"
    assert cast_dtype(child, child) == ""  # equal files are no cast (a duplicate)
    f8 = type("T", (), {"dtype": "F8_E4M3", "shape": (4, 4)})()
    assert not looks_packed({"x.weight": f8})
    # a scale of a name we do not know beside F8 weights (Mistral's consolidated FP8): refused, never read as a cast
    assert looks_packed({"x.weight": f8, "x.qscale_weight": type("T", (), {"dtype": "F32", "shape": ()})()})


@pytest.mark.parametrize("use_time", [True, False])
def test_fp8_copies_are_quantized_leaves_in_batch(fp8_hub: Path, use_time: bool) -> None:
    forest = recover(fp8_hub, Options(device="cpu", use_time=use_time))
    assert not forest.failures()
    assert _rows(forest) == TRUTH


def test_fp8_copies_in_the_incremental_index_and_the_crawl(fp8_hub: Path, tmp_path: Path) -> None:
    same_in_incremental_and_crawl(fp8_hub, tmp_path, TRUTH)


def test_compare_says_which_side_is_a_cast(fp8_hub: Path) -> None:
    from indexer.lineage.compare import compare, load_local, render

    result = compare(load_local(fp8_hub / "b/child"), load_local(fp8_hub / "c/child-fp8-partial"))
    assert (result.cast_of, result.cast_dtype, result.direction) == ("B", "F8_E4M3", "A -> B")  # type: ignore[union-attr]
    assert "cast: B is A cast to F8_E4M3, bit for bit" in render(result)
    copy = compare(load_local(fp8_hub / "b/child"), load_local(fp8_hub / "d/child-copy"))
    assert copy.cast_of == "" and copy.direction == "duplicate"  # type: ignore[union-attr]
