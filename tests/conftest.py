"""Fixtures shared across test modules: built once per session because they really train models."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_ft_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tiny` preset of the zoo (2 trees, 8 really trained ViTs, full fine-tuning), seed 0.

    Tests must treat it as read-only: copy it before changing files in it.
    """
    from indexer.zoo import make_zoo

    out = tmp_path_factory.mktemp("tiny-ft") / "zoo"
    make_zoo(out, preset="tiny", split="ft", seed=0, workers=1)
    return out


@pytest.fixture(scope="session")
def wild_tiny_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `wild-tiny` preset (14 really trained / copied conv nets with BatchNorm: a root, 2 strangers,
    frozen-backbone transfer, an extra-layer transfer, a 3-checkpoint snake, re-saves, f16/bf16 copies,
    a byte-identical duplicate), seed 0. Read-only: copy it before changing files in it.
    """
    from indexer.zoo.wild import make_wild_zoo

    out = tmp_path_factory.mktemp("wild-tiny") / "zoo"
    make_wild_zoo(out, preset="wild-tiny", seed=0, workers=1)
    return out
