"""optimum-quanto checkpoints (quantize + freeze, saved as quanto saves them): written by quanto itself, read
by our range reader and checked against quanto's own dequantize.

optimum-quanto comes with the `quant` extra (`make test` installs it); where it does not import these tests
skip. Checkpoints of FLUX.2 / Z-Image pipelines and their text encoders are published this way (int8).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_crawl_relations import (  # noqa: F401
    FFN,
    LLAMA_CONFIG,
    VOCAB,
    Hub,
    _options,
    emu,
    hub,
    llama_state,
    tuned,
)
from test_packed import _infos, gaussian, load, rel

from errors import QuantizedWeightsError
from indexer.crawl import crawl
from indexer.hub_emulator import HubEmulator
from indexer.lineage.methods import Options
from indexer.lineage.recover import recover
from indexer.readers import looks_packed
from sketches.packed import (
    PACKED_RELATIVE_ERROR,
    PackedModule,
    QuantScheme,
    dequantize,
    detect_scheme,
    packed_modules,
    predicted_relative_error,
)
from store.tables import read_records

quanto = pytest.importorskip("optimum.quanto")

PREFIX = "model.layers.0.mlp.up_proj"
# qtype -> our scheme name
FULL_CONFIG = LLAMA_CONFIG | {"num_hidden_layers": 2, "intermediate_size": FFN, "vocab_size": VOCAB}  # llama_state's
NAMES = {"qint8": "quanto-8bit", "qfloat8": "quanto-e4m3", "qfloat8_e5m2": "quanto-e5m2", "qint4": "quanto-4bit",
         "qint2": "quanto-2bit"}


def _linear(w: np.ndarray, qtype: str, *, bias: bool = True) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """One nn.Linear holding `w`, through quanto's quantize + freeze: its state dict as quanto serialises it
    (under PREFIX) and quanto's own dequantization of the weight (float32)."""
    layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(w))
    holder = torch.nn.Sequential(layer)  # quantize replaces a model's Linear children, so give it a parent
    quanto.quantize(holder, weights=getattr(quanto, qtype))
    quanto.freeze(holder)
    reference = holder[0].weight.dequantize().detach().float().numpy()
    return {f"{PREFIX}.{k[2:]}": v.detach().contiguous() for k, v in holder.state_dict().items()}, reference


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path / "model.safetensors"


@pytest.mark.parametrize("qtype", list(NAMES))
def test_decode_matches_quanto_dequantize(tmp_path: Path, qtype: str) -> None:
    w = gaussian(96, 384)  # 384 inputs: qint4 / qint2 cut each row into 3 groups of 128
    tensors, reference = _linear(w, qtype)
    path = _save(tmp_path, tensors)
    assert looks_packed(_infos(path))
    scheme, got = load(path)
    assert scheme.name == NAMES[qtype]
    np.testing.assert_array_equal(got[f"{PREFIX}.weight"], reference)
    _, part = load(path, rows=(7, 50))  # 8-bit: only those rows read; 4- and 2-bit: read whole, then cut
    np.testing.assert_array_equal(part[f"{PREFIX}.weight"], reference[7:50])


def test_packed_shape_from_the_row_or_the_bias(tmp_path: Path) -> None:
    """(out, in) of a 4-bit module is stored nowhere: a row of <= 128 inputs is one group; a longer row cut into
    groups needs the bias's length (or the architecture: below); without either it is refused, naming the module."""
    short, short_ref = _linear(gaussian(40, 100), "qint4", bias=False)  # one group a row, 100 wide
    scheme, got = load(_save(tmp_path / "short", short))
    assert got[f"{PREFIX}.weight"].shape == (40, 100)
    np.testing.assert_array_equal(got[f"{PREFIX}.weight"], short_ref)
    cut, _ = _linear(gaussian(40, 256), "qint4", bias=False)  # two groups of 128 a row: 80 x 128 or 40 x 256?
    with pytest.raises(QuantizedWeightsError, match=r"up_proj.*neither a bias nor the architecture"):
        packed_modules(_infos(_save(tmp_path / "cut", cut)), scheme)


def test_config_and_bad_modules_are_refused_in_one_line(tmp_path: Path) -> None:
    tensors, _ = _linear(gaussian(16, 64), "qint8")
    infos = _infos(_save(tmp_path / "ok", tensors))
    # diffusers' QuantoConfig writes quant_method "quanto" and its weights_dtype
    assert detect_scheme(infos, {"quantization_config": {"quant_method": "quanto", "weights_dtype": "int8"}}
                         ) == QuantScheme("quanto", 8)
    with pytest.raises(QuantizedWeightsError, match="quanto weights 'int3' is not supported"):
        detect_scheme(infos, {"quantization_config": {"quant_method": "quanto", "weights_dtype": "int3"}})
    bad = dict(tensors)
    bad[f"{PREFIX}.weight._scale"] = torch.ones(5, 1)  # neither one a row nor one
    with pytest.raises(QuantizedWeightsError, match="quanto scale .* is neither one per row"):
        load(_save(tmp_path / "bad-scale", bad))
    packed, _ = _linear(gaussian(16, 64), "qint4")
    del packed[f"{PREFIX}.weight._shift"]
    with pytest.raises(QuantizedWeightsError, match="need a 2-D .* scale and shift"):
        load(_save(tmp_path / "no-shift", packed))


def test_relative_error_table_for_quanto() -> None:
    """PACKED_RELATIVE_ERROR's quanto rows are what quanto's quantizer gives on N(0, 1) data (256 x 1024, seed 0)."""
    w = gaussian(256, 1024)
    assert sorted(NAMES.values()) == sorted(k for k in PACKED_RELATIVE_ERROR if k.startswith("quanto-"))
    for qtype, name in NAMES.items():
        tensors, reference = _linear(w, qtype)
        bits, mode = (8, {"qfloat8": "e4m3", "qfloat8_e5m2": "e5m2"}.get(qtype, "affine")) if "8" in qtype else (
            int(qtype[-1]), "affine")
        assert QuantScheme("quanto", bits, mode=mode).name == name
        assert rel(reference, w) == pytest.approx(predicted_relative_error(QuantScheme("quanto", bits, mode=mode)),
                                                  rel=0.05), name


def _biased(state: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """The llama state with a bias on every projection (InternLM's and Qwen's attention carry them)."""
    rng = np.random.default_rng(seed)
    return state | {n.replace(".weight", ".bias"): (0.02 * rng.standard_normal(w.shape[0])).astype(np.float32)
                    for n, w in state.items() if n.endswith("_proj.weight")}


def test_quanto_copies_are_quantized_children_in_batch(tmp_path: Path) -> None:
    from indexer.zoo.quantize import write_quanto

    folder = Hub(tmp_path / "hub")
    folder.root.mkdir()
    base = _biased(llama_state(1), 7)
    child = tuned(base, 2)
    folder.repo("m/base", 1, weights=base)
    folder.repo("m/child", 2, weights=child)
    copies = (("quanto/child-int8", "m/child", "qint8"), ("quanto/base-float8", "m/base", "qfloat8"),
              ("quanto/child-int4", "m/child", "qint4"))
    for month, (repo, source, qtype) in enumerate(copies, start=3):
        write_quanto(folder.root / repo, base if source == "m/base" else child, LLAMA_CONFIG, weights=qtype)
        folder.repo(repo, month)
    forest = recover(folder.root, Options(device="cpu"))
    assert not forest.failures()
    rows = {r.repo_id: r for r in forest.rows}
    for copy, source, _ in copies:
        assert (rows[copy].parent, rows[copy].relation) == (source, "quantized"), (copy, rows[copy])
    assert rows["m/child"].parent == "m/base" and rows["m/child"].relation == "finetune"


def test_quanto_copy_is_read_by_range_over_http_and_placed_as_a_leaf(emu: HubEmulator, hub: Hub,  # noqa: F811
                                                                     tmp_path: Path) -> None:
    from indexer.zoo.quantize import write_quanto

    base = llama_state(1)
    child = tuned(base, 3)
    hub.repo("meta/base", 1, weights=base)
    hub.repo("lab/child", 2, weights=child, card="base_model: meta/base")
    write_quanto(hub.root / "quanto/child-int8", child, LLAMA_CONFIG, weights="qint8")
    hub.repo("quanto/child-int8", 3)
    # 4-bit, no biases: the (out, in) of each projection from config.json's architecture, fetched by the crawl
    write_quanto(hub.root / "quanto/base-int4", base, FULL_CONFIG, weights="qint4")
    hub.repo("quanto/base-int4", 4)
    home = tmp_path / "home"
    report = crawl(home, _options(emu)).as_dict()
    assert report["indexed"] == 4 and not report["failed"], report
    models = {m.repo_id: m for m in read_records(home, "models")}  # type: ignore[union-attr]
    for repo, scheme in (("quanto/child-int8", "quanto-8bit"), ("quanto/base-int4", "quanto-4bit")):
        assert models[repo].weights_format == "quanto" and json.loads(models[repo].details)["scheme"] == scheme  # type: ignore[union-attr]
    edges = {e.repo_id: e for e in read_records(home, "edges")}  # type: ignore[union-attr]
    for repo, source in (("quanto/child-int8", "lab/child"), ("quanto/base-int4", "meta/base")):
        assert (edges[repo].parent, edges[repo].relation) == (source, "quantized")  # type: ignore[attr-defined]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_corrupt_quanto_parts_raise_only_our_error(data: st.DataObject) -> None:
    """Any shape or value corruption of a quanto module's tensors: a float32 result or a QuantizedWeightsError."""
    qtype = data.draw(st.sampled_from(list(NAMES)))
    tensors, _ = _linear(gaussian(8, 64), qtype, bias=False)
    roles = {".weight._data._data": "packed", ".weight._data": "data", ".weight._scale": "scale", ".weight._shift": "shift"}
    parts = {role: tensors[PREFIX + suffix].float().numpy() if tensors[PREFIX + suffix].dtype.is_floating_point
             else tensors[PREFIX + suffix].numpy() for suffix, role in roles.items() if PREFIX + suffix in tensors}
    role = data.draw(st.sampled_from(sorted(parts)))
    array = parts[role]
    how = data.draw(st.sampled_from(["truncate", "reshape", "values"]))
    if how == "truncate":
        parts[role] = array.reshape(-1)[: data.draw(st.integers(0, array.size - 1))]
    elif how == "reshape":
        parts[role] = array.reshape(-1)[:, None] if array.shape[1] != 1 else array.reshape(1, -1)
    else:
        flat = array.reshape(-1).copy()
        flat[data.draw(st.integers(0, flat.size - 1))] = data.draw(st.integers(0, 127)) if flat.dtype.kind in "iu" else np.nan
        parts[role] = flat.reshape(array.shape)
    bits = int(qtype[-1]) if qtype in ("qint4", "qint2") else 8
    try:
        out = dequantize(PackedModule(f"{PREFIX}.weight", {k: k for k in parts}, (8, 64)), parts,
                         QuantScheme("quanto", bits))
    except QuantizedWeightsError:
        return
    assert out.dtype == np.float32 and out.ndim == 2


def test_unbiased_llama_shapes_come_from_its_architecture(tmp_path: Path) -> None:
    """A Llama's projections have no bias and 64 / 128 inputs: their 4-bit groups could be whole rows or cut
    longer ones. transformers builds config.json's architecture on the meta device and says which; without a
    buildable architecture the module is refused, naming it."""
    from indexer.readers import linear_shapes
    from indexer.zoo.quantize import write_quanto

    state = llama_state(1)
    folder = write_quanto(tmp_path / "int4", state, FULL_CONFIG, weights="qint4")
    config = json.loads((folder / "config.json").read_text())
    shapes = linear_shapes(config)
    assert all(shapes[n] == state[n].shape for n in state if n.endswith("_proj.weight"))
    infos = _infos(folder / "model.safetensors")
    scheme = detect_scheme(infos, config)
    modules = packed_modules(infos, scheme, lambda: shapes)
    assert all(modules[n].shape == state[n].shape for n in modules)
    with pytest.raises(QuantizedWeightsError, match="neither a bias nor the architecture in config.json"):
        packed_modules(infos, scheme, lambda: linear_shapes({"architectures": ["NoSuchModel"]}))
    assert linear_shapes(config | {"num_hidden_layers": 10**9}) == {}  # never built: bounded
