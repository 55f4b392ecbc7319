"""K-quant GGUF copies as llama-quantize writes them: ggml's own quantizer (ggml_quantize_chunk, through
indexer.zoo.quantize) on a llama whose rows are whole 256-value super-blocks, as a Q4_K_M mixture (Q6_K
on output, attn_v and ffn_down) and uniform Q4_K / Q6_K files. Read back by range reads, bit for bit as
gguf's own GGUFReader + dequantizer read them, and recovered by the batch path (`index recover` /
`index eval`) and the incremental one (`index add`) as `quantized` children of the model they copy."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from test_crawl_relations import llama_state

from indexer.crawl import add_local
from indexer.evaluate import evaluate, read_relations_csv
from indexer.lineage.methods import Options
from indexer.lineage.recover import Forest, recover
from indexer.readers import GGUF_FIRST_READ
from indexer.zoo.quantize import (
    KQUANT_COPIES,
    KQUANT_SHAPE,
    wide_llama_state,
    write_kquant_folder,
    write_llama_gguf,
)
from sketches.gguf import (
    hf_names,
    predicted_relative_error,
    read_header,
    read_hf_tensor,
    read_tensor,
)
from sketches.safetensors import FileSource
from store.tables import read_records

HEADS, KV_HEADS, LAYERS = KQUANT_SHAPE["heads"], KQUANT_SHAPE["kv_heads"], KQUANT_SHAPE["layers"]


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def q4_k_m(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    state = wide_llama_state(1)
    path = tmp_path_factory.mktemp("kq") / "m-Q4_K_M.gguf"
    return write_llama_gguf(path, state, "Q4_K_M", heads=HEADS, kv_heads=KV_HEADS), state


def test_q4_k_m_is_llama_quantizes_mixture(q4_k_m: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, _ = q4_k_m
    with FileSource(path) as src:
        header = read_header(src)
    assert header.metadata["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    six = {t.name for t in header.tensors if t.qtype == "Q6_K"}
    # of 2 layers use_more_bits picks layer 1 only: i >= 7 * 2 / 8 = 1 in C's int division
    assert six == {"output.weight", "blk.1.attn_v.weight", "blk.1.ffn_down.weight"}
    assert header.qtypes() == {"F32": 1 + 2 * LAYERS, "Q4_K": 1 + 7 * LAYERS - 2, "Q6_K": 3}


def test_k_quant_blocks_read_by_range_equal_gguf_readers_own_decoding(q4_k_m: tuple[Path, dict[str, np.ndarray]]) -> None:
    """Every tensor: our range read == gguf.GGUFReader's memory map through gguf.quants.dequantize."""
    path, _ = q4_k_m
    theirs = {t.name: t for t in gguf.GGUFReader(path).tensors}
    with FileSource(path) as src:
        header = read_header(src)
        for info in header.tensors:
            t = theirs[info.name]
            want = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(info.shape)
            np.testing.assert_array_equal(read_tensor(src, info), want, err_msg=info.name)
            if len(info.shape) == 2:  # and a row range costs exactly its super-blocks
                before = src.bytes_read
                np.testing.assert_array_equal(read_tensor(src, info, rows=(5, 9)), want[5:9])
                assert src.bytes_read - before == 4 * info.row_bytes


def test_k_quant_hf_tensors_are_within_the_predicted_error(q4_k_m: tuple[Path, dict[str, np.ndarray]]) -> None:
    """Hugging Face names, q/k rows un-permuted, each within 1.5x its block type's predicted error."""
    path, state = q4_k_m
    with FileSource(path) as src:
        header = read_header(src)
        names = {h.hf_name: h for h in hf_names(header).values()}
        for hf, name in sorted(names.items()):
            if state[hf].ndim == 2:
                qtype = header.get(name.gguf_name).qtype
                assert rel(read_hf_tensor(src, header, name), state[hf]) <= 1.5 * predicted_relative_error(qtype), hf


def test_narrow_rows_fall_back_as_llama_quantize_does(tmp_path: Path) -> None:
    """Rows of 64 / 96 values are no whole super-block: Q4_K -> Q5_0, Q6_K -> Q8_0 (llama_tensor_get_type)."""
    for qtype, fallback in (("Q4_K", "Q5_0"), ("Q6_K", "Q8_0")):
        path = write_llama_gguf(tmp_path / f"n-{qtype}.gguf", llama_state(1), qtype, heads=4, kv_heads=2)
        with FileSource(path) as src:
            assert set(read_header(src).qtypes()) == {"F32", fallback}, qtype


def test_q3_k_file_with_iq4_nl_rows_is_a_quantized_child(tmp_path: Path) -> None:
    """Rows of 64 values in a Q3_K file are IQ4_NL, as llama-quantize writes them for Qwen2's 896-wide rows:
    read, within its predicted error, and placed under the model it copies (once refused: no error known)."""
    from test_crawl_relations import tuned

    from safetensors.numpy import save_file

    base, other = llama_state(1), llama_state(2)
    for repo, state in (("m/base", base), ("m/other", other), ("m/child", tuned(base, 3))):
        (tmp_path / repo).mkdir(parents=True)
        save_file(state, str(tmp_path / repo / "model.safetensors"))
    (tmp_path / "q/child-Q3_K-GGUF").mkdir(parents=True)
    path = write_llama_gguf(tmp_path / "q/child-Q3_K-GGUF/child-Q3_K.gguf", tuned(base, 3), "Q3_K", heads=4, kv_heads=2)
    with FileSource(path) as src:
        assert set(read_header(src).qtypes()) == {"F32", "IQ4_NL"}
    forest = recover(tmp_path, Options(device="cpu"))
    assert not forest.failures()
    row = next(r for r in forest.rows if r.repo_id == "q/child-Q3_K-GGUF")
    assert (row.parent, row.relation) == ("m/child", "quantized"), row


@pytest.fixture(scope="module")
def kquant_hub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base, two fine-tunes, an unrelated model, and a K-quant copy of three of them (uploaded last)."""
    root = tmp_path_factory.mktemp("kquant") / "hub"
    write_kquant_folder(root)
    return root


@pytest.fixture(scope="module")
def kquant_forest(kquant_hub: Path) -> Forest:
    return recover(kquant_hub, Options(device="cpu"))


def test_k_quant_copies_are_quantized_children_of_their_source(kquant_hub: Path, kquant_forest: Forest) -> None:
    assert not kquant_forest.failures()
    rows = {r.repo_id: r for r in kquant_forest.rows}
    for repo, source, _ in KQUANT_COPIES:
        assert (rows[repo].parent, rows[repo].relation) == (source, "quantized"), repo
        # the batch reads whole models; the header's first read (GGUF_FIRST_READ bytes) is counted again
        # where it overlaps the blocks read after it
        size = next((kquant_hub / repo).glob("*.gguf")).stat().st_size
        assert size // 2 < rows[repo].bytes_read <= size + GGUF_FIRST_READ, repo
    relations = read_relations_csv(kquant_hub / "truth.csv")
    expected = {child: parents[0] if parents else "" for child, (parents, _) in relations.items()}
    report = evaluate(kquant_forest, expected, relations)
    assert report.accuracy == 1.0 and report.relations["quantized"]["label"] == 1.0, report.as_dict()


def test_k_quant_copies_batch_equals_incremental(kquant_hub: Path, kquant_forest: Forest, tmp_path: Path) -> None:
    order = [r for r, _ in sorted(json.loads((kquant_hub / "hub.json").read_text())["repos"].items(),
                                  key=lambda kv: (kv[1]["createdAt"], kv[0]))]
    add_local(tmp_path / "home", [kquant_hub / r for r in order], budget=64 << 20, device="cpu", progress=False)
    edges = {e.repo_id: e for e in read_records(tmp_path / "home", "edges")}  # type: ignore[union-attr]
    rows = {r.repo_id: r for r in kquant_forest.rows}
    for repo, _, _ in KQUANT_COPIES:
        assert (edges[repo].parent, edges[repo].relation) == (rows[repo].parent, rows[repo].relation), repo  # type: ignore[attr-defined]
