"""MLX-quantized checkpoints (mlx-lm's layout): written by mlx itself, read by our range reader.

mlx installs on Linux with its `cpu` extra (`make test` installs it with the `quant` extra); where it does
not, these tests skip. Every file goes through mlx's own quantizer and safetensors writer, then real
safetensors bytes and our reader, like a checkpoint on the Hub; our decoder is checked against
`mlx.core.dequantize` bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
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
from indexer.crawl import crawl
from indexer.hub_emulator import HubEmulator
from indexer.lineage.methods import Options
from indexer.lineage.recover import recover
from indexer.readers import looks_packed
from sketches.experts import switch_views
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

mx = pytest.importorskip("mlx.core")

W = gaussian(96, 256)
AFFINE = [(bits, group) for bits in (2, 3, 4, 5, 6, 8) for group in (32, 64, 128)]


def _save(path: Path, tensors: dict, config: dict | None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), tensors, metadata={"format": "mlx"})
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return path / "model.safetensors"


def _quantized(w: np.ndarray, prefix: str = "model.layers.0.mlp.up_proj", **kw) -> tuple[dict, np.ndarray]:
    """{stored name: mlx array} of one module, and mlx's own dequantization of it in float32 (on the F16
    scales mlx computes in F16; we decode in float32, as every other scheme)."""
    parts = mx.quantize(mx.array(w).astype(mx.float16), **kw)
    names = (f"{prefix}.weight", f"{prefix}.scales", f"{prefix}.biases")
    wide = [parts[0], *(p if p.dtype == mx.uint8 else p.astype(mx.float32) for p in parts[1:])]
    reference = mx.dequantize(*wide, **kw).astype(mx.float32)
    return dict(zip(names, parts, strict=False)), np.array(reference)


@pytest.mark.parametrize("bits,group", AFFINE)
def test_affine_codes_match_mlx_dequantize_bit_for_bit(tmp_path: Path, bits: int, group: int) -> None:
    tensors, reference = _quantized(W, group_size=group, bits=bits)
    path = _save(tmp_path, tensors, {"quantization": {"group_size": group, "bits": bits}})
    scheme, got = load(path, json.loads((tmp_path / "config.json").read_text()))
    assert scheme == QuantScheme("mlx", bits, group)
    np.testing.assert_array_equal(got["model.layers.0.mlp.up_proj.weight"], reference)
    _, part = load(path, {"quantization": {"group_size": group, "bits": bits}}, rows=(5, 41))  # only those rows read
    np.testing.assert_array_equal(part["model.layers.0.mlp.up_proj.weight"], reference[5:41])


@pytest.mark.parametrize("mode", ["mxfp4", "mxfp8", "nvfp4"])
def test_microscaled_modes_match_mlx(tmp_path: Path, mode: str) -> None:
    tensors, reference = _quantized(W, mode=mode)
    config = {"quantization": {"group_size": {"nvfp4": 16}.get(mode, 32), "bits": 8 if mode == "mxfp8" else 4,
                               "mode": mode}}
    path = _save(tmp_path, tensors, config)
    scheme, got = load(path, config)
    assert scheme.name == f"mlx-{mode}" and "model.layers.0.mlp.up_proj.biases" not in _infos(path)
    np.testing.assert_array_equal(got["model.layers.0.mlp.up_proj.weight"], reference)
    _, part = load(path, config, rows=(90, 96))
    np.testing.assert_array_equal(part["model.layers.0.mlp.up_proj.weight"], reference[90:96])


def test_mixed_recipe_reads_each_module_at_its_own_bits(tmp_path: Path) -> None:
    """mlx-lm's mixed recipes keep some modules at more bits and say so per module path in the config."""
    low, low_ref = _quantized(W, "model.layers.0.self_attn.q_proj", group_size=64, bits=3)
    high, high_ref = _quantized(W, "model.layers.0.mlp.down_proj", group_size=64, bits=6)
    config = {"quantization": {"group_size": 64, "bits": 3, "model.layers.0.mlp.down_proj": {"group_size": 64, "bits": 6},
                               "model.layers.0.mlp.gate_proj": False}}
    path = _save(tmp_path, low | high | {"model.norm.weight": mx.ones((256,), dtype=mx.float16)}, config)
    scheme, got = load(path, config)
    np.testing.assert_array_equal(got["model.layers.0.self_attn.q_proj.weight"], low_ref)
    np.testing.assert_array_equal(got["model.layers.0.mlp.down_proj.weight"], high_ref)
    modules = packed_modules(_infos(path), scheme)
    assert modules["model.layers.0.mlp.down_proj.weight"].scheme == QuantScheme("mlx", 6, 64)
    assert modules["model.layers.0.self_attn.q_proj.weight"].scheme is None and modules[
        "model.layers.0.self_attn.q_proj.weight"].shape == (96, 256)
    # without the per-module entry the 6-bit words cannot hold 3-bit codes of that width: refused, named
    with pytest.raises(QuantizedWeightsError, match=r"mlp.down_proj.*do not hold 256 codes of 3 bits"):
        load(path, {"quantization": {"group_size": 64, "bits": 3}})


def test_mlx_weights_are_recognised_and_bad_configs_refused(tmp_path: Path) -> None:
    tensors, _ = _quantized(W, group_size=64, bits=4)
    path = _save(tmp_path, tensors, None)
    infos = _infos(path)
    assert looks_packed(infos)
    with pytest.raises(QuantizedWeightsError, match="config.json quantization.*no 'quantization'"):
        detect_scheme(infos, {"architectures": ["LlamaForCausalLM"]})
    for quantization, reason in (({"group_size": 64, "bits": 7}, "bits 7 is not one of"),
                                 ({"group_size": 48, "bits": 4}, "group_size 48 is not one of"),
                                 ({"bits": 4, "mode": "int3"}, "mode 'int3' is not supported"),
                                 ({"bits": 4, "x.q": 6}, "entry 'x.q' must be an object or false"),
                                 ("4bit", "must be a JSON object")):
        with pytest.raises(QuantizedWeightsError, match=reason):
            detect_scheme(infos, {"quantization": quantization})
    # mlx-lm >= 0.20 also writes the same object as quantization_config (no quant_method): read the same
    assert detect_scheme(infos, {"quantization_config": {"group_size": 64, "bits": 4}}) == QuantScheme("mlx", 4, 64)
    stacked = _save(tmp_path / "moe", {"switch_mlp.up_proj.weight": mx.zeros((2, 8, 32), dtype=mx.uint32),
                                       "switch_mlp.up_proj.scales": mx.zeros((2, 8, 4)),
                                       "switch_mlp.up_proj.biases": mx.zeros((2, 8, 4))}, None)
    # mlx-lm's stacked experts: a 3-D module is no module; split per expert (as every header reader does:
    # sketches.experts.switch_views) they are two, under the names every MoE layout reads as
    with pytest.raises(QuantizedWeightsError, match=r"are not \(out, words\) and \(out, groups\)"):
        packed_modules(_infos(stacked), QuantScheme("mlx", 4, 64))
    split = switch_views({n: ("f", i) for n, i in _infos(stacked).items()})
    modules = packed_modules({n: i for n, (_, i) in split.items()}, QuantScheme("mlx", 4, 64))
    assert sorted(modules) == ["experts.0.up_proj.weight", "experts.1.up_proj.weight"]
    assert {m.shape for m in modules.values()} == {(8, 256)}


def test_truncated_codes_raise_our_error() -> None:
    tensors, _ = _quantized(W[:8], "m", group_size=64, bits=4)
    parts = {"weight": np.array(tensors["m.weight"])[:, :5], "scales": np.array(tensors["m.scales"].astype(mx.float32)),
             "biases": np.array(tensors["m.biases"].astype(mx.float32))}
    with pytest.raises(QuantizedWeightsError, match="m.weight"):
        dequantize(PackedModule("m.weight", {k: k for k in parts}, (8, 256)), parts, QuantScheme("mlx", 4, 64))


def test_relative_error_table_for_mlx() -> None:
    """PACKED_RELATIVE_ERROR's mlx rows are what mlx's quantizer gives on N(0, 1) data (256 x 1024, seed 0)."""
    w = gaussian(256, 1024)
    rows = {name: scheme for name, scheme in (
        *((f"mlx-{b}bit", QuantScheme("mlx", b, 64)) for b in (1, 2, 3, 4, 5, 6, 8)),
        ("mlx-mxfp4", QuantScheme("mlx", 4, 32, mode="mxfp4")), ("mlx-mxfp8", QuantScheme("mlx", 8, 32, mode="mxfp8")),
        ("mlx-nvfp4", QuantScheme("mlx", 4, 16, mode="nvfp4")))}
    assert sorted(rows) == sorted(k for k in PACKED_RELATIVE_ERROR if k.startswith("mlx-"))
    for name, scheme in rows.items():
        kw = {"mode": scheme.mode} if scheme.mode != "affine" else {"group_size": 64, "bits": scheme.bits}
        _, reference = _quantized(w, **kw)
        assert scheme.name == name
        assert rel(reference, w) == pytest.approx(predicted_relative_error(scheme), rel=0.05), name


def test_mlx_copies_by_mlx_itself_are_quantized_children_in_batch(tmp_path: Path) -> None:
    from indexer.zoo.quantize import write_mlx

    folder = Hub(tmp_path / "hub")
    folder.root.mkdir()
    base = llama_state(1)
    child = tuned(base, 2)
    folder.repo("m/base", 1, weights=base)
    folder.repo("m/child", 2, weights=child)
    write_mlx(folder.root / "mlx-community/child-4bit", child, LLAMA_CONFIG)
    write_mlx(folder.root / "mlx-community/base-3bit-mixed", base, LLAMA_CONFIG, bits=3, group_size=32,
              module_bits={"model.layers.0.mlp.down_proj": 6, "lm_head": 6})
    write_mlx(folder.root / "mlx-community/child-mxfp4", child, LLAMA_CONFIG, group_size=32, mode="mxfp4")
    copies = (("mlx-community/child-4bit", "m/child"), ("mlx-community/base-3bit-mixed", "m/base"),
              ("mlx-community/child-mxfp4", "m/child"))
    for month, (repo, _) in enumerate(copies, start=3):
        folder.repo(repo, month)
    forest = recover(folder.root, Options(device="cpu"))
    assert not forest.failures()
    rows = {r.repo_id: r for r in forest.rows}
    for copy, source in copies:
        assert (rows[copy].parent, rows[copy].relation) == (source, "quantized"), (copy, rows[copy])
    assert rows["m/child"].parent == "m/base" and rows["m/child"].relation == "finetune"


def test_mlx_copy_is_read_by_range_over_http_and_placed_as_a_leaf(emu: HubEmulator, hub: Hub,  # noqa: F811
                                                                  tmp_path: Path) -> None:
    from indexer.zoo.quantize import write_mlx

    base = llama_state(1)
    child = tuned(base, 3)
    hub.repo("meta/base", 1, weights=base)
    hub.repo("lab/child", 2, weights=child, card="base_model: meta/base")
    write_mlx(hub.root / "mlx-community/child-4bit", child, LLAMA_CONFIG)
    hub.repo("mlx-community/child-4bit", 3, card="base_model: lab/child\nbase_model_relation: quantized")
    home = tmp_path / "home"
    report = crawl(home, _options(emu)).as_dict()
    assert report["indexed"] == 3 and not report["failed"], report
    models = {m.repo_id: m for m in read_records(home, "models")}  # type: ignore[union-attr]
    copy = models["mlx-community/child-4bit"]
    assert copy.weights_format == "mlx" and json.loads(copy.details)["scheme"] == "mlx-4bit"  # type: ignore[union-attr]
    edges = {e.repo_id: e for e in read_records(home, "edges")}  # type: ignore[union-attr]
    assert (edges["mlx-community/child-4bit"].parent, edges["mlx-community/child-4bit"].relation) == (  # type: ignore[attr-defined]
        "lab/child", "quantized")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_corrupt_mlx_parts_raise_only_our_error(data: st.DataObject) -> None:
    """Any shape or value corruption of an MLX module's tensors: a float32 result or a QuantizedWeightsError."""
    mode = data.draw(st.sampled_from(["affine", "mxfp4", "nvfp4"]))
    kw = {"group_size": 32, "bits": data.draw(st.sampled_from([3, 4, 8]))} if mode == "affine" else {"mode": mode}
    tensors, _ = _quantized(gaussian(8, 128), "m", **kw)
    parts = {name.rsplit(".", 1)[1]: np.array(a if a.dtype in (mx.uint32, mx.uint8) else a.astype(mx.float32))
             for name, a in tensors.items()}
    parts["weight"] = parts.pop("weight")
    role = data.draw(st.sampled_from(sorted(parts)))
    array = parts[role]
    how = data.draw(st.sampled_from(["truncate", "reshape", "values"]))
    if how == "truncate":
        parts[role] = array.reshape(-1)[: data.draw(st.integers(0, array.size - 1))]
    elif how == "reshape":
        parts[role] = array.reshape(-1)[:, None] if array.shape[1] != 1 else array.reshape(1, -1)
    else:
        flat = array.reshape(-1).copy()
        flat[data.draw(st.integers(0, flat.size - 1))] = data.draw(st.integers(0, 255)) if flat.dtype.kind == "u" else np.nan
        parts[role] = flat.reshape(array.shape)
    scheme = QuantScheme("mlx", kw.get("bits", 8 if mode == "mxfp8" else 4), kw.get("group_size", 16 if mode == "nvfp4" else 32),
                         mode=mode)  # type: ignore[arg-type]
    try:
        out = dequantize(PackedModule("m.weight", {k: k for k in parts}, (8, 128)), parts, scheme)
    except QuantizedWeightsError:
        return
    assert out.dtype == np.float32 and out.ndim == 2
