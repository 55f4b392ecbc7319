"""DoRA adapters (PEFT `use_dora`), saved and merged by the real `peft`: read with their magnitudes, placed
and chained like LoRA adapters, and their magnitudes tested against the declared base's rows, in batch
(`index recover`) and in the incremental index (`index add`) alike."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PeftModel, PromptTuningConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from indexer.crawl import add_local
from indexer.lineage.methods import Options
from indexer.lineage.recover import discover_repos, recover
from indexer.relations.adapters import decisive
from sketches.adapter import lora_updates, magnitude_fit, parse_adapter_config
from store.tables import read_records

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def train(model: torch.nn.Module, seed: int, steps: int = 30, lr: float = 1e-2) -> None:
    """A few AdamW steps on a fixed random token stream (the task does not matter, the update does)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 64, (8, 16), generator=gen)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=tokens, labels=tokens).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def dora(base: LlamaForCausalLM, seed: int, start: Path | None = None, lr: float = 1e-3) -> PeftModel:
    """DoRA on every linear layer of the blocks. At lr 1e-3 the magnitudes move by up to 0.03 in 30 steps, ~10 %
    of the tiny model's row norms (0.16): a real run's lr 1e-4 - 2e-4 over thousands of steps moves a
    7B's (~1.3) by a few %."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        if start is None:
            torch.manual_seed(seed)
            peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True,
                                                         lora_dropout=0.0))
        else:
            peft_model = PeftModel.from_pretrained(base, start, is_trainable=True)
        train(peft_model, seed, lr=lr)
    return peft_model


def save_adapter(peft_model: PeftModel, folder: Path, declared: str) -> None:
    peft_model.save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": declared}))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """m/base, an unrelated m/other of the same shapes, a fine-tune m/base-ft; DoRA adapters trained on
    m/base: l/dora (declares it), l/dora-more (l/dora trained further), l/dora-liar (declares m/other)."""
    root = tmp_path_factory.mktemp("dora") / "hub"
    base, other = tiny_llama(1), tiny_llama(2)
    base.save_pretrained(root / "m/base")
    other.save_pretrained(root / "m/other")
    tuned = tiny_llama(1)
    train(tuned, 5, steps=10, lr=2e-4)
    tuned.save_pretrained(root / "m/base-ft")
    first = dora(tiny_llama(1), 10)
    save_adapter(first, root / "l/dora", "m/base")
    save_adapter(dora(tiny_llama(1), 11, start=root / "l/dora"), root / "l/dora-more", "m/base")
    save_adapter(dora(tiny_llama(1), 12), root / "l/dora-liar", "m/other")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        torch.manual_seed(13)  # a plain LoRA on the LM head too: a tensor the lineage compares nowhere
        head = get_peft_model(tiny_llama(1), LoraConfig(r=4, target_modules=["v_proj", "lm_head"], lora_dropout=0.0))
    train(head, 13, lr=1e-3)
    save_adapter(head, root / "l/lora-head", "m/base")
    for name, config in (("l/loha", LoHaConfig(r=4, alpha=8, target_modules=["v_proj", "down_proj"])),
                         ("l/lokr", LoKrConfig(r=2, alpha=4, target_modules=["q_proj", "up_proj"]))):
        with warnings.catch_warnings():  # PEFT's other low-rank kinds, placed as LoRA adapters are
            warnings.filterwarnings("ignore", category=FutureWarning)
            torch.manual_seed(14)
            other_kind = get_peft_model(tiny_llama(1), config)
        train(other_kind, 14, lr=1e-3)
        save_adapter(other_kind, root / name, "m/base")
    # PEFT writes base_model_name_or_path null for a base built from a config: the card names it
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        torch.manual_seed(15)
        nameless = get_peft_model(tiny_llama(1), LoraConfig(r=4, target_modules=["v_proj"], lora_dropout=0.0))
    train(nameless, 15, lr=1e-3)
    nameless.save_pretrained(root / "l/card-base")
    assert json.loads((root / "l/card-base/adapter_config.json").read_text())["base_model_name_or_path"] is None
    (root / "l/card-base/README.md").write_text("---\nbase_model: m/base\nlibrary_name: peft\n---\n")
    # PEFT types whose updates are not low-rank factors: placed under the base they declare, nothing more
    for name, config in (("l/ia3", IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"])),
                         ("l/prompt", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            torch.manual_seed(16)
            save_adapter(get_peft_model(tiny_llama(1), config), root / name, "m/base")
    created = {"m/base": 1, "m/other": 2, "m/base-ft": 3, "l/dora": 4, "l/dora-more": 5, "l/dora-liar": 6,
               "l/lora-head": 7, "l/loha": 8, "l/lokr": 9, "l/card-base": 10, "l/ia3": 11, "l/prompt": 12}
    (root / "hub.json").write_text(json.dumps({"version": 1, "repos": {
        r: {"createdAt": f"2024-{m:02d}-01T00:00:00.000Z"} for r, m in created.items()}}))
    return root


def _updates(folder: Path) -> dict:
    config = parse_adapter_config((folder / "adapter_config.json").read_bytes())
    return lora_updates(config, safetensors.numpy.load_file(str(folder / "adapter_model.safetensors")))


def _weights(folder: Path) -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(str(folder / "model.safetensors"))


def test_magnitudes_and_factors_give_peft_merged_weight(zoo: Path) -> None:
    """W' = m * (W + s B A) / ||W + s B A|| by output row, as PEFT's merge_and_unload writes it."""
    updates = _updates(zoo / "l/dora")
    assert sorted(updates) == sorted(f"model.layers.{i}.{'mlp' if p in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}"
                                     f".{p}.weight" for i in range(2) for p in TARGETS)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        merged = PeftModel.from_pretrained(tiny_llama(1), zoo / "l/dora").merge_and_unload().state_dict()
    base = _weights(zoo / "m/base")
    for name, u in updates.items():
        direction = base[name].astype(np.float64) + u.dense()
        ours = u.magnitude[:, None] * direction / np.linalg.norm(direction, axis=1, keepdims=True)
        np.testing.assert_allclose(ours, merged[name].numpy(), rtol=1e-4, atol=1e-6)


def test_magnitudes_fit_the_base_family_only(zoo: Path) -> None:
    """On the base the magnitudes follow its row norms; a fine-tune of the base is related too; an
    unrelated model of the same shapes is not: its Z is a draw of the null's N(0, 1)."""
    updates = _updates(zoo / "l/dora")
    on_base = magnitude_fit(updates, _weights(zoo / "m/base"))
    on_ft = magnitude_fit(updates, _weights(zoo / "m/base-ft"))
    on_other = magnitude_fit(updates, _weights(zoo / "m/other"))
    assert on_base is not None and on_ft is not None and on_other is not None
    # query / key rows are left out (`exchangeable_rows`): v, o, gate, up, down of 2 layers
    assert on_base.modules == 10 and on_base.rows == 2 * (32 + 64 + 96 + 96 + 64)
    assert on_base.related and on_ft.related and not on_other.related, (on_base, on_ft, on_other)
    assert decisive(on_other) and abs(on_other.score) < 4
    # the error is how far training moved m (15 % here); the unrelated rows are as far by chance: the
    # correlation, not the error, is what tells them apart
    assert 0.05 < on_base.median_relative_error < 0.25
    first_rows = {n: a[:16] for n, a in _weights(zoo / "m/base").items()}  # a budgeted read: first rows only
    part = magnitude_fit({w: u for w, u in updates.items() if "mlp" not in w}, first_rows)
    assert part is not None and part.rows == 4 * 16 and not decisive(part)


def _rows(zoo: Path, home: Path) -> tuple[dict[str, tuple[str, str, float]], dict[str, tuple[str, str, float]]]:
    forest = recover(zoo, Options(device="cpu"))
    batch = {r.repo_id: (r.parent, r.relation, r.confidence) for r in forest.rows}
    add_local(home, [path for _, path in discover_repos(zoo)], budget=64 << 20, device="cpu", progress=False)
    edges = read_records(home, "edges")
    return batch, {e.repo_id: (e.parent, e.relation, e.confidence) for e in edges}  # type: ignore[attr-defined]


def test_dora_adapters_are_placed_chained_and_checked_in_batch_and_incremental(zoo: Path, tmp_path: Path) -> None:
    """Before: every DoRA adapter was a failed row ("needs the base weights"). Now each hangs under its
    declared base, a continued run under the adapter it continues, and one that declares a base its
    magnitudes do not fit is placed there at confidence 0.5 (not 1), the test's figures in its models row."""
    batch, incremental = _rows(zoo, tmp_path / "home")
    assert batch["l/dora"] == ("m/base", "adapter", 1.0)
    assert batch["l/dora-more"][:2] == ("l/dora", "adapter") and 0 < batch["l/dora-more"][2] < 1
    assert batch["l/dora-liar"] == ("m/other", "adapter", 0.5)
    # an update of the LM head is checked against the base's LM head in both
    assert batch["l/lora-head"] == ("m/base", "adapter", 1.0)
    assert batch["l/loha"] == ("m/base", "adapter", 1.0) and batch["l/lokr"] == ("m/base", "adapter", 1.0)
    assert batch["l/card-base"] == ("m/base", "adapter", 1.0)  # before: "names no base model", a failed row
    # IA3, prompt tuning: under the declared base, nothing read to check it by (before: failed rows)
    assert batch["l/ia3"] == ("m/base", "adapter", 0.5) and batch["l/prompt"] == ("m/base", "adapter", 0.5)
    for repo in ("l/dora", "l/dora-more", "l/dora-liar", "l/lora-head", "l/loha", "l/lokr", "l/card-base", "l/ia3", "l/prompt"):
        assert incremental[repo] == pytest.approx(batch[repo]), repo
    models = {m.repo_id: json.loads(m.details) for m in read_records(tmp_path / "home", "models")}  # type: ignore[attr-defined]
    liar = models["l/dora-liar"]["dora_magnitudes"]
    assert models["l/dora-liar"]["verdict"] == "compatible"  # its shapes fit: the magnitudes only cast doubt
    assert not liar["related"] and liar["decisive"] and models["l/dora"]["dora_magnitudes"]["related"]
    assert models["l/dora"]["use_dora"] is True
    from cli import _details_line
    from store.query import query_model

    report = query_model(tmp_path / "home", "l/dora-liar")  # arrived before m/other: its models row has no family
    assert report.family == query_model(tmp_path / "home", "m/other").family != ""
    assert "dora_magnitudes.related=False" in _details_line(report.details)


def test_the_crawl_reads_the_base_rows_by_range_and_agrees_with_batch(zoo: Path, tmp_path: Path) -> None:
    """Over HTTP from the emulator, listed newest first (every adapter before its base): the liar's base
    rows come from the Hub by range, so its verdict is the same as when its base is indexed first."""
    from indexer.crawl import CrawlOptions, crawl
    from indexer.hub_emulator import HubEmulator
    from indexer.retry import RetryPolicy

    home = tmp_path / "home"
    with HubEmulator(zoo) as emu:
        report = crawl(home, CrawlOptions(endpoint=emu.url, progress=False, policy=RetryPolicy(sleep=lambda s: None),
                                          device="cpu")).as_dict()
    assert report["indexed"] == 12, report
    edges = {e.repo_id: (e.parent, e.relation, e.confidence) for e in read_records(home, "edges")}  # type: ignore[attr-defined]
    assert edges["l/dora"] == ("m/base", "adapter", 1.0) and edges["l/dora-liar"] == ("m/other", "adapter", 0.5)
    assert edges["l/dora-more"][:2] == ("l/dora", "adapter")
    details = {m.repo_id: json.loads(m.details) for m in read_records(home, "models")}  # type: ignore[attr-defined]
    assert details["l/dora-liar"]["dora_magnitudes"]["rows"] == 8 * 32
    assert details["l/dora"]["dora_magnitudes"]["related"] and details["l/dora"]["verdict"] == "compatible"


def test_confidence_in_the_declared_base() -> None:
    """Shapes that do not fit: 0; no shapes: 0.5; magnitudes that do not follow the rows, by a test with the
    rows to tell: 0.5 (another model, or a run long enough to move them: not told apart); else 1."""
    from indexer.relations.adapters import base_confidence
    from sketches.adapter import Compatibility, MagnitudeFit

    fits, clashes = Compatibility("compatible", (), 8), Compatibility("incompatible", ("x: not in the base",), 7)
    far = MagnitudeFit(8, 256, 0.3, 0.38, False, 0.2)
    thin = MagnitudeFit(2, 16, 0.3, 0.38, False, 0.2)  # 8 rows of 2 weights: could not have told
    near = MagnitudeFit(8, 256, 11.0, 1e-28, True, 0.02)
    assert base_confidence(clashes, near) == 0.0 and base_confidence(None, None) == 0.5
    assert base_confidence(fits, far) == 0.5 and base_confidence(fits, thin) == 1.0
    assert base_confidence(fits, near) == 1.0 and base_confidence(fits, None) == 1.0


def test_index_compare_answers_was_it_trained_on_this_model(zoo: Path) -> None:
    """`index compare` on an adapter: against a model, the shapes and (DoRA) the magnitudes against its
    rows; against another adapter, whether one is the other trained further."""
    from indexer.lineage.compare import compare, load_local, render

    def run(x: str, y: str):  # noqa: ANN202
        return compare(load_local(zoo / x), load_local(zoo / y))

    on_base = run("m/base", "l/dora")
    assert (on_base.adapter, on_base.verdict, on_base.direction) == ("B", "compatible", "A -> B")
    assert on_base.magnitudes["related"] and "follow its rows" in on_base.conclusion
    liar = run("l/dora-liar", "m/other")  # declares m/other, trained on m/base
    assert liar.verdict == "compatible" and not liar.magnitudes["related"] and liar.magnitudes["decisive"]
    assert "do not follow" in render(liar) and liar.direction == "unknown"
    assert run("l/dora-liar", "m/base").magnitudes["related"]  # the model it was trained on
    more = run("l/dora-more", "l/dora")
    assert more.kind == "adapter-adapter" and more.continued and more.direction == "B -> A"
    independent = run("l/dora", "l/dora-liar")
    assert not independent.continued and independent.chain_ratio > 0.9
