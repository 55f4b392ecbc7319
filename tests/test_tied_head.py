"""A tied lm_head saved twice (sketches.layers.tied_heads): transformers writes GPT-2's output head once (it is
the token embedding), other tools and older conversions twice. A re-save with the copy is the same model."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from model_support import perturb_matrices

from indexer.crawl import add_local, read_folder
from indexer.lineage.methods import Options
from indexer.lineage.recover import recover
from sketches.layers import tied_heads
from store.tables import read_records

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def _gpt2(seed: int):  # noqa: ANN202 -- a transformers model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=32, n_embd=64, n_layer=2, n_head=2))


def _with_head_written(folder: Path, model: object) -> None:
    """The state dict with the tied head written out, as tools that keep shared tensors save it."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    state = {n: v.detach().clone().contiguous() for n, v in model.state_dict().items()}  # type: ignore[attr-defined]
    assert "lm_head.weight" in state and torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))


def test_only_a_bit_for_bit_copy_of_the_embedding_is_a_tied_head() -> None:
    rng = np.random.default_rng(0)
    wte = rng.normal(size=(40, 8)).astype(np.float32)
    untied = wte.copy()
    untied[20] += 1e-3  # trained apart in one middle row only: its ends still match, read as tied
    arrays = {"wte.weight": wte, "lm_head.weight": wte.copy(), "h.0.mlp.c_fc.weight": wte}
    assert tied_heads({n: a.shape for n, a in arrays.items()}, lambda n, r: arrays[n][r[0]:r[1]]) == ["lm_head.weight"]
    other = {"wte.weight": wte, "lm_head.weight": np.flipud(wte).copy()}
    assert tied_heads({n: a.shape for n, a in other.items()}, lambda n, r: other[n][r[0]:r[1]]) == []
    wide = {"wte.weight": wte, "lm_head.weight": np.zeros((41, 8), np.float32)}  # another shape: never tied
    assert tied_heads({n: a.shape for n, a in wide.items()}, lambda n, r: wide[n][r[0]:r[1]]) == []
    bert = {"bert.embeddings.word_embeddings.weight": wte, "cls.predictions.decoder.weight": wte.copy(),
            "roberta.embeddings.word_embeddings.weight": wte, "lm_head.decoder.weight": wte.copy(),
            "distilbert.embeddings.word_embeddings.weight": wte, "vocab_projector.weight": wte.copy()}
    assert tied_heads({n: a.shape for n, a in bert.items()}, lambda n, r: bert[n][r[0]:r[1]]) == [
        "cls.predictions.decoder.weight", "lm_head.decoder.weight", "vocab_projector.weight"]


def test_a_resave_with_the_tied_head_written_out_is_a_duplicate(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    base = _gpt2(0)
    base.save_pretrained(hub / "o/gpt2")  # the head written once
    _with_head_written(hub / "mirror/gpt2", base)
    ft = perturb_matrices(copy.deepcopy(base), 0.05, 1)
    _with_head_written(hub / "lab/gpt2-ft", ft)
    order = ("o/gpt2", "mirror/gpt2", "lab/gpt2-ft")
    (hub / "hub.json").write_text(json.dumps({"version": 1, "repos": {
        r: {"createdAt": f"2024-0{i + 1}-01T00:00:00.000Z"} for i, r in enumerate(order)}}))
    read, _ = read_folder(hub / "mirror/gpt2", budget=64 << 20)
    assert "lm_head.weight" not in read.arrays
    want = {"o/gpt2": ("", ""), "mirror/gpt2": ("o/gpt2", "duplicate"), "lab/gpt2-ft": ("o/gpt2", "finetune")}
    assert {r.repo_id: (r.parent, r.relation) for r in recover(hub, Options(device="cpu")).rows} == want
    add_local(tmp_path / "home", [hub / r for r in order], budget=64 << 20, device="cpu", progress=False)
    assert {e.repo_id: (e.parent, e.relation) for e in read_records(tmp_path / "home", "edges")} == want  # type: ignore[union-attr]
    from indexer.lineage.compare import compare, load_local

    result = compare(load_local(hub / "o/gpt2"), load_local(hub / "mirror/gpt2"))  # `index compare`
    assert result.identical and result.direction == "duplicate"
