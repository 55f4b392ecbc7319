"""The store's format version (`home/FORMAT`) and the numbered migrations between versions.

`FORMAT` is one JSON line: ``{"format": "model-graph-index", "version": N}``. A reader refuses a
store written by a newer tool (FormatVersionError: upgrade the tool) and a store that still needs a
migration (a writer migrates on open; readers never write). Migrations follow sqlite-utils: one
function per step, `MIGRATIONS[v]` upgrades a version-v store to v+1 in place. FORMAT is rewritten
(atomically) after each step, so a crash mid-way resumes at the step that did not finish: every
migration must therefore be safe to run twice.

History: v1 is the first released layout (tables in `store.schema`, vectors in `vectors/`, cache in
`cache/`). v2 adds relations: `edges.relation` / `edges.parents`, `models.weights_format` /
`models.details` (`store.migrations.v1_to_v2`). Tests also drive the mechanism with a fake v0 and their
own step.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

from errors import FormatVersionError, NoIndexError, StoreError
from store.atomic import atomic_write_bytes

logger = logging.getLogger(__name__)

FORMAT_FILE = "FORMAT"
FORMAT_NAME = "model-graph-index"
FORMAT_VERSION = 2

Migration = Callable[[Path], None]


def _v1_to_v2(home: Path) -> None:
    from store.migrations import v1_to_v2  # pyarrow: only a writer that migrates pays for it

    v1_to_v2(home)


MIGRATIONS: dict[int, Migration] = {1: _v1_to_v2}


def read_format(home: Path) -> int | None:
    """The stored version, or None when `home` has no FORMAT file (no store yet)."""
    path = Path(home) / FORMAT_FILE
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(raw)
        ok = doc.get("format") == FORMAT_NAME and isinstance(doc.get("version"), int)
    except (ValueError, AttributeError):
        ok = False
    if not ok:
        raise StoreError(f"{path}: not a {FORMAT_NAME} FORMAT file; point INDEX_HOME at an index folder")
    return int(doc["version"])


def write_format(home: Path, version: int) -> None:
    doc = json.dumps({"format": FORMAT_NAME, "version": version}, sort_keys=True) + "\n"
    atomic_write_bytes(Path(home) / FORMAT_FILE, doc.encode("utf-8"))


def _refuse_newer(home: Path, version: int, supported: int) -> None:
    if version > supported:
        raise FormatVersionError(
            f"{home} holds format version {version}, but this tool reads up to version {supported}; "
            f"upgrade model-graph-index (pip install -U model-graph-index)"
        )


def check_readable(home: Path, *, supported: int = FORMAT_VERSION) -> int:
    """For readers: the version, or a clear error (no index / newer tool needed / needs migrating)."""
    version = read_format(home)
    if version is None:
        raise NoIndexError(str(home))
    _refuse_newer(home, version, supported)
    if version < supported:
        raise FormatVersionError(
            f"{home} holds format version {version}, older than {supported}; run any writing command "
            f"(`index crawl`, `index add`) once to migrate it"
        )
    return version


def ensure_format(
    home: Path,
    *,
    target: int = FORMAT_VERSION,
    migrations: Mapping[int, Migration] = MIGRATIONS,
) -> int:
    """For the writer (holding the lock): create FORMAT for a new store, or migrate an old one."""
    version = read_format(home)
    if version is None:
        write_format(home, target)
        logger.info("created a format v%d store at %s", target, home)
        return target
    _refuse_newer(home, version, target)
    for step in range(version, target):
        migrate = migrations.get(step)
        if migrate is None:
            raise StoreError(f"{home}: no migration from format version {step} to {step + 1}")
        logger.warning("migrating %s from format v%d to v%d", home, step, step + 1)
        migrate(Path(home))
        write_format(home, step + 1)
    return target
