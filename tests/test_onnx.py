"""ONNX-only repos (transformers.js' `onnx/model*.onnx`, optimum's `model.onnx`): read without onnx, under
PyTorch's names and layout, so that an export joins its source's family: a full-precision export is a
duplicate of its source, an F16 export a dtype copy, onnxruntime's 8-bit exports quantized copies
(sketches.onnx). The files are written by the real tools: PyTorch's exporter, onnxruntime's float16 converter
and dynamic quantizer (indexer.zoo.onnx_export)."""

from __future__ import annotations

import copy
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
from store.tables import read_records

pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _bert(seed: int):  # noqa: ANN202 -- a transformers model
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=32, num_labels=3)
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():  # norms and biases off their init values: an export keeps one copy of equal constants
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape))
    return model


def _state(model: object) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    state = {n: t.detach().numpy().copy() for n, t in model.state_dict().items()}  # type: ignore[attr-defined]
    config = model.config.to_dict() | {"architectures": [type(model).__name__]}  # type: ignore[attr-defined]
    return state, config


def _pt(folder: Path, model: object) -> None:
    model.save_pretrained(folder)  # type: ignore[attr-defined]


def _onnx(folder: Path, model: object, *variants: str) -> None:
    from indexer.zoo.onnx_export import write_onnx

    for variant in variants:
        write_onnx(folder, *_state(model), variant=variant)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def onnx_hub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PyTorch base and its ONNX relatives, with upload times: Xenova/base is transformers.js' repo of the
    base (model.onnx, model_fp16.onnx, model_quantized.onnx: the full-precision one is read), q/base-fp16 and
    q/base-int8 hold one export each, lab/ft-onnx is optimum's top-level export of a fine-tune and
    lab/ft-onnx-ft a PyTorch fine-tune of that, big/ft-external an export with its weights in model.onnx_data,
    x/stranger-onnx another init."""
    root = tmp_path_factory.mktemp("onnx") / "hub"
    base = _bert(0)
    ft = perturb_matrices(copy.deepcopy(base), 0.05, seed=1)
    _pt(root / "o/base", base)
    _onnx(root / "Xenova/base", base, "fp32", "fp16", "uint8")
    _onnx(root / "q/base-fp16", base, "fp16")
    _onnx(root / "q/base-int8", base, "int8")
    _onnx(root / "q/base-q4", base, "q4")
    _onnx(root / "lab/ft-onnx", ft, "fp32")
    (root / "lab/ft-onnx/onnx/model.onnx").rename(root / "lab/ft-onnx/model.onnx")  # optimum: at the top
    (root / "lab/ft-onnx/onnx").rmdir()
    _pt(root / "lab/ft-onnx-ft", perturb_matrices(copy.deepcopy(ft), 0.05, seed=2))
    _onnx(root / "big/ft-external", perturb_matrices(copy.deepcopy(base), 0.05, seed=3), "external")
    _onnx(root / "x/stranger-onnx", _bert(7), "fp32")
    order = ("o/base", "Xenova/base", "q/base-fp16", "q/base-int8", "q/base-q4", "lab/ft-onnx", "lab/ft-onnx-ft",
             "big/ft-external", "x/stranger-onnx")
    (root / "hub.json").write_text(json.dumps({"version": 1, "repos": {
        r: {"createdAt": f"2023-05-0{i + 1}T00:00:00.000Z"} for i, r in enumerate(order)}}))
    return root


TRUTH = {"o/base": ("", ""), "Xenova/base": ("o/base", "duplicate"), "q/base-fp16": ("o/base", "quantized"),
         "q/base-int8": ("o/base", "quantized"), "q/base-q4": ("o/base", "quantized"), "lab/ft-onnx": ("o/base", "finetune"),
         "lab/ft-onnx-ft": ("lab/ft-onnx", "finetune"), "big/ft-external": ("o/base", "finetune"),
         "x/stranger-onnx": ("", "")}


@pytest.mark.parametrize("files, want", [
    (["onnx/model_q4.onnx", "onnx/model_quantized.onnx", "onnx/model.onnx", "onnx/model_fp16.onnx"], "onnx/model.onnx"),
    (["onnx/model_q4f16.onnx", "onnx/model_uint8.onnx", "onnx/model_int8.onnx"], "onnx/model_int8.onnx"),
    (["model.onnx", "onnx/model.onnx"], "model.onnx"),
    # an older optimum's decoder-only export (Xenova/gpt2): the decoder is the whole model
    (["onnx/decoder_model.onnx", "onnx/decoder_model_merged.onnx", "onnx/decoder_with_past_model.onnx"],
     "onnx/decoder_model.onnx"),
    # a 4-bit copy only: transformers.js' q4 (MatMulNBits) is read, bnb4 (NF4) is not
    (["onnx/model_q4.onnx", "onnx/model_bnb4.onnx"], "onnx/model_q4.onnx"),
    (["onnx/model_q4f16.onnx", "onnx/model_bnb4.onnx"], "onnx/model_q4f16.onnx"),
    # an encoder-decoder's halves, an NF4 copy only: nothing read (the crawl says why)
    (["onnx/encoder_model.onnx", "onnx/decoder_model.onnx"], None),
    (["onnx/model_bnb4.onnx"], None),
])
def test_the_file_read_of_an_onnx_repo(files: list[str], want: str | None) -> None:
    from sketches.onnx import choose_onnx

    assert choose_onnx(files) == want


def test_an_export_reads_bit_for_bit_as_its_pytorch_twin(onnx_hub: Path) -> None:
    """Anonymous transposed MatMul weights named from their node and transposed back, named parameters as
    they are: every tensor of the PyTorch save, bit for bit; in part, the first rows of each."""
    from sketches.onnx import OnnxWeights

    model = onnx.load(str(onnx_hub / "Xenova/base/onnx/model.onnx"))  # the real library, as an oracle
    anonymous = [i.name for i in model.graph.initializer if i.name.startswith("onnx::MatMul")]
    assert len(anonymous) == 12  # 6 Linear weights a layer folded into transposed constants
    with OnnxWeights(onnx_hub / "Xenova/base/onnx/model.onnx") as weights:
        state = _bert(0).state_dict()
        assert set(weights.tensors()) == set(state) - {"bert.embeddings.position_ids"}
        for name in weights.tensors():
            assert np.array_equal(weights.read(name), state[name].numpy()), name
    onnx_read, _ = read_folder(onnx_hub / "Xenova/base", budget=64 << 20)
    pt, _ = read_folder(onnx_hub / "o/base", budget=64 << 20)
    assert onnx_read.weights_format == "onnx" and onnx_read.family == pt.family
    assert onnx_read.details["file"] == "model.onnx"  # the full-precision file of the three
    assert set(onnx_read.arrays) == set(pt.arrays)
    for name, array in pt.arrays.items():
        assert np.array_equal(onnx_read.arrays[name], array), name
    part, _ = read_folder(onnx_hub / "Xenova/base", budget=4 << 10)
    assert not all(b.whole for b in part.plan.blocks)
    for block in part.plan.blocks:
        r0, r1 = block.rows
        assert np.array_equal(part.arrays[block.tensor], pt.arrays[block.tensor][r0:r1]), block.tensor


def test_an_8bit_export_is_dequantized_within_the_error_its_scales_predict(onnx_hub: Path) -> None:
    pt, _ = read_folder(onnx_hub / "o/base", budget=64 << 20)
    q, _ = read_folder(onnx_hub / "q/base-int8", budget=64 << 20)
    # int8 per-channel MatMul weights; the quantizer writes the embeddings (Gather) as uint8 per tensor
    assert q.quant is not None and q.quant.scheme == "onnx-int8+uint8" and q.weights_format == "onnx"
    assert set(q.arrays) == set(pt.arrays)
    num = sum(float(np.square(q.arrays[n] - a).sum()) for n, a in pt.arrays.items())
    den = sum(float(np.square(a).sum()) for a in pt.arrays.values())
    measured = (num / den) ** 0.5
    assert 0 < measured < 3 * q.quant.predicted_error, (measured, q.quant.predicted_error)


def test_a_4bit_block_export_dequantizes_as_onnxruntime_runs_it(onnx_hub: Path) -> None:
    """MatMulNBits' codes, scales and zero points, read by range, against onnxruntime's own kernel: the node
    run alone on the identity gives the dequantized (K, N) weight."""
    import onnxruntime
    from onnx import helper

    from sketches.onnx import OnnxWeights

    path = onnx_hub / "q/base-q4/onnx/model_q4.onnx"
    model = onnx.load(str(path))
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 12  # every Linear of the two layers; the classifier is a Gemm and stays float
    inits = {i.name: i for i in model.graph.initializer}
    with OnnxWeights(path) as weights:
        assert weights.quantized
        for node in nodes[:3]:
            attrs = {a.name: a.i for a in node.attribute}
            graph = helper.make_graph(
                [helper.make_node("MatMulNBits", ["A", *node.input[1:]], ["Y"], domain="com.microsoft", **attrs)], "one",
                [helper.make_tensor_value_info("A", onnx.TensorProto.FLOAT, [attrs["K"], attrs["K"]])],
                [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [attrs["K"], attrs["N"]])],
                [inits[i] for i in node.input[1:] if i])
            one = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
            session = onnxruntime.InferenceSession(one.SerializeToString(), providers=["CPUExecutionProvider"])
            (kernel,) = session.run(None, {"A": np.eye(attrs["K"], dtype=np.float32)})
            name = node.name.removeprefix("/").rsplit("/", 1)[0].replace("/", ".") + ".weight"
            np.testing.assert_allclose(weights.read(name), kernel.T, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(weights.read(name, rows=(5, 9)), kernel.T[5:9], rtol=1e-6, atol=1e-7)
    pt, _ = read_folder(onnx_hub / "o/base", budget=64 << 20)
    q, _ = read_folder(onnx_hub / "q/base-q4", budget=64 << 20)
    assert q.quant is not None and q.quant.scheme == "onnx-int4-b32" and q.family == pt.family
    num = sum(float(np.square(q.arrays[n] - a).sum()) for n, a in pt.arrays.items())
    den = sum(float(np.square(a).sum()) for a in pt.arrays.values())
    assert 0.5 * q.quant.predicted_error < (num / den) ** 0.5 < 1.5 * q.quant.predicted_error


def _rows(recovered: object) -> dict[str, tuple[str, str]]:
    return {r.repo_id: (r.parent, r.relation) for r in recovered.rows}  # type: ignore[attr-defined]


def test_exports_join_their_pytorch_family_in_batch_and_incremental(onnx_hub: Path, tmp_path: Path) -> None:
    assert _rows(recover(onnx_hub, Options(device="cpu"))) == TRUTH
    report = ingest_folder(tmp_path / "home", onnx_hub, device="cpu")
    assert not report.failed
    assert {r: (e.parent, e.relation) for r, e in report.edges.items()} == TRUTH


def test_the_crawl_reads_onnx_repos_by_range_over_http(onnx_hub: Path, tmp_path: Path) -> None:
    from test_crawl_relations import _options

    with HubEmulator(onnx_hub) as emu:
        report = crawl(tmp_path / "home", _options(emu)).as_dict()
        paths = [r.path for r in emu.requests()]
    assert report["indexed"] == 9, report
    assert not any("model_fp16" in p or "model_quantized" in p for p in paths if "Xenova" in p)
    models = {m.repo_id: m for m in read_records(tmp_path / "home", "models")}  # type: ignore[union-attr]
    assert json.loads(models["big/ft-external"].details)["framework"] == "onnx"
    edges = {e.repo_id: (e.parent, e.relation) for e in read_records(tmp_path / "home", "edges")}  # type: ignore[union-attr]
    assert edges == TRUTH


def _bad_repo(root: Path, name: str, data: bytes) -> None:
    folder = root / "hub/lab" / name / "onnx"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(data)


def _edited(source: Path, edit: object) -> bytes:
    model = onnx.load(str(source))
    edit(model)  # type: ignore[operator]
    return model.SerializeToString()


def _nan(model: object) -> None:
    from onnx import numpy_helper

    init = next(i for i in model.graph.initializer if i.name.startswith("onnx::MatMul"))  # type: ignore[attr-defined]
    values = numpy_helper.to_array(init).copy()
    values[0, 0] = np.nan
    init.CopyFrom(numpy_helper.from_array(values, init.name))


def _escape(model: object) -> None:
    init = model.graph.initializer[0]  # type: ignore[attr-defined]
    init.ClearField("raw_data")
    init.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "../../secret.bin"), ("offset", "0"), ("length", "4")):
        entry = init.external_data.add()
        entry.key, entry.value = key, value


def test_a_weight_of_a_type_not_decoded_is_left_out_and_counted(onnx_hub: Path, tmp_path: Path) -> None:
    """A QDQ int4 or float8 weight (element types 17-28) is skipped, not taken for a refusal of the model."""
    from sketches.onnx import read_index
    from sketches.safetensors import FileSource

    def int4(model: object) -> None:
        init = next(i for i in model.graph.initializer if i.name.startswith("onnx::MatMul"))  # type: ignore[attr-defined]
        init.data_type = onnx.TensorProto.INT4

    path = tmp_path / "model.onnx"
    path.write_bytes(_edited(onnx_hub / "Xenova/base/onnx/model.onnx", int4))
    tensors, details = read_index(FileSource(path))
    assert details["skipped"] == {"undecoded": 1} and len(tensors) == 40


def test_bad_onnx_files_are_recorded_failures_naming_them(onnx_hub: Path, tmp_path: Path) -> None:
    """Not protobuf, truncated, a NaN, an external file outside the repo: each a failed row with one line
    naming the file and why; an encoder / decoder export (several graphs) is skipped with its reason; the
    good repo beside them is indexed."""
    from test_crawl_relations import _options

    good = onnx_hub / "Xenova/base/onnx/model.onnx"
    whole = good.read_bytes()
    _bad_repo(tmp_path, "garbage", b"\xff" * 4096)
    _bad_repo(tmp_path, "truncated", whole[: len(whole) // 2])
    _bad_repo(tmp_path, "nan", _edited(good, _nan))
    _bad_repo(tmp_path, "escape", _edited(good, _escape))
    (tmp_path / "hub/lab/seq2seq/onnx").mkdir(parents=True)
    (tmp_path / "hub/lab/seq2seq/onnx/encoder_model.onnx").write_bytes(whole)
    (tmp_path / "hub/lab/ok/onnx").mkdir(parents=True)
    (tmp_path / "hub/lab/ok/onnx/model.onnx").write_bytes(whole)
    with HubEmulator(tmp_path / "hub") as emu:
        crawl(tmp_path / "home", _options(emu))
    rows = {m.repo_id: m for m in read_records(tmp_path / "home", "models")}  # type: ignore[union-attr]
    assert rows["lab/ok"].status == "indexed"
    for name, words in (("garbage", "onnx-invalid"), ("truncated", "truncated"), ("nan", "non-finite"),
                        ("escape", "not a file beside the model")):
        row = rows[f"lab/{name}"]
        assert row.status == "failed" and words in row.reason, (name, row.reason)
        assert "\n" not in row.reason
    assert rows["lab/seq2seq"].status == "skipped" and "onnx-unsupported" in rows["lab/seq2seq"].reason


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, ...]:
    """A tiny export, its 8-bit and its 4-bit block copy, as bytes (the fuzz test's seeds)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1,
                                                     num_attention_heads=1, intermediate_size=8,
                                                     max_position_embeddings=8, num_labels=2)).eval()
    root = tmp_path_factory.mktemp("small")
    _onnx(root / "plain", model, "fp32")
    _onnx(root / "q8", model, "uint8")
    _onnx(root / "q4", model, "q4")
    return tuple((root / f).read_bytes() for f in ("plain/onnx/model.onnx", "q8/onnx/model_quantized.onnx",
                                                    "q4/onnx/model_q4.onnx"))


def test_a_corrupted_onnx_file_is_a_typed_error_or_reads(small_onnx: tuple[bytes, ...], tmp_path: Path) -> None:
    """Random byte edits of a real export (lengths, tags, dims, names, values): the reader returns tensors or
    raises its own one-line error; never another exception, never a read past the file."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from errors import SafetensorsError
    from sketches.onnx import read_index, read_onnx_tensor
    from sketches.safetensors import FileSource

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(which=st.integers(0, 2), edits=st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(0, 255)),
                                                   min_size=1, max_size=6), cut=st.integers(0, 1 << 30))
    def check(which: int, edits: list[tuple[int, int]], cut: int) -> None:
        data = bytearray(small_onnx[which])
        for at, value in edits:
            data[at % len(data)] = value
        path = tmp_path / "model.onnx"
        path.write_bytes(bytes(data[: max(1, len(data) - cut % 64)]))
        source = FileSource(path)
        try:
            tensors, _ = read_index(source, lambda loc: FileSource(tmp_path / "missing"))
            for tensor in tensors.values():
                if tensor.location is None:
                    read_onnx_tensor(source, tensor)
        except SafetensorsError as exc:
            assert "\n" not in str(exc)
        finally:
            source.close()

    assert b"MatMulNBits" in small_onnx[2]
    check()


@pytest.mark.parametrize("node, want", [
    ("/bert/encoder/layer.0/attention/self/query/MatMul", "bert.encoder.layer.0.attention.self.query"),
    # a called nn.Sequential is a scope of its own: /layer/layer.0/ is PyTorch's layer.0
    ("/resnet/encoder/stages.0/layers.0/layer/layer.1/convolution/Conv", "resnet.encoder.stages.0.layers.0.layer.1.convolution"),
    ("/model.0/conv/Conv", "model.0.conv"),  # ultralytics' names
    ("MatMul_12", None), ("/MatMul", None),
])
def test_a_node_names_the_module_of_its_weight(node: str, want: str | None) -> None:
    from sketches.onnx import module_path

    assert module_path(node) == want


def test_a_conv_export_with_batchnorm_folded_in_joins_its_pytorch_family(tmp_path: Path) -> None:
    """PyTorch's exporter folds each BatchNorm into the Conv before it: an anonymous kernel, each output filter
    scaled by gamma / sqrt(var + eps), no BatchNorm tensors. Named from its node, it shares its source's
    conv kernels up to those scales, which the pair rule's unit filters remove: the export of the base hangs
    under the base (distance at float rounding), a fine-tune's export under the base too, batch and
    incremental."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    base = ResNetForImageClassification(ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                                     num_labels=3, image_size=32)).eval()
    with torch.no_grad():  # trained-looking batch statistics: the fold scales each filter differently
        for name, buf in base.named_buffers():
            if name.endswith("running_var"):
                buf.copy_(0.5 + torch.rand(buf.shape))
    ft = perturb_matrices(copy.deepcopy(base), 0.05, seed=1)
    with torch.no_grad():
        for p in ft.parameters():
            if p.ndim == 4:
                p.add_(0.05 * p.std() * torch.randn(p.shape))
    root = tmp_path / "hub"
    _pt(root / "o/base", base)
    _onnx(root / "Xenova/base", base, "fp32")
    _onnx(root / "lab/ft-onnx", ft, "fp32")
    (root / "hub.json").write_text(json.dumps({"version": 1, "repos": {
        r: {"createdAt": f"2023-05-0{i + 1}T00:00:00.000Z"} for i, r in enumerate(("o/base", "Xenova/base", "lab/ft-onnx"))}}))
    want = {"o/base": "", "Xenova/base": "o/base", "lab/ft-onnx": "o/base"}
    batch = recover(root, Options(device="cpu"))
    assert {r.repo_id: r.parent for r in batch.rows} == want
    assert len({r.family for r in batch.rows}) == 1
    report = ingest_folder(tmp_path / "home", root, device="cpu")
    assert {r: e.parent for r, e in report.edges.items()} == want


def test_a_4bit_block_weight_that_does_not_fit_is_refused_and_act_order_is_left_out(onnx_hub: Path, tmp_path: Path) -> None:
    from sketches.onnx import OnnxWeightsError, read_index
    from sketches.safetensors import FileSource

    source = onnx_hub / "q/base-q4/onnx/model_q4.onnx"

    def wrong_n(model: object) -> None:
        node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")  # type: ignore[attr-defined]
        next(a for a in node.attribute if a.name == "N").i += 1

    def act_order(model: object) -> None:  # a g_idx input: blocks are not runs of consecutive inputs
        from onnx import numpy_helper

        node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")  # type: ignore[attr-defined]
        model.graph.initializer.append(numpy_helper.from_array(np.zeros(64, np.int32), "g_idx"))  # type: ignore[attr-defined]
        while len(node.input) < 4:
            node.input.append("")
        node.input.append("g_idx")

    path = tmp_path / "model_q4.onnx"
    path.write_bytes(_edited(source, wrong_n))
    with pytest.raises(OnnxWeightsError, match=r"MatMulNBits K=64 N=65 bits=4 block_size=32"):
        read_index(FileSource(path))
    path.write_bytes(_edited(source, act_order))
    tensors, details = read_index(FileSource(path))
    assert details["skipped"] == {"undecoded": 1} and len(tensors) == 40
