"""The model zoo: really trained small ViTs in trees with known lineage, written as Hub-style repos.

Every accuracy benchmark of the index is measured on these zoos. `make_zoo` builds one, `read_truth`
reads its ground truth (child -> parent) back.
"""

from indexer.zoo.build import PRESETS, SPLITS, ZooSummary, layout, make_zoo, read_truth

__all__ = ["PRESETS", "SPLITS", "ZooSummary", "layout", "make_zoo", "read_truth"]
