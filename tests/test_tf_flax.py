"""TensorFlow-only and Flax-only repos (`tf_model.h5`, Keras 2's HDF5 weights; `flax_model.msgpack`, Flax's
serialized parameter tree): read without TensorFlow, JAX or Flax, under PyTorch's names and layout, so that
a Keras or Flax fine-tune of a PyTorch base joins its family (sketches.tfh5, sketches.flax)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from model_support import perturb_matrices

from indexer.crawl import crawl, read_folder
from indexer.hub_emulator import HubEmulator
from indexer.incremental.folder import ingest_folder
from indexer.lineage.methods import Options
from indexer.lineage.recover import recover
from sketches.tfh5 import pt_name
from store.tables import read_records

pytest.importorskip("transformers")


@pytest.mark.parametrize("tf_name, ndim, want", [
    # names as TFPreTrainedModel.save_pretrained writes them (transformers' own TF classes)
    ("tf_bert_for_sequence_classification/bert/encoder/layer_._0/attention/self/query/kernel:0", 2,
     ("bert.encoder.layer.0.attention.self.query.weight", (1, 0))),
    ("tf_bert_model/bert/embeddings/position_embeddings/embeddings:0", 2, ("bert.embeddings.position_embeddings.weight", None)),
    ("tf_bert_model/bert/embeddings/word_embeddings/weight:0", 2, ("bert.embeddings.word_embeddings.weight", None)),
    ("tf_distil_bert_model/distilbert/transformer/layer_._5/output_layer_norm/gamma:0", 1,
     ("distilbert.transformer.layer.5.output_layer_norm.weight", None)),
    ("tf_gpt2lm_head_model/transformer/h_._11/attn/c_attn/weight:0", 2, ("transformer.h.11.attn.c_attn.weight", None)),
    ("tf_vi_t_model/vit/embeddings/patch_embeddings/projection/kernel:0", 4,
     ("vit.embeddings.patch_embeddings.projection.weight", (3, 2, 0, 1))),
    ("final_logits_bias:0", 2, ("final_logits_bias", None)),  # BART's: one level, nothing dropped
])
def test_tf_names_map_as_transformers_loader_maps_them(tf_name: str, ndim: int, want: tuple[str, object]) -> None:
    assert pt_name(tf_name, ndim) == want


def _distilbert(seed: int):  # noqa: ANN202 -- a transformers model
    import torch
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(seed)
    config = DistilBertConfig(vocab_size=96, dim=64, n_layers=2, n_heads=2, hidden_dim=128,
                              max_position_embeddings=32, num_labels=3)
    return DistilBertForSequenceClassification(config)


def _pt(folder: Path, model: object) -> None:
    model.save_pretrained(folder)  # type: ignore[attr-defined]


def _tf(folder: Path, model: object) -> None:
    from indexer.zoo.twins import write_tf_h5

    folder.mkdir(parents=True, exist_ok=True)
    write_tf_h5(folder / "tf_model.h5", model)
    (folder / "config.json").write_text(json.dumps({"architectures": ["DistilBertForSequenceClassification"]}))


def _flax(folder: Path, model: object, dtype: str = "float32") -> None:
    from indexer.zoo.twins import write_flax_msgpack

    folder.mkdir(parents=True, exist_ok=True)
    write_flax_msgpack(folder / "flax_model.msgpack", model, dtype=dtype)
    (folder / "config.json").write_text(json.dumps({"architectures": ["DistilBertForSequenceClassification"]}))


@pytest.fixture(scope="module")
def tf_hub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PyTorch base and its TensorFlow relatives, with upload times: o/base-tf is the base re-saved by TF,
    lab/ft-tf a Keras fine-tune, lab/ft-tf-ft a PyTorch fine-tune of that, lab/old-tf a 2021-style repo
    with a pickle (never read, no bot PR) and its TF twin, x/stranger-tf another init."""
    import copy

    root = tmp_path_factory.mktemp("tf") / "hub"
    base = _distilbert(0)
    ft = perturb_matrices(copy.deepcopy(base), 0.05, seed=1)
    _pt(root / "o/base", base)
    _tf(root / "o/base-tf", base)
    _tf(root / "lab/ft-tf", ft)
    _pt(root / "lab/ft-tf-ft", perturb_matrices(copy.deepcopy(ft), 0.05, seed=2))
    _tf(root / "lab/old-tf", perturb_matrices(copy.deepcopy(base), 0.05, seed=3))
    (root / "lab/old-tf/pytorch_model.bin").write_bytes(b"\x80\x02 a pickle that must never be fetched")
    _tf(root / "x/stranger-tf", _distilbert(7))
    _flax(root / "sprint/ft-flax", perturb_matrices(copy.deepcopy(base), 0.05, seed=4))
    _flax(root / "sprint/ft-flax-bf16", perturb_matrices(copy.deepcopy(base), 0.05, seed=5), "bfloat16")
    order = ("o/base", "o/base-tf", "lab/ft-tf", "lab/ft-tf-ft", "lab/old-tf", "x/stranger-tf", "sprint/ft-flax",
             "sprint/ft-flax-bf16")
    (root / "hub.json").write_text(json.dumps({"version": 1, "repos": {
        r: {"createdAt": f"2023-05-0{i + 1}T00:00:00.000Z"} for i, r in enumerate(order)}}))
    return root


TRUTH = {"sprint/ft-flax": ("o/base", "finetune"), "sprint/ft-flax-bf16": ("o/base", "finetune"),
         "o/base": ("", ""), "o/base-tf": ("o/base", "duplicate"), "lab/ft-tf": ("o/base", "finetune"),
         "lab/ft-tf-ft": ("lab/ft-tf", "finetune"), "lab/old-tf": ("o/base", "finetune"), "x/stranger-tf": ("", "")}


def test_a_tf_file_reads_bit_for_bit_as_its_pytorch_twin(tf_hub: Path) -> None:
    """Kernels transposed back, LayerNorm gamma/beta and embeddings renamed: every tensor of the PyTorch
    save, under the same normalised name and shape, bit for bit; read in part, the first rows of each."""
    import h5py
    from safetensors import safe_open

    from sketches.tfh5 import TFWeights

    with h5py.File(tf_hub / "o/base-tf/tf_model.h5") as f:  # the names TF's save_pretrained writes
        stored = [n.decode() for n in f["distilbert"].attrs["weight_names"]]
    assert "tf_distil_bert_for_sequence_classification/distilbert/transformer/layer_._0/attention/q_lin/kernel:0" in stored
    with TFWeights(tf_hub / "o/base-tf/tf_model.h5") as weights, \
            safe_open(str(tf_hub / "o/base/model.safetensors"), "np") as saved:
        assert set(weights.tensors()) == set(saved.keys())  # PyTorch's own names, before any normalising
    tf, _ = read_folder(tf_hub / "o/base-tf", budget=64 << 20)
    pt, _ = read_folder(tf_hub / "o/base", budget=64 << 20)
    assert tf.weights_format == "tf-h5" and tf.family == pt.family
    assert set(tf.arrays) == set(pt.arrays)
    for name, array in pt.arrays.items():
        assert np.array_equal(tf.arrays[name], array), name
    part, _ = read_folder(tf_hub / "o/base-tf", budget=4 << 10)  # a kernel's first rows: its first columns
    assert not all(b.whole for b in part.plan.blocks)
    for block in part.plan.blocks:
        r0, r1 = block.rows
        assert np.array_equal(part.arrays[block.tensor], pt.arrays[block.tensor][r0:r1]), block.tensor


def test_rows_of_a_tensor_stored_untransposed_are_read_by_range_alone(tf_hub: Path) -> None:
    from sketches.safetensors import FileSource
    from sketches.tfh5 import open_checkpoint, read_tensor

    pt, _ = read_folder(tf_hub / "o/base", budget=64 << 20)
    source = FileSource(tf_hub / "o/base-tf/tf_model.h5")
    with open_checkpoint(source) as (handle, tensors):
        table = tensors["distilbert.embeddings.position_embeddings.weight"]
        assert table.axes is None and table.offset is not None
        before = source.bytes_read
        rows = read_tensor(source, handle, table, (3, 7))
        assert source.bytes_read - before == 4 * 64 * 4  # 4 rows of 64 float32: nothing else read
    assert np.array_equal(rows, pt.arrays["embeddings.position_embeddings.weight"][3:7])


def _rows(recovered: object) -> dict[str, tuple[str, str]]:
    return {r.repo_id: (r.parent, r.relation) for r in recovered.rows}  # type: ignore[attr-defined]


def test_tf_relatives_join_their_pytorch_family_in_batch_and_incremental(tf_hub: Path, tmp_path: Path) -> None:
    batch = _rows(recover(tf_hub, Options(device="cpu")))
    assert batch == TRUTH
    report = ingest_folder(tmp_path / "home", tf_hub, device="cpu")
    assert not report.failed
    assert {r: (e.parent, e.relation) for r, e in report.edges.items()} == TRUTH


def test_the_crawl_reads_tf_repos_by_range_over_http_and_never_fetches_the_pickle(tf_hub: Path, tmp_path: Path) -> None:
    from test_crawl_relations import _options

    with HubEmulator(tf_hub) as emu:
        report = crawl(tmp_path / "home", _options(emu)).as_dict()
        paths = [r.path for r in emu.requests()]
    assert report["indexed"] == 8, report
    assert not any(p.endswith("pytorch_model.bin") for p in paths)
    models = {m.repo_id: m for m in read_records(tmp_path / "home", "models")}  # type: ignore[union-attr]
    assert json.loads(models["lab/ft-tf"].details)["framework"] == "tensorflow"
    edges = {e.repo_id: (e.parent, e.relation) for e in read_records(tmp_path / "home", "edges")}  # type: ignore[union-attr]
    assert edges == TRUTH


@pytest.mark.parametrize("content, words", [
    (b"not an HDF5 file at all" * 100, "not an HDF5 file"),
    ("no-layer-names", "no 'layer_names' attribute: not a Keras HDF5 weights file"),
    ("missing-weight", "is listed but not stored"),
    ("text", "is not a number type"),
])
def test_a_bad_tf_file_is_a_recorded_failure_naming_it(tmp_path: Path, content: object, words: str) -> None:
    import h5py

    repo = tmp_path / "hub/lab/bad-tf"
    repo.mkdir(parents=True)
    path = repo / "tf_model.h5"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        with h5py.File(path, "w") as f:  # HDF5, but not in Keras' layout
            if content == "no-layer-names":
                f["x"] = np.zeros((4, 4), dtype=np.float32)
            else:
                f.attrs["layer_names"] = np.array([b"dense"])
                group = f.create_group("dense")
                group.attrs["weight_names"] = np.array([b"m/dense/kernel:0"])
                if content == "text":
                    group.create_dataset("m/dense/kernel:0", data=np.array([b"abc", b"def"]))
    with HubEmulator(tmp_path / "hub") as emu:
        from test_crawl_relations import _options

        report = crawl(tmp_path / "home", _options(emu)).as_dict()
    models = {m.repo_id: m for m in read_records(tmp_path / "home", "models")}  # type: ignore[union-attr]
    assert report["indexed"] == 0
    reason = models["lab/bad-tf"].reason
    assert models["lab/bad-tf"].status == "failed" and reason.startswith("tf-invalid: ")
    assert "tf_model.h5" in reason and words in reason, reason


def test_a_tf_file_with_a_nan_is_a_recorded_failure(tmp_path: Path) -> None:
    import torch

    model = _distilbert(3)
    with torch.no_grad():
        model.distilbert.transformer.layer[0].attention.q_lin.weight[0, 0] = float("nan")
    _tf(tmp_path / "hub/lab/nan-tf", model)
    with HubEmulator(tmp_path / "hub") as emu:
        from test_crawl_relations import _options

        crawl(tmp_path / "home", _options(emu))
    (model_row,) = read_records(tmp_path / "home", "models")
    assert model_row.status == "failed" and model_row.reason.startswith("non-finite")  # type: ignore[union-attr]
    assert "q_lin" in model_row.reason  # type: ignore[union-attr]


@pytest.mark.parametrize("path, ndim, want", [
    # the parameter paths FlaxPreTrainedModel.save_pretrained writes (transformers' own Flax classes)
    (("bert", "encoder", "layer", "0", "attention", "self", "query", "kernel"), 2,
     ("bert.encoder.layer.0.attention.self.query.weight", (1, 0))),
    (("bert", "embeddings", "word_embeddings", "embedding"), 2, ("bert.embeddings.word_embeddings.weight", None)),
    (("bert", "embeddings", "LayerNorm", "scale"), 1, ("bert.embeddings.LayerNorm.weight", None)),
    (("transformer", "h", "11", "attn", "c_attn", "kernel"), 2, ("transformer.h.11.attn.c_attn.weight", (1, 0))),
    (("vit", "embeddings", "patch_embeddings", "projection", "kernel"), 4,
     ("vit.embeddings.patch_embeddings.projection.weight", (3, 2, 0, 1))),
    (("batch_stats", "resnet", "embedder", "embedder", "normalization", "mean"), 1,
     ("resnet.embedder.embedder.normalization.running_mean", None)),
])
def test_flax_paths_map_as_transformers_loader_maps_them(path: tuple[str, ...], ndim: int, want: tuple[str, object]) -> None:
    from sketches.flax import pt_name as flax_name

    assert flax_name(path, ndim) == want


def test_a_flax_file_reads_bit_for_bit_as_its_pytorch_twin(tmp_path: Path) -> None:
    """DistilBERT (Linear kernels) and GPT-2 (Conv1D, a tied head kept once): every tensor of the PyTorch
    save under PyTorch's own names, bit for bit; a BF16 file to BF16's rounding; rows read by range alone."""
    from safetensors import safe_open
    from transformers import GPT2Config, GPT2LMHeadModel

    from sketches.flax import FlaxWeights

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=32, n_embd=64, n_layer=2, n_head=2))
    for name, model in (("distilbert", _distilbert(0)), ("gpt2", gpt2)):
        model.save_pretrained(tmp_path / f"{name}-pt")
        _flax(tmp_path / f"{name}-flax", model)
        with FlaxWeights(tmp_path / f"{name}-flax/flax_model.msgpack") as weights, \
                safe_open(str(tmp_path / f"{name}-pt/model.safetensors"), "np") as saved:
            assert set(weights.tensors()) == set(saved.keys()), name
            for key in saved.keys():
                assert np.array_equal(weights.read(key), saved.get_tensor(key)), key
            table = next(k for k in saved.keys() if k.endswith("position_embeddings.weight") or k.endswith("wpe.weight"))
            before = weights.bytes_read
            assert np.array_equal(weights.read(table, rows=(2, 5)), saved.get_tensor(table)[2:5])
            assert weights.bytes_read - before == 3 * 64 * 4
    _flax(tmp_path / "bf16", _distilbert(0), "bfloat16")
    got, _ = read_folder(tmp_path / "bf16", budget=64 << 20)
    pt, _ = read_folder(tmp_path / "distilbert-pt", budget=64 << 20)
    import torch

    for name, array in got.arrays.items():
        rounded = torch.from_numpy(pt.arrays[name]).to(torch.bfloat16).to(torch.float32).numpy()
        assert np.array_equal(array, rounded), name


@pytest.mark.parametrize("content, words", [
    (b"\x00\x01 not msgpack", "not a map of parameters"),
    ("ext", "a msgpack extension of type 2, not an ndarray"),
    ("chunked", "a chunked array (a tensor over 1 GiB): not read"),
    ("truncated", "truncated at byte"),
    ("text", "element type 'str32' is not a number type"),
])
def test_a_bad_flax_file_is_a_recorded_failure_naming_it(tmp_path: Path, content: object, words: str) -> None:
    import msgpack

    def arr(shape: tuple[int, ...], dtype: str = "float32") -> msgpack.ExtType:
        data = np.zeros(shape, dtype=dtype if dtype != "str32" else "<U1")
        return msgpack.ExtType(1, msgpack.packb((shape, dtype, data.tobytes()), use_bin_type=True))

    repo = tmp_path / "hub/sprint/bad-flax"
    repo.mkdir(parents=True)
    if isinstance(content, bytes):
        raw = content
    elif content == "ext":
        raw = msgpack.packb({"dense": {"kernel": msgpack.ExtType(2, b"abc")}}, use_bin_type=True)
    elif content == "chunked":
        raw = msgpack.packb({"embed": {"embedding": {"__msgpack_chunked_array__": True, "shape": [2, 2]}}}, use_bin_type=True)
    elif content == "truncated":
        raw = msgpack.packb({"dense": {"kernel": arr((8, 8))}}, use_bin_type=True)[:-20]
    else:
        raw = msgpack.packb({"dense": {"kernel": arr((2,), "str32")}}, use_bin_type=True)
    (repo / "flax_model.msgpack").write_bytes(raw)
    from test_crawl_relations import _options

    with HubEmulator(tmp_path / "hub") as emu:
        crawl(tmp_path / "home", _options(emu))
    (row,) = read_records(tmp_path / "home", "models")
    assert row.status == "failed" and row.reason.startswith("flax-invalid: ")  # type: ignore[union-attr]
    assert "flax_model.msgpack" in row.reason and words in row.reason, row.reason  # type: ignore[union-attr]
