"""torchao checkpoints as transformers' TorchAoConfig saves them (torchao's flatten_tensor_state_dict): written by
torchao itself, read by our range reader and checked against torchao's own dequantize.

torchao comes with the `quant` extra (`make test` installs it); where it does not import these tests skip.
Its Int4Tensor needs a CUDA kernel package to be made at all, so only the int8 and float8 subclasses are
written here; packed codes are refused by their dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch
from model_support import same_in_incremental_and_crawl
from safetensors.torch import save_file
from test_crawl_relations import (  # noqa: F401
    LLAMA_CONFIG,
    Hub,
    _options,
    emu,
    hub,
    llama_state,
    tuned,
)
from test_packed import _infos, gaussian, load, rel

from errors import QuantizedWeightsError
from indexer.readers import looks_packed
from sketches.packed import (
    PACKED_RELATIVE_ERROR,
    QuantScheme,
    detect_scheme,
    predicted_relative_error,
)
from store.tables import read_records

torchao = pytest.importorskip("torchao")
from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict  # noqa: E402
from torchao.quantization import (  # noqa: E402
    Float8WeightOnlyConfig,
    Int8WeightOnlyConfig,
    PerGroup,
    quantize_,
)

NAME = "model.layers.0.mlp.up_proj.weight"
CONFIGS = {"int8": (Int8WeightOnlyConfig, {}, "torchao-8bit"),
           "int8-g32": (Int8WeightOnlyConfig, {"granularity": PerGroup(32)}, "torchao-8bit"),
           "float8": (Float8WeightOnlyConfig, {}, "torchao-e4m3")}


def _quantized(w: np.ndarray, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, str], np.ndarray]:
    """One BF16 Linear holding `w` through torchao's quantize_: its flattened tensors and metadata, and
    torchao's own dequantization (float32)."""
    config_class, kwargs, _ = CONFIGS[kind]
    holder = torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.bfloat16))
    with torch.no_grad():
        holder[0].weight.copy_(torch.from_numpy(w))
    quantize_(holder, config_class(**kwargs))
    weight = holder[0].weight
    flat, meta = flatten_tensor_state_dict({NAME: weight})
    return flat, meta, weight.dequantize(torch.float32).numpy()


def _save(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt", **meta})
    return path / "model.safetensors"


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_decode_matches_torchao_dequantize(tmp_path: Path, kind: str) -> None:
    tensors, meta, reference = _quantized(gaussian(96, 256), kind)
    path = _save(tmp_path, tensors, meta)
    assert looks_packed(_infos(path))
    scheme, got = load(path, {"quantization_config": {"quant_method": "torchao", "quant_type": {}}})
    assert scheme.name == CONFIGS[kind][2]
    np.testing.assert_array_equal(got[NAME], reference)
    _, part = load(path, rows=(9, 61))  # only those rows read
    np.testing.assert_array_equal(part[NAME], reference[9:61])


def test_relative_error_table_for_torchao() -> None:
    """PACKED_RELATIVE_ERROR's torchao rows are what torchao's quantizer gives on N(0, 1) data (256 x 1024, seed 0,
    held in BF16 as transformers loads it)."""
    w = gaussian(256, 1024)
    assert sorted({c[2] for c in CONFIGS.values()}) == sorted(k for k in PACKED_RELATIVE_ERROR if k.startswith("torchao-"))
    for kind in ("int8", "float8"):
        _, _, reference = _quantized(w, kind)
        scheme = QuantScheme("torchao", 8, mode="e4m3" if kind == "float8" else "affine")
        assert rel(reference, w) == pytest.approx(predicted_relative_error(scheme), rel=0.05), kind


def test_packed_torchao_codes_are_refused_by_their_dtype(tmp_path: Path) -> None:
    """Int4Tensor's codes are bytes two to a value (or int32 tiles); they are refused, naming the tensor."""
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file({"model.layers.0.mlp.up_proj._weight_qdata": np.zeros((96, 128), np.uint8),
                                 "model.layers.0.mlp.up_proj._weight_scale": np.ones((2, 96), np.float32),
                                 "model.norm.weight": np.ones(64, np.float32)}, path)
    assert looks_packed(_infos(path))
    with pytest.raises(QuantizedWeightsError, match=r"up_proj._weight_qdata.*torchao codes stored as U8"):
        detect_scheme(_infos(path), {"quantization_config": {"quant_method": "torchao"}})


TRUTH = {"m/base": ("", ""), "m/child": ("m/base", "finetune"), "ao/child-int8": ("m/child", "quantized"),
         "ao/base-float8": ("m/base", "quantized")}


@pytest.fixture(scope="module")
def ao_hub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from indexer.zoo.quantize import write_torchao

    folder = Hub(tmp_path_factory.mktemp("ao") / "hub")
    folder.root.mkdir()
    base = llama_state(1)
    child = tuned(base, 2)
    folder.repo("m/base", 1, weights=base)
    folder.repo("m/child", 2, weights=child)
    write_torchao(folder.root / "ao/child-int8", child, LLAMA_CONFIG, kind="int8")
    folder.repo("ao/child-int8", 3)
    write_torchao(folder.root / "ao/base-float8", base, LLAMA_CONFIG, kind="float8")
    folder.repo("ao/base-float8", 4)
    return folder.root


def test_torchao_copies_are_quantized_children_in_batch_incremental_and_crawl(ao_hub: Path, tmp_path: Path) -> None:
    same_in_incremental_and_crawl(ao_hub, tmp_path, TRUTH, batch=True)
    models = {m.repo_id: m for m in read_records(tmp_path / "crawl", "models")}  # type: ignore[union-attr]
    assert models["ao/child-int8"].weights_format == "torchao"  # type: ignore[union-attr]
    assert json.loads(models["ao/base-float8"].details)["scheme"] == "torchao-e4m3"  # type: ignore[union-attr]
