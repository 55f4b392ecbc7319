"""Batch recovery (`index recover` on a folder) reads every repo kind the crawl reads -- adapters, GGUF files,
packed GPTQ safetensors -- through the crawl's readers, labels every edge (finetune, duplicate, adapter,
quantized, merge), and agrees with the incremental index (`index add` of the same folders) per model:
parent, relation and merge parent set. Bad files are one-line failures; the rest is recovered."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from model_support import perturb_matrices
from test_crawl_relations import (
    HEADS,
    HIDDEN,
    KV_HEADS,
    LAYERS,
    LLAMA_CONFIG,
    Hub,
    continued,
    llama_state,
    tuned,
)

from indexer.crawl import add_local
from indexer.evaluate import evaluate_folder
from indexer.lineage.methods import Options
from indexer.lineage.recover import (
    Forest,
    discover_repos,
    recover,
    render_forest,
    write_parquet,
)
from store.tables import read_records


def lora(seed: int, *, r: int = 4) -> dict[str, np.ndarray]:
    """PEFT's saved layout on the llama's square q/o projections (GQA makes v non-square)."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(LAYERS):
        for p in "qo":
            stem = f"base_model.model.model.layers.{i}.self_attn.{p}_proj"
            out[f"{stem}.lora_A.weight"] = rng.normal(0, 0.1, (r, HIDDEN)).astype(np.float32)
            out[f"{stem}.lora_B.weight"] = rng.normal(0, 0.1, (HIDDEN, r)).astype(np.float32)
    return out


def lora_config(base: str, r: int = 4) -> dict[str, object]:
    return {"peft_type": "LORA", "base_model_name_or_path": base, "r": r, "lora_alpha": 2 * r,
            "target_modules": ["q_proj", "o_proj"], "task_type": "CAUSAL_LM"}


def _ties(base: dict[str, np.ndarray], a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for n, w in base.items():  # each task vector trimmed to its largest half, over the base
        ta, tb = a[n] - w, b[n] - w
        keep = lambda t: t * (np.abs(t) >= np.quantile(np.abs(t), 0.5))
        out[n] = (w + 0.5 * keep(ta) + 0.5 * keep(tb)).astype(np.float32) if w.ndim == 2 else w
    return out


def _patched_gguf(folder: Path, state: dict[str, np.ndarray], field: int, fmt: str, value: int) -> None:
    """A Q8_0 GGUF with one field of blk.0.attn_q.weight's tensor info overwritten (0: type, 1: offset)."""
    from indexer.zoo.quantize import write_llama_gguf

    path = write_llama_gguf(folder / "model-Q8_0.gguf", state, "Q8_0", heads=HEADS, kv_heads=KV_HEADS)
    raw = path.read_bytes()
    name = b"blk.0.attn_q.weight"
    at = raw.index(struct.pack("<Q", len(name)) + name) + 8 + len(name) + 4 + 2 * 8 + 4 * field
    path.write_bytes(raw[:at] + struct.pack(fmt, value) + raw[at + struct.calcsize(fmt):])


TRUTH = {  # child -> (parents, relation)
    "m/a": (("m/base",), "finetune"), "m/b": (("m/base",), "finetune"), "m/a-ft": (("m/a",), "finetune"),
    "m/a-copy": (("m/a",), "duplicate"), "m/linear": (("m/a", "m/b"), "merge"), "m/ties": (("m/a", "m/b"), "merge"),
    "q/a-Q8_0-GGUF": (("m/a",), "quantized"), "q/base-F16-GGUF": (("m/base",), "quantized"),
    "q/b-Q4_0-GGUF": (("m/b",), "quantized"), "q/b-GPTQ": (("m/b",), "quantized"),
    "l/lora-1": (("m/base",), "adapter"), "l/lora-1-more": (("l/lora-1",), "adapter"),
    "l/lora-2": (("m/base",), "adapter"), "l/lora-ext": (("meta/not-here",), "adapter"),
    "m/base": ((), ""), "m/other": ((), ""),
}
BAD = {"q/truncated-GGUF": "truncated", "q/unknown-type-GGUF": "unknown quantization type 99",
       "q/past-end-GGUF": "past the end of the file", "l/not-json": "not valid JSON", "l/no-base": "names no base",
       "l/dora": "no lora_magnitude_vector"}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small relations zoo: real GGUF (the gguf package's quantizers and writer), GPTQ packing, PEFT's
    adapter layout, linear and TIES-style merges, a duplicate, and every bad file of the issue."""
    from indexer.zoo.quantize import write_gptq, write_llama_gguf

    hub = Hub(tmp_path_factory.mktemp("rel") / "hub")
    hub.root.mkdir()
    base, other = llama_state(1), llama_state(2)
    a, b = tuned(base, 2), tuned(base, 3)
    hub.repo("m/base", 1, weights=base)
    (hub.root / "m/base/config.json").write_text(json.dumps(LLAMA_CONFIG))
    hub.repo("m/other", 1, weights=other)
    hub.repo("m/a", 2, weights=a, card="base_model: m/base")
    hub.repo("m/b", 3, weights=b)
    hub.repo("m/a-ft", 4, weights=tuned(a, 4, step=0.2))
    hub.repo("m/a-copy", 5, weights=a)
    hub.repo("m/linear", 6, weights={n: (0.7 * a[n] + 0.3 * b[n]).astype(np.float32) for n in base},
             card="base_model:\n- m/a\n- m/b")
    hub.repo("m/ties", 7, weights=_ties(base, a, b))
    for repo, month, state, qtype in (("q/a-Q8_0-GGUF", 8, a, "Q8_0"), ("q/base-F16-GGUF", 8, base, "F16"),
                                      ("q/b-Q4_0-GGUF", 9, b, "Q4_0")):
        write_llama_gguf(hub.repo(repo, month) / f"model-{qtype}.gguf", state, qtype, heads=HEADS, kv_heads=KV_HEADS)
    write_gptq(hub.root / "q/b-GPTQ", b, LLAMA_CONFIG, bits=4, group=32)
    hub.repo("q/b-GPTQ", 9)
    first = lora(10)
    hub.repo("l/lora-1", 10, adapter=first, config=lora_config("m/base"))
    hub.repo("l/lora-1-more", 11, adapter=continued(first, 11), config=lora_config("m/base"))
    hub.repo("l/lora-2", 11, adapter=lora(12), config=lora_config("M/Base"))  # ids are case-insensitive
    hub.repo("l/lora-ext", 12, adapter=lora(13), config=lora_config("meta/not-here"))
    hub.repo("l/not-json", 12, adapter=lora(14), config=b"{not json")
    hub.repo("l/no-base", 12, adapter=lora(15), config={"peft_type": "LORA", "r": 4})
    hub.repo("l/dora", 12, adapter=lora(16), config={**lora_config("m/base"), "use_dora": True})  # no magnitudes: refused
    bad = hub.repo("q/truncated-GGUF", 12)
    write_llama_gguf(bad / "model-Q8_0.gguf", a, "Q8_0", heads=HEADS, kv_heads=KV_HEADS)
    (bad / "model-Q8_0.gguf").write_bytes((bad / "model-Q8_0.gguf").read_bytes()[:200])
    _patched_gguf(hub.repo("q/unknown-type-GGUF", 12), a, 0, "<I", 99)
    _patched_gguf(hub.repo("q/past-end-GGUF", 12), a, 1, "<Q", 1 << 30)
    return hub.root


@pytest.fixture(scope="module")
def batch(zoo: Path) -> Forest:
    return recover(zoo, Options(device="cpu"))


def _row(forest: Forest, repo: str) -> tuple[str, str, frozenset[str]]:
    r = next(r for r in forest.rows if r.repo_id == repo)
    return r.parent, r.relation, frozenset(p for p, _ in r.parents)


def test_every_repo_kind_is_discovered(zoo: Path) -> None:
    assert {r for r, _ in discover_repos(zoo)} == set(TRUTH) | set(BAD)


def test_batch_recovers_every_relation(batch: Forest) -> None:
    for child, (parents, relation) in TRUTH.items():
        parent, got, got_parents = _row(batch, child)
        if not parents:
            assert (parent, got) == ("", ""), child
            continue
        assert got == relation, (child, _row(batch, child))
        if relation == "merge":
            assert got_parents == frozenset(parents) and parent in parents, child
        else:
            assert parent == parents[0], (child, _row(batch, child))
    linear = next(r for r in batch.rows if r.repo_id == "m/linear")
    assert linear.parents[0] == ("m/a", pytest.approx(0.7, abs=0.02))
    ext = next(r for r in batch.rows if r.repo_id == "l/lora-ext")
    base = next(r for r in batch.rows if r.repo_id == "m/base")
    assert ext.family == base.family and ext.cluster != base.cluster  # fits the base's shapes; its own tree
    assert next(r for r in batch.rows if r.repo_id == "l/lora-1").cluster == base.cluster
    assert all(r.bytes_read > 0 for r in batch.rows if r.status == "ok")


def test_bad_files_are_one_line_failures_and_the_rest_is_recovered(batch: Forest) -> None:
    failed = {r.repo_id: r.reason for r in batch.failures()}
    assert set(failed) == set(BAD)
    for repo, words in BAD.items():
        assert words in failed[repo] and "\n" not in failed[repo], (repo, failed[repo])
    assert failed["l/not-json"].startswith("adapter-invalid: ") and failed["q/truncated-GGUF"].startswith("gguf-invalid: ")


def test_batch_equals_incremental_per_model(zoo: Path, batch: Forest, tmp_path: Path) -> None:
    """`index add` of every folder (the crawl's pipeline: readers, incremental index, relations) against batch."""
    folders = [path for _, path in discover_repos(zoo)]
    report = add_local(tmp_path / "home", folders, budget=64 << 20, device="cpu", progress=False)
    failed = {o.repo_id for o in report.outcomes if o.status != "indexed"}
    assert failed == set(BAD)
    edges = {e.repo_id: e for e in read_records(tmp_path / "home", "edges")}  # type: ignore[union-attr]
    for child in TRUTH:
        e = edges[child]
        incremental = (e.parent, e.relation, frozenset(p for p, _ in e.parents))  # type: ignore[attr-defined]
        assert _row(batch, child) == incremental, child


@pytest.mark.parametrize("order", ["upload", 0])
def test_folder_ingest_equals_batch_per_model(zoo: Path, batch: Forest, tmp_path: Path, order: str | int) -> None:
    """`indexer.incremental.folder` (bench/incremental.py's path: one arrival at a time, in upload order or
    a random one) reads adapters, GGUF and GPTQ repos through the crawl's reader and agrees with batch per
    model. Regression: it read plain safetensors only, so every GGUF and adapter repo failed to open."""
    from indexer.incremental.folder import ingest_folder

    report = ingest_folder(tmp_path / "home", zoo, order=order, device="cpu")
    assert set(report.failed) == set(BAD)
    assert {r.repo_id: r.reason for r in batch.failures()} == report.failed  # the crawl's one-line reasons
    assert set(report.adapters) == {c for c, (_, rel) in TRUTH.items() if rel == "adapter"}
    assert {a.repo_id for a in report.arrivals} == {c for c, (_, rel) in TRUTH.items() if rel != "adapter"}
    for child in TRUTH:
        e = report.edges[child]
        incremental = (e.parent, e.relation, frozenset(p for p, _ in e.parents))
        assert _row(batch, child) == incremental, (order, child)
    assert report.parents == {c: _row(batch, c)[0] for c in TRUTH}


def test_rows_are_deterministic_and_the_parquet_has_the_export_columns(zoo: Path, batch: Forest, tmp_path: Path) -> None:
    again = recover(zoo, Options(device="cpu"))
    assert again.rows == batch.rows
    write_parquet(batch, tmp_path / "f.parquet")
    table = pq.read_table(tmp_path / "f.parquet")
    assert table.schema.metadata[b"model_graph_index.forest_version"] == b"3"
    import duckdb

    got = duckdb.sql(f"SELECT relation, len(parents) AS n FROM '{tmp_path / 'f.parquet'}' "
                     "WHERE repo_id = 'm/ties'").fetchall()
    assert got == [("merge", 2)]
    drawn = render_forest(batch)
    assert "merge, of 0.70 m/a + 0.30 m/b" in drawn and "quantized" in drawn
    assert "meta/not-here  (external: not in the folder)\n└── l/lora-ext  (adapter" in drawn


def test_eval_scores_relations_from_the_zoo_truth(zoo: Path, tmp_path: Path) -> None:
    truth = tmp_path / "truth.csv"
    truth.write_text("child,parents,relation\n" + "".join(f"{c},{';'.join(p)},{r}\n" for c, (p, r) in TRUTH.items()))
    report = evaluate_folder(zoo, Options(device="cpu"), truth=truth)
    assert report.accuracy == 1.0 and report.failed == len(BAD)
    rel = report.relations
    assert rel["merge"]["parent_set"] == 1.0 and rel["quantized"]["label"] == 1.0
    assert all(math.isclose(row["label"], 1.0) for row in rel.values()), rel


def test_bitsandbytes_and_fp8_copies_by_the_real_libraries_are_quantized_children(tmp_path: Path) -> None:
    """bitsandbytes' own Linear8bitLt / Linear4bit state dicts and compressed-tensors' FP8, NVFP4, MXFP4 and
    MXFP8 compressors (an
    optional extra: skipped where they are not installed), read back by the crawl's packed reader."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("compressed_tensors")
    from indexer.zoo.quantize import write_bnb, write_fp8, write_microscaled

    hub = Hub(tmp_path / "hub")
    hub.root.mkdir()
    base = llama_state(1)
    child = tuned(base, 2)
    hub.repo("m/base", 1, weights=base)
    hub.repo("m/child", 2, weights=child)
    write_bnb(hub.root / "q/child-bnb-8bit", child, LLAMA_CONFIG, kind="int8")
    write_bnb(hub.root / "q/child-bnb-nf4", child, LLAMA_CONFIG, kind="nf4")
    write_fp8(hub.root / "q/base-FP8", base, LLAMA_CONFIG)
    write_microscaled(hub.root / "q/child-NVFP4", child, LLAMA_CONFIG, fmt="nvfp4")
    write_microscaled(hub.root / "q/base-MXFP4", base, LLAMA_CONFIG, fmt="mxfp4")
    write_microscaled(hub.root / "q/child-MXFP8", child, LLAMA_CONFIG, fmt="mxfp8")
    copies = (("q/child-bnb-8bit", "m/child"), ("q/child-bnb-nf4", "m/child"), ("q/base-FP8", "m/base"),
              ("q/child-NVFP4", "m/child"), ("q/base-MXFP4", "m/base"), ("q/child-MXFP8", "m/child"))
    for month, (repo, _) in enumerate(copies, start=3):
        hub.repo(repo, month)
    forest = recover(hub.root, Options(device="cpu"))
    assert not forest.failures()
    for copy, source in copies:
        assert _row(forest, copy)[:2] == (source, "quantized"), (copy, _row(forest, copy))


def test_zoo_make_relations_preset_refuses_a_non_empty_folder_before_training(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from cli import index
    from errors import BadInputError

    (tmp_path / "keep.txt").write_text("mine")
    result = CliRunner().invoke(index, ["zoo", "make", str(tmp_path), "--preset", "relations"])
    assert isinstance(result.exception, BadInputError) and "--force" in str(result.exception)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_real_transformers_peft_and_mergekit_repos_batch_equals_incremental(tmp_path: Path) -> None:
    """The same check on repos written by the real tools: a transformers Llama and two perturbed copies
    (save_pretrained), a `peft` LoRA saved unmerged (random B: init_lora_weights=False), a `mergekit`
    linear merge, and a `gguf` Q8_0 copy: batch == `index add`, and each gets its relation."""
    torch = pytest.importorskip("torch")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from peft import LoraConfig, get_peft_model
    from safetensors.numpy import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from indexer.zoo.quantize import write_llama_gguf

    root = tmp_path / "hub"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(root / "m/base")
    for repo, seed in (("m/a", 1), ("m/b", 2)):
        perturb_matrices(LlamaForCausalLM.from_pretrained(root / "m/base"), 0.3, seed).save_pretrained(root / repo)
    doc = {"merge_method": "linear", "dtype": "float32",
           "models": [{"model": str(root / m), "parameters": {"weight": w}} for m, w in (("m/a", 0.6), ("m/b", 0.4))]}
    run_merge(MergeConfiguration.model_validate(doc), str(root / "m/linear"),
              MergeOptions(copy_tokenizer=False, write_model_card=False, random_seed=0, quiet=True))
    lora = get_peft_model(LlamaForCausalLM.from_pretrained(root / "m/base"),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(root / "l/lora")
    cfg_path = root / "l/lora/adapter_config.json"  # peft writes the local path; a Hub upload names the repo
    cfg_path.write_text(json.dumps(json.loads(cfg_path.read_text()) | {"base_model_name_or_path": "m/base"}))
    (root / "q/a-GGUF").mkdir(parents=True)
    write_llama_gguf(root / "q/a-GGUF/a-Q8_0.gguf", load_file(str(root / "m/a/model.safetensors")), "Q8_0",
                     heads=4, kv_heads=2)
    order = ("m/base", "m/a", "m/b", "l/lora", "m/linear", "q/a-GGUF")
    (root / "hub.json").write_text(json.dumps({"version": 1, "repos": {
        r: {"createdAt": f"2024-0{i + 1}-01T00:00:00.000Z"} for i, r in enumerate(order)}}))
    batch = recover(root, Options(device="cpu"))
    assert not batch.failures()
    want = {"m/a": ("m/base", "finetune"), "m/b": ("m/base", "finetune"), "l/lora": ("m/base", "adapter"),
            "m/linear": ("m/a", "merge"), "q/a-GGUF": ("m/a", "quantized"), "m/base": ("", "")}
    assert {r: _row(batch, r)[:2] for r in order} == want
    assert _row(batch, "m/linear")[2] == {"m/a", "m/b"}
    add_local(tmp_path / "home", [root / r for r in order], budget=64 << 20, device="cpu", progress=False)
    edges = {e.repo_id: e for e in read_records(tmp_path / "home", "edges")}  # type: ignore[union-attr]
    for repo in order:
        e = edges[repo]
        assert _row(batch, repo) == (e.parent, e.relation, frozenset(p for p, _ in e.parents)), repo  # type: ignore[attr-defined]


def test_folder_ingest_of_a_family_dated_all_alike(zoo: Path, tmp_path: Path) -> None:
    """Every repo reading the Hub's legacy createdAt (2022-03-02T23:29:04Z): every relation kind is still
    indexed, the bad files still fail in one line, and batch and the incremental index both recover every
    edge. (bench/hub_epoch.py's relations zoo dated so stopped on a KeyError: a merge refit wrote a
    newcomer's edges row before its depth existed. Then the linear merge, between a and b in the spanning
    tree, was the tree's centre in batch and left the base under a; and without upload order the base fitted
    as a TIES merge of a and b over their own TIES merge.)"""
    from model_support import dated_legacy

    from indexer.incremental.folder import ingest_folder

    dated = dated_legacy(zoo, tmp_path / "zoo", 1.0)
    report = ingest_folder(tmp_path / "home", dated, order="upload", device="cpu")
    assert set(report.failed) == set(BAD)
    assert set(report.edges) == set(TRUTH)
    batch = recover(dated, Options(device="cpu"))
    for child, (parents, relation) in TRUTH.items():
        e = report.edges[child]
        assert (e.relation, frozenset(p for p, _ in e.parents)) == (relation, frozenset(parents)), child
        assert _row(batch, child) == (e.parent, e.relation, frozenset(p for p, _ in e.parents)), child
