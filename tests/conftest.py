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
