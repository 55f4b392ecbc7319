"""bench/scale.py at a size CI can afford: the synthetic Hub through the real lineage path and store."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from store.query import export_forest, query_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scale():  # noqa: ANN201 -- the benchmark module
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "bench" / "scale.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["bench_scale"] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_small_synthetic_hub_end_to_end(scale, tmp_path: Path) -> None:  # noqa: ANN001
    result, path, parent = scale.run(3000, k=16, dim=64, layers=4, width=64, batch=512, seed=0)
    assert result["exact_mean"] <= 16 and result["recall"] >= 0.98
    assert result["accuracy"] >= 0.85  # 0.90 measured; the simulated truth, not the index, limits it
    for forest in path.forests.values():  # batching changed nothing about optimality
        assert forest.parents() == forest.batch_parents()
    scale.write_store(tmp_path, path, parent)
    assert export_forest(tmp_path, tmp_path / "forest.parquet") == 3000
    child = next(i for i in np.argsort(path.uploaded) if parent[i] >= 0 and path.forests[int(path.family[i])].parent(path.names[i]))
    report = query_model(tmp_path, path.names[child])
    assert report.parent == path.forests[int(path.family[child])].parent(path.names[child])
    assert report.ancestry and report.ancestry[0].parent == report.parent
    assert report.declared_base_model == path.names[parent[child]]
