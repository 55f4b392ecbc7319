"""The crawl indexes adapter repos (and later quantized copies) over HTTP from the Hub emulator, with the
real huggingface_hub client, into a real store; bad adapters are recorded failures, the crawl goes on."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from indexer.crawl import CrawlOptions, add_local, crawl
from indexer.hub_emulator import HubEmulator
from indexer.retry import RetryPolicy
from store.query import query_model
from store.tables import read_records

CREATED = "2024-{m:02d}-01T00:00:00.000Z"
WIDTH, LAYERS = 32, 2


def base_weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {f"model.layers.{i}.self_attn.{p}_proj.weight": rng.standard_t(3, (WIDTH, WIDTH)).astype(np.float32) * 0.02
           for i in range(LAYERS) for p in "qkvo"}
    out["model.layers.0.mlp.up_proj.weight"] = rng.normal(0, 0.02, (2 * WIDTH, WIDTH)).astype(np.float32)
    out["lm_head.weight"] = rng.normal(0, 0.02, (10, WIDTH)).astype(np.float32)
    return out


def lora_factors(seed: int, *, r: int = 4, width: int = WIDTH) -> dict[str, np.ndarray]:
    """PEFT's saved layout: base_model.model.<module>.lora_A.weight (r, in) / lora_B.weight (out, r)."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(LAYERS):
        for p in "qv":
            stem = f"base_model.model.model.layers.{i}.self_attn.{p}_proj"
            out[f"{stem}.lora_A.weight"] = rng.normal(0, 0.1, (r, width)).astype(np.float32)
            out[f"{stem}.lora_B.weight"] = rng.normal(0, 0.1, (width, r)).astype(np.float32)
    return out


def continued(factors: dict[str, np.ndarray], seed: int, step: float = 0.02) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (a + step * rng.normal(size=a.shape)).astype(np.float32) for n, a in factors.items()}


class Hub:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.meta: dict[str, dict[str, object]] = {}

    def repo(self, repo_id: str, month: int, *, weights: dict[str, np.ndarray] | None = None,
             adapter: dict[str, np.ndarray] | None = None, config: dict[str, object] | bytes | None = None,
             card: str | None = None) -> Path:
        folder = self.root / repo_id
        folder.mkdir(parents=True, exist_ok=True)
        if weights is not None:
            save_file(weights, str(folder / "model.safetensors"))
        if adapter is not None:
            save_file(adapter, str(folder / "adapter_model.safetensors"))
        if config is not None:
            raw = config if isinstance(config, bytes) else json.dumps(config).encode()
            (folder / "adapter_config.json").write_bytes(raw)
        if card is not None:
            (folder / "README.md").write_text(f"---\n{card}\n---\n")
        self.meta[repo_id] = {"createdAt": CREATED.format(m=month)}
        (self.root / "hub.json").write_text(json.dumps({"version": 1, "repos": self.meta}))
        return folder


def lora_config(base: str, *, r: int = 4, alpha: float = 8) -> dict[str, object]:
    return {"peft_type": "LORA", "base_model_name_or_path": base, "r": r, "lora_alpha": alpha,
            "target_modules": ["q_proj", "v_proj"], "modules_to_save": None, "task_type": "CAUSAL_LM"}


@pytest.fixture()
def hub(tmp_path: Path) -> Hub:
    (tmp_path / "hub").mkdir()
    return Hub(tmp_path / "hub")


@pytest.fixture()
def emu(hub: Hub) -> Iterator[HubEmulator]:
    with HubEmulator(hub.root) as emulator:
        yield emulator


def _options(emu: HubEmulator) -> CrawlOptions:
    return CrawlOptions(endpoint=emu.url, progress=False, policy=RetryPolicy(sleep=lambda s: None), device="cpu")


def _adapter_zoo(hub: Hub) -> None:
    hub.repo("acme/base", 1, weights=base_weights(1))
    hub.repo("acme/other", 1, weights=base_weights(2))
    first = lora_factors(10)
    hub.repo("lab/lora-1", 3, adapter=first, config=lora_config("acme/base"), card="base_model: acme/base")
    hub.repo("lab/lora-1-more", 4, adapter=continued(first, 11), config=lora_config("acme/base"))  # trained further
    hub.repo("lab/lora-2", 5, adapter=lora_factors(12), config=lora_config("ACME/Base"))  # ids are case-insensitive
    hub.repo("lab/lora-ext", 6, adapter=lora_factors(13), config=lora_config("meta/not-here"))
    hub.repo("lab/lora-wide", 7, adapter=lora_factors(14, width=2 * WIDTH), config=lora_config("acme/base"))
    hub.repo("lab/not-json", 8, adapter=lora_factors(15), config=b"{not json")
    hub.repo("lab/no-base", 8, adapter=lora_factors(16), config={"peft_type": "LORA", "r": 4})
    hub.repo("lab/pickled-adapter", 8, config=lora_config("acme/base"))
    (hub.root / "lab/pickled-adapter/adapter_model.bin").write_bytes(b"\x80\x04 never unpickled")


def test_adapters_are_indexed_under_their_base_with_a_verdict_and_chains(emu: HubEmulator, hub: Hub, tmp_path: Path) -> None:
    _adapter_zoo(hub)
    home = tmp_path / "home"
    report = crawl(home, _options(emu)).as_dict()
    assert report["indexed"] == 7, report
    assert report["failed"] == {"adapter-invalid": 2} and report["skipped"] == {"adapter": 1}
    models = {m.repo_id: m for m in read_records(home, "models")}  # type: ignore[union-attr]
    assert "not valid JSON" in models["lab/not-json"].reason and "names no base" in models["lab/no-base"].reason  # type: ignore[union-attr]
    edges = {e.repo_id: e for e in read_records(home, "edges")}  # type: ignore[union-attr]
    base = edges["acme/base"]
    # listed newest first: every adapter arrived before its base, and moved under it when the base came
    assert (edges["lab/lora-1"].parent, edges["lab/lora-1"].relation) == ("acme/base", "adapter")  # type: ignore[attr-defined]
    assert edges["lab/lora-1"].cluster == base.cluster and edges["lab/lora-1"].depth == base.depth + 1  # type: ignore[attr-defined]
    assert edges["lab/lora-2"].parent == "acme/base"  # independent run: not a chain  # type: ignore[attr-defined]
    assert edges["lab/lora-1-more"].parent == "lab/lora-1"  # type: ignore[attr-defined]
    assert edges["lab/lora-1-more"].depth == base.depth + 2 and 0 < edges["lab/lora-1-more"].distance < 0.5  # type: ignore[attr-defined]
    ext = edges["lab/lora-ext"]
    assert (ext.parent, ext.cluster, ext.relation) == ("meta/not-here", "external:meta/not-here", "adapter")  # type: ignore[attr-defined]
    assert ext.family == base.family  # no base: the family whose shapes it fits  # type: ignore[attr-defined]
    details = {r: json.loads(m.details) for r, m in models.items()}  # type: ignore[union-attr]
    assert models["lab/lora-1"].weights_format == "adapter" and edges["lab/lora-1"].family == base.family  # type: ignore[union-attr]
    assert details["lab/lora-1"]["verdict"] == "compatible" and details["lab/lora-1"]["r"] == 4
    assert details["lab/lora-1"]["target_modules"] == ["q_proj", "v_proj"]
    assert details["lab/lora-wide"]["verdict"] == "incompatible" and "reasons" in details["lab/lora-wide"]
    report_q = query_model(home, "acme/base")
    kids = dict(zip(report_q.children, report_q.child_relations, strict=True))
    assert kids["lab/lora-1"] == "adapter" and kids["lab/lora-2"] == "adapter"
    assert query_model(home, "lab/lora-1-more").ancestry[-1].parent == "acme/base"
    # a second crawl changes nothing and fetches nothing new
    assert crawl(home, _options(emu)).as_dict()["indexed"] == 0


def test_index_add_places_adapters_of_local_folders(hub: Hub, tmp_path: Path) -> None:
    _adapter_zoo(hub)
    folders = [hub.root / r for r in ("acme/base", "lab/lora-1", "lab/lora-1-more", "lab/lora-wide")]
    add_local(tmp_path / "home", folders, budget=64 << 20, device="cpu", progress=False)
    edges = {e.repo_id: e for e in read_records(tmp_path / "home", "edges")}  # type: ignore[union-attr]
    assert edges["lab/lora-1-more"].parent == "lab/lora-1" and edges["lab/lora-1"].parent == "acme/base"  # type: ignore[attr-defined]
    rows = {m.repo_id: m for m in read_records(tmp_path / "home", "models")}  # type: ignore[union-attr]
    models = {r: json.loads(m.details) for r, m in rows.items()}  # type: ignore[union-attr]
    assert models["lab/lora-wide"]["verdict"] == "incompatible" and models["lab/lora-1"]["verdict_from"] == "base header"
    assert rows["lab/lora-1"].family == edges["acme/base"].family  # the base came first: the row has its family


def test_a_chain_across_two_crawls_reads_the_earlier_adapter_again_by_range(emu: HubEmulator, hub: Hub, tmp_path: Path) -> None:
    first = lora_factors(20)
    hub.repo("acme/base", 1, weights=base_weights(1))
    hub.repo("lab/step-1", 2, adapter=first, config=lora_config("acme/base"))
    home = tmp_path / "home"
    crawl(home, _options(emu))
    hub.repo("lab/step-2", 3, adapter=continued(first, 21), config=lora_config("acme/base"))
    assert crawl(home, _options(emu)).as_dict()["indexed"] == 1
    edges = {e.repo_id: e for e in read_records(home, "edges")}  # type: ignore[union-attr]
    assert edges["lab/step-2"].parent == "lab/step-1" and edges["lab/step-1"].parent == "acme/base"  # type: ignore[attr-defined]


# --- quantized copies --------------------------------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, FFN, VOCAB = 64, 4, 2, 96, 40


def llama_state(seed: int) -> dict[str, np.ndarray]:
    """An HF llama state dict with GQA, heavy-tailed like trained weights."""
    from indexer.zoo.quantize import wide_llama_state

    return wide_llama_state(seed, hidden=HIDDEN, heads=HEADS, kv_heads=KV_HEADS, ffn=FFN, vocab=VOCAB)


def tuned(state: dict[str, np.ndarray], seed: int, step: float = 0.3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (a + step * a.std() * rng.standard_normal(a.shape)).astype(np.float32) if a.ndim == 2 else a
            for n, a in state.items()}


LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
                "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS}


def _quant_zoo(hub: Hub) -> dict[str, np.ndarray]:
    from indexer.zoo.quantize import write_gptq, write_llama_gguf

    base, other = llama_state(1), llama_state(2)
    child = tuned(base, 3)
    hub.repo("meta/base", 1, weights=base)
    (hub.root / "meta/base/config.json").write_text(json.dumps(LLAMA_CONFIG))
    hub.repo("meta/other", 1, weights=other)
    hub.repo("lab/child", 2, weights=child, card="base_model: meta/base")
    for repo, month, state, qtype in (("q/child-Q8_0-GGUF", 3, child, "Q8_0"), ("q/base-GGUF", 4, base, "F16"),
                                      ("q/child-Q4_0-GGUF", 5, child, "Q4_0")):
        folder = hub.repo(repo, month, card="base_model: lab/child\nbase_model_relation: quantized")
        write_llama_gguf(folder / f"model-{qtype}.gguf", state, qtype, heads=HEADS, kv_heads=KV_HEADS)
    write_gptq(hub.root / "q/child-GPTQ", child, LLAMA_CONFIG, bits=4, group=32)
    hub.repo("q/child-GPTQ", 6)
    # bad files: a GGUF cut inside its header, one naming an unknown quantization type
    bad = hub.repo("q/truncated-GGUF", 7)
    write_llama_gguf(bad / "model-Q8_0.gguf", child, "Q8_0", heads=HEADS, kv_heads=KV_HEADS)
    (bad / "model-Q8_0.gguf").write_bytes((bad / "model-Q8_0.gguf").read_bytes()[:200])
    return child


def test_quantized_copies_are_read_by_range_dequantized_and_placed_as_leaves(emu: HubEmulator, hub: Hub,
                                                                             tmp_path: Path) -> None:
    _quant_zoo(hub)
    home = tmp_path / "home"
    report = crawl(home, _options(emu)).as_dict()
    assert report["indexed"] == 7 and report["failed"] == {"gguf-invalid": 1}, report
    models = {m.repo_id: m for m in read_records(home, "models")}  # type: ignore[union-attr]
    assert "truncated" in models["q/truncated-GGUF"].reason  # type: ignore[union-attr]
    assert models["q/child-Q8_0-GGUF"].weights_format == "gguf" and models["q/child-GPTQ"].weights_format == "gptq"  # type: ignore[union-attr]
    assert json.loads(models["q/child-GPTQ"].details)["scheme"] == "gptq-4bit"  # type: ignore[union-attr]
    edges = {e.repo_id: e for e in read_records(home, "edges")}  # type: ignore[union-attr]
    for quant, source in (("q/child-Q8_0-GGUF", "lab/child"), ("q/child-Q4_0-GGUF", "lab/child"),
                          ("q/child-GPTQ", "lab/child"), ("q/base-GGUF", "meta/base")):
        assert (edges[quant].parent, edges[quant].relation) == (source, "quantized"), (quant, edges[quant])  # type: ignore[attr-defined]
    assert edges["lab/child"].parent == "meta/base" and edges["lab/child"].relation == "finetune"  # type: ignore[attr-defined]
    assert not any(e.parent.startswith("q/") for e in edges.values())  # type: ignore[attr-defined]  -- leaves
    q = query_model(home, "q/child-Q8_0-GGUF")
    assert q.relation == "quantized" and q.relation_agrees_with_declared is True
    # GGUF repos hold no config.json, and only the planned blocks were fetched (here: all of this tiny model)
    assert not (hub.root / "q/child-Q8_0-GGUF/config.json").exists()


# --- merges ------------------------------------------------------------------------------------------------


def test_linear_and_ties_merges_get_both_parents_with_weights_and_fine_tunes_stay_fine_tunes(
        emu: HubEmulator, hub: Hub, tmp_path: Path) -> None:
    base = llama_state(1)
    a, b = tuned(base, 2), tuned(base, 3)
    hub.repo("m/base", 1, weights=base)
    hub.repo("m/a", 2, weights=a)
    hub.repo("m/b", 3, weights=b)
    hub.repo("m/a-child", 4, weights=tuned(a, 4))  # a chain: a sits between base and a-child
    hub.repo("m/linear", 5, weights={n: (0.7 * a[n] + 0.3 * b[n]).astype(np.float32) for n in base},
             card="base_model:\n- m/a\n- m/b")
    ties = {}
    for n, w in base.items():  # TIES-like: each task vector trimmed to its largest half, over the base
        ta, tb = a[n] - w, b[n] - w
        keep = lambda t: t * (np.abs(t) >= np.quantile(np.abs(t), 0.5))  # noqa: E731
        ties[n] = (w + 0.5 * keep(ta) + 0.5 * keep(tb)).astype(np.float32) if w.ndim == 2 else w
    hub.repo("m/ties", 6, weights=ties)
    home = tmp_path / "home"
    crawl(home, _options(emu))
    edges = {e.repo_id: e for e in read_records(home, "edges")}  # type: ignore[union-attr]
    linear = edges["m/linear"]
    assert linear.relation == "merge" and [p for p, _ in linear.parents] == ["m/a", "m/b"]  # type: ignore[attr-defined]
    assert linear.parents[0][1] == pytest.approx(0.7, abs=0.02)  # type: ignore[attr-defined]
    assert edges["m/ties"].relation == "merge" and {p for p, _ in edges["m/ties"].parents} == {"m/a", "m/b"}  # type: ignore[attr-defined]
    for ft in ("m/a", "m/b", "m/a-child"):
        assert edges[ft].relation == "finetune", (ft, edges[ft])  # type: ignore[attr-defined]
    report = query_model(home, "m/linear")
    assert report.relation_agrees_with_declared is True and len(report.parents) == 2


def test_variant_files_of_one_model_are_read_once_over_http(emu: HubEmulator, hub: Hub, tmp_path: Path) -> None:
    """A repo holding `x.safetensors` and `x.fp16.safetensors` (ControlNets, SD checkpoints) is one model:
    the F32 file is read, the F16 variant left out, where reading both would refuse the repo."""
    base = llama_state(1)
    child = tuned(base, 2)
    hub.repo("m/base", 1, weights=base)
    folder = hub.repo("m/child", 2)
    save_file(child, str(folder / "diffusion_pytorch_model.safetensors"))
    save_file({n: a.astype(np.float16) for n, a in child.items()}, str(folder / "diffusion_pytorch_model.fp16.safetensors"))
    home = tmp_path / "home"
    report = crawl(home, _options(emu)).as_dict()
    assert report["indexed"] == 2 and not report["failed"], report
    edges = {e.repo_id: e for e in read_records(home, "edges")}  # type: ignore[union-attr]
    assert edges["m/child"].parent == "m/base" and edges["m/child"].relation == "finetune"  # type: ignore[attr-defined]


def test_a_huggingface_hub_cache_is_recovered_under_the_repo_ids(emu: HubEmulator, hub: Hub, tmp_path: Path) -> None:
    """`index recover ~/.cache/huggingface/hub`: the real client's cache (models--org--name/snapshots/<sha>,
    files linked to blobs) is read as org/name, one snapshot each (refs/main's), with the crawl's rows."""
    from huggingface_hub import snapshot_download

    from indexer.lineage.methods import Options
    from indexer.lineage.recover import discover_repos, recover

    base = llama_state(1)
    hub.repo("meta/base", 1, weights=base)
    hub.repo("lab/child", 2, weights=tuned(base, 3))
    hub.repo("lab/grandchild", 3, weights=tuned(tuned(base, 3), 4, step=0.1))
    hub.repo("other/scratch", 4, weights=llama_state(2))
    cache = tmp_path / "cache"
    for repo in ("meta/base", "lab/child", "lab/grandchild", "other/scratch"):
        snapshot_download(repo, cache_dir=cache, endpoint=emu.url, token=False)
    stale = cache / "models--lab--child" / "snapshots" / ("0" * 40)  # an older snapshot left in the cache
    stale.mkdir()
    save_file(llama_state(9), str(stale / "model.safetensors"))
    assert [r for r, _ in discover_repos(cache)] == ["lab/child", "lab/grandchild", "meta/base", "other/scratch"]
    (cache / "hub.json").write_bytes((hub.root / "hub.json").read_bytes())  # upload times: the cache has none
    rows = {r.repo_id: r.parent for r in recover(cache, Options(device="cpu")).rows}
    home = tmp_path / "home"
    crawl(home, _options(emu))
    crawled = {e.repo_id: e.parent for e in read_records(home, "edges")}  # type: ignore[union-attr]
    assert rows == crawled and rows["lab/grandchild"] == "lab/child" and rows["lab/child"] == "meta/base", (rows, crawled)
