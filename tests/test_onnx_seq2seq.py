"""Encoder-decoder ONNX exports (t5, bart, marian, whisper as transformers.js and optimum publish them): an
`encoder_model.onnx` whose weights are named inside the encoder and a `decoder_model.onnx` (or optimum's
`decoder_model_merged.onnx`, the decoder inside the two branches of an If) named inside the whole model, read
as one model (sketches.onnx.choose_onnx_files, join_halves). Written by PyTorch's exporter as optimum runs it
(indexer.zoo.onnx_export.write_seq2seq_onnx; its names were checked against optimum-onnx's own exports)."""

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

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")


def _trained_looking(model):  # noqa: ANN001, ANN202 -- a transformers model
    """Every parameter off its init value: an export keeps one copy of equal constants (norms all 1)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape))
    return model


def _t5():  # noqa: ANN202 -- a transformers model
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return _trained_looking(T5ForConditionalGeneration(T5Config(
        vocab_size=96, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2, pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0)))


def _bart(seed: int):  # noqa: ANN202 -- a transformers model
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    return _trained_looking(BartForConditionalGeneration(BartConfig(
        vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)))


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PyTorch sources and their exports: x/t5-onnx (encoder + decoder), x/bart-onnx (encoder + merged
    decoder), lab/bart-ft a PyTorch fine-tune of the BART and x/bart-ft-onnx its export, x/stranger-onnx
    another init's export."""
    from indexer.zoo.onnx_export import write_seq2seq_onnx

    root = tmp_path_factory.mktemp("s2s") / "hub"
    t5, bart = _t5(), _bart(0)
    ft = perturb_matrices(copy.deepcopy(bart), 0.05, 2)
    t5.save_pretrained(root / "o/t5")
    bart.save_pretrained(root / "o/bart")
    ft.save_pretrained(root / "lab/bart-ft")
    write_seq2seq_onnx(root / "x/t5-onnx", t5)
    write_seq2seq_onnx(root / "x/bart-onnx", bart, merged=True)
    write_seq2seq_onnx(root / "x/bart-ft-onnx", ft)
    write_seq2seq_onnx(root / "x/stranger-onnx", _bart(7))
    order = ("o/t5", "o/bart", "x/t5-onnx", "x/bart-onnx", "lab/bart-ft", "x/bart-ft-onnx", "x/stranger-onnx")
    (root / "hub.json").write_text(json.dumps({"version": 1, "repos": {
        r: {"createdAt": f"2024-02-0{i + 1}T00:00:00.000Z"} for i, r in enumerate(order)}}))
    return root


TRUTH = {"o/t5": ("", ""), "o/bart": ("", ""), "x/t5-onnx": ("o/t5", "duplicate"),
         "x/bart-onnx": ("o/bart", "duplicate"), "lab/bart-ft": ("o/bart", "finetune"),
         "x/bart-ft-onnx": ("lab/bart-ft", "duplicate"), "x/stranger-onnx": ("", "")}


@pytest.mark.parametrize("files, want", [
    (["onnx/encoder_model.onnx", "onnx/decoder_model.onnx", "onnx/decoder_with_past_model.onnx"],
     ("onnx/encoder_model.onnx", "onnx/decoder_model.onnx")),
    # transformers.js' newer repos: the merged decoder only; the variants pair up, full precision first
    (["onnx/encoder_model_quantized.onnx", "onnx/decoder_model_merged_quantized.onnx", "onnx/encoder_model.onnx",
      "onnx/decoder_model_merged.onnx"], ("onnx/encoder_model.onnx", "onnx/decoder_model_merged.onnx")),
    (["onnx/encoder_model_q4.onnx", "onnx/decoder_model_merged_q4.onnx", "onnx/decoder_model_merged_fp16.onnx"],
     ("onnx/encoder_model_q4.onnx", "onnx/decoder_model_merged_q4.onnx")),
    (["onnx/encoder_model.onnx"], None),  # half a model: not read
    (["onnx/model.onnx", "onnx/encoder_model.onnx", "onnx/decoder_model.onnx"], ("onnx/model.onnx",)),
    (["onnx/decoder_model_merged.onnx"], ("onnx/decoder_model_merged.onnx",)),  # a decoder-only model
])
def test_the_files_of_an_encoder_decoder_export(files: list[str], want: tuple[str, ...] | None) -> None:
    from sketches.onnx import choose_onnx_files

    assert choose_onnx_files(files) == want


def test_both_halves_read_bit_for_bit_as_the_pytorch_model(hub: Path) -> None:
    pt, _ = read_folder(hub / "o/bart", budget=64 << 20)
    for repo, files in (("x/bart-onnx", "encoder_model.onnx+decoder_model_merged.onnx"),
                        ("x/bart-ft-onnx", "encoder_model.onnx+decoder_model.onnx")):
        read, _ = read_folder(hub / repo, budget=64 << 20)
        assert read.weights_format == "onnx" and read.details["file"] == files and read.family == pt.family
    read, _ = read_folder(hub / "x/bart-onnx", budget=64 << 20)
    assert set(read.arrays) == set(pt.arrays) and any(n.startswith("encoder.") for n in read.arrays)
    for name, array in pt.arrays.items():
        assert np.array_equal(read.arrays[name], array), name
    from indexer.lineage.compare import compare, load_local

    result = compare(load_local(hub / "o/t5"), load_local(hub / "x/t5-onnx"))  # `index compare`: two files, one model
    assert result.identical and result.direction == "duplicate"


def _rows(recovered: object) -> dict[str, tuple[str, str]]:
    return {r.repo_id: (r.parent, r.relation) for r in recovered.rows}  # type: ignore[attr-defined]


def test_exports_are_duplicates_of_their_sources_in_batch_incremental_and_crawl(hub: Path, tmp_path: Path) -> None:
    assert _rows(recover(hub, Options(device="cpu"))) == TRUTH
    report = ingest_folder(tmp_path / "home", hub, device="cpu")
    assert not report.failed and {r: (e.parent, e.relation) for r, e in report.edges.items()} == TRUTH
    from test_crawl_relations import _options

    with HubEmulator(hub) as emu:
        crawled = crawl(tmp_path / "crawl", _options(emu)).as_dict()
    assert crawled["indexed"] == 7, crawled
    edges = {e.repo_id: (e.parent, e.relation) for e in read_records(tmp_path / "crawl", "edges")}  # type: ignore[union-attr]
    assert edges == TRUTH


def test_a_sinusoidal_position_table_is_a_constant_of_the_export(tmp_path: Path) -> None:
    """Marian's and Pegasus' `embed_positions.weight` (sines and cosines PyTorch recomputes and never saves) is
    left out; a learned table of that name (BART's) is a weight."""
    from onnx import helper, numpy_helper

    from sketches.onnx import read_index
    from sketches.safetensors import FileSource

    positions, dim = 16, 8
    angle = 1.0 / np.power(10000.0, 2 * np.arange(dim // 2) / dim)
    table = np.concatenate([np.sin(np.arange(positions)[:, None] * angle), np.cos(np.arange(positions)[:, None] * angle)], 1)
    learned = np.random.default_rng(0).normal(size=(positions, dim))
    inits = [numpy_helper.from_array(table.astype(np.float32), "model.encoder.embed_positions.weight"),
             numpy_helper.from_array(learned.astype(np.float32), "model.decoder.embed_positions.weight")]
    nodes = [helper.make_node("Gather", [i.name, "ids"], [f"out{k}"]) for k, i in enumerate(inits)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [4])],
                              [helper.make_tensor_value_info(f"out{k}", onnx.TensorProto.FLOAT, None) for k in range(2)],
                              inits)
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    tensors, details = read_index(FileSource(path))
    assert set(tensors) == {"model.decoder.embed_positions.weight"}
    assert details["skipped"] == {"undecoded": 0, "sinusoidal": 1}


def test_without_upload_times_the_pytorch_file_is_the_original(hub: Path, tmp_path: Path) -> None:
    """Byte-identical copies without times: an export is one conversion from its source (`converted_rank`).
    The ONNX T5 reads its tied lm_head apart (one tensor more), which made it the original before."""
    rows = _rows(recover(hub, Options(device="cpu", use_time=False)))
    assert rows["x/t5-onnx"] == ("o/t5", "duplicate") and rows["o/t5"] == ("", "")
    assert rows["x/bart-onnx"] == ("o/bart", "duplicate")
    undated = tmp_path / "undated"
    undated.mkdir()
    for repo in ("o/t5", "x/t5-onnx"):
        (undated / repo).parent.mkdir(exist_ok=True)
        (undated / repo).symlink_to(hub / repo)
    report = ingest_folder(tmp_path / "home", undated, device="cpu")
    assert {r: (e.parent, e.relation) for r, e in report.edges.items()} == {"o/t5": ("", ""),
                                                                            "x/t5-onnx": ("o/t5", "duplicate")}


def test_a_decoder_only_merged_export_reads_as_its_source(tmp_path: Path) -> None:
    """An older optimum's decoder-only repo with only `decoder_model_merged.onnx` (Xenova/gpt2's layout): the
    weights used inside the If's branches, named `<name>_merged_0` in the main graph."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from indexer.zoo.onnx_export import merged_decoder, write_onnx

    torch.manual_seed(3)
    model = _trained_looking(GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=2)))
    model.save_pretrained(tmp_path / "o/gpt2")
    state = {n: t.detach().numpy().copy() for n, t in model.state_dict().items()}
    plain = write_onnx(tmp_path / "x/gpt2-onnx", state, model.config.to_dict() | {"architectures": ["GPT2LMHeadModel"]})
    onnx.save(merged_decoder(onnx.load(str(plain))), str(plain.parent / "decoder_model_merged.onnx"))
    plain.unlink()
    pt, _ = read_folder(tmp_path / "o/gpt2", budget=64 << 20)
    read, _ = read_folder(tmp_path / "x/gpt2-onnx", budget=64 << 20)
    assert read.details["file"] == "decoder_model_merged.onnx" and read.family == pt.family
    assert set(read.arrays) == set(pt.arrays)
    for name, array in pt.arrays.items():
        assert np.array_equal(read.arrays[name], array), name


def test_whispers_folded_position_table_is_named_back(tmp_path: Path) -> None:
    """Whisper's encoder adds its whole frozen sinusoid table; the exporter folds it into an unnamed constant.
    Recognised by its rows, it is `model.encoder.embed_positions.weight` again, so the export is a duplicate."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from indexer.zoo.onnx_export import write_seq2seq_onnx

    torch.manual_seed(5)
    model = _trained_looking(WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=16,
        max_target_positions=32, suppress_tokens=[], begin_suppress_tokens=[], pad_token_id=0, bos_token_id=1,
        eos_token_id=2, decoder_start_token_id=1)))
    with torch.no_grad():  # the frozen table, as WhisperEncoder draws it (never trained)
        from transformers.models.whisper.modeling_whisper import sinusoids

        model.model.encoder.embed_positions.weight.copy_(sinusoids(16, 32))
    model.save_pretrained(tmp_path / "o/whisper")
    write_seq2seq_onnx(tmp_path / "x/whisper-onnx", model, merged=True)
    pt, _ = read_folder(tmp_path / "o/whisper", budget=64 << 20)
    read, _ = read_folder(tmp_path / "x/whisper-onnx", budget=64 << 20)
    assert "encoder.embed_positions.weight" in read.tensors and set(read.arrays) == set(pt.arrays)
    for name, array in pt.arrays.items():
        assert np.array_equal(read.arrays[name], array), name
    (tmp_path / "hub.json").write_text(json.dumps({"version": 1, "repos": {
        "o/whisper": {"createdAt": "2024-03-01T00:00:00.000Z"}, "x/whisper-onnx": {"createdAt": "2024-03-02T00:00:00.000Z"}}}))
    want = {"o/whisper": ("", ""), "x/whisper-onnx": ("o/whisper", "duplicate")}
    assert _rows(recover(tmp_path, Options(device="cpu"))) == want
    report = ingest_folder(tmp_path / "home", tmp_path, device="cpu")
    assert {r: (e.parent, e.relation) for r, e in report.edges.items()} == want
