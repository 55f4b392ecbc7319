"""AWQ copies hold their source's matrices times per-channel scales (AutoAWQ folds them in before packing):
the `quantized` label is judged after fitting those scales (indexer.relations.rules.copy_relative), in
the batch recovery and in the crawl's incremental index alike."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from test_crawl_relations import LLAMA_CONFIG, Hub, _options, emu, hub, llama_state, tuned  # noqa: F401

from indexer.crawl import crawl
from indexer.hub_emulator import HubEmulator
from indexer.lineage.methods import Options
from indexer.lineage.recover import recover
from indexer.relations.rules import copy_relative, folded_relative, within_quantization_error
from indexer.zoo.quantize import awq_fold, write_awq
from sketches.packed import PACKED_RELATIVE_ERROR
from store.tables import read_records

AWQ_ERROR = PACKED_RELATIVE_ERROR["awq-4bit"]


def _matrices(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n: a for n, a in state.items() if a.ndim == 2 and ".layers." in n}


def _plain(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    num = sum(float(np.square(a[n] - b[n]).sum()) for n in a)
    return math.sqrt(num / sum(float(np.square(a[n]).sum() + np.square(b[n]).sum()) / 2 for n in a))


def test_folded_scales_are_fitted_away_and_a_fine_tune_is_not() -> None:
    child = llama_state(1)
    folded = _matrices(awq_fold(child, seed=3, spread=1.0))
    plain = _plain(folded, _matrices(child))
    assert plain > 3 * AWQ_ERROR  # the plain distance alone would call the copy a fine-tune
    assert folded_relative(folded, _matrices(child)) < 1e-3
    assert copy_relative(plain, folded, _matrices(child), AWQ_ERROR) == copy_relative(plain, _matrices(child), folded, AWQ_ERROR)
    for step in (0.05, 0.3):  # a fine-tune's update is not a scaling: the fit takes off under 3 % of it
        tuned_mats = _matrices(tuned(child, 5, step=step))
        assert folded_relative(tuned_mats, _matrices(child)) > 0.97 * _plain(tuned_mats, _matrices(child))
    stranger = _matrices(llama_state(2))
    assert not within_quantization_error(folded_relative(stranger, _matrices(child)), AWQ_ERROR)
    # within the error already: the plain number stands (no fit is run)
    assert copy_relative(0.01, folded, _matrices(child), AWQ_ERROR) == 0.01


@pytest.fixture()
def awq_hub(hub: Hub) -> Hub:  # noqa: F811
    base = llama_state(1)
    child = tuned(base, 2)
    hub.repo("m/base", 1, weights=base)
    hub.repo("m/other", 1, weights=llama_state(3))
    hub.repo("m/child", 2, weights=child)
    hub.repo("m/sibling", 3, weights=tuned(base, 4))
    write_awq(hub.root / "q/child-AWQ", child, LLAMA_CONFIG, fold_seed=7, spread=1.0)
    write_awq(hub.root / "q/base-AWQ-nofold", base, LLAMA_CONFIG)
    hub.repo("q/child-AWQ", 4)
    hub.repo("q/base-AWQ-nofold", 5)
    return hub


def test_awq_copies_with_folded_scales_are_quantized_in_batch_and_over_http(emu: HubEmulator, awq_hub: Hub,  # noqa: F811
                                                                            tmp_path: Path) -> None:
    rows = {r.repo_id: (r.parent, r.relation) for r in recover(awq_hub.root, Options(device="cpu")).rows}
    assert rows["q/child-AWQ"] == ("m/child", "quantized") and rows["q/base-AWQ-nofold"] == ("m/base", "quantized")
    home = tmp_path / "home"
    report = crawl(home, _options(emu)).as_dict()
    assert report["indexed"] == 6 and not report["failed"], report
    edges = {e.repo_id: (e.parent, e.relation) for e in read_records(home, "edges")}  # type: ignore[union-attr]
    assert edges == rows, (edges, rows)
