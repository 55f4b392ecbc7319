"""The family registry: which architecture families the store holds, and which body keys joined them.

A model's exact key (`sketches.layers.family_key`) changes with any extra tensor (a new block before
the head, a depth cut), but such a model is still comparable with its relatives: it joins the family
whose core it shares (`sketches.layers.core_overlap` >= CORE_SHARE, on the tensors the plan read and
their shapes). The registry keeps, per family, the tensor shapes of its first model, and the aliases
(exact key -> family) decided so far, so that every later model with that key lands in the same place.

A key whose core matches several families joins the one it overlaps most (ties: the smallest key).
A family registered under names read differently since (a backbone prefix learned later) is kept as it is, with a
warning when the registry is opened. Families are never merged after the fact: their FAISS indexes and trees stay as they are; the batch
recovery (`merge_families`, union-find over all keys at once) can therefore join two families that the
incremental index keeps apart when the bridge arrives after both (not seen on any zoo; documented).

File: `home/families.json`, written atomically whenever it changes (before the arrival's rows):
    {"version": 1, "families": {key: {name: [shape...]}}, "aliases": {exact key: family key}}
A crash between the registry and the rows leaves a family with no model yet: harmless. A reader refuses
a newer version.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

from errors import FormatVersionError, StoreError
from sketches.layers import CORE_SHARE, core_overlap, normalise_name
from store.atomic import atomic_write_bytes

logger = logging.getLogger(__name__)

REGISTRY_VERSION = 1
REGISTRY_FILE = "families.json"
Shapes = Mapping[str, tuple[int, ...]]


class FamilyRegistry:
    """Exact body keys -> the family they belong to (module docstring)."""

    def __init__(self, home: Path) -> None:
        self.path = Path(home) / REGISTRY_FILE
        self.families: dict[str, dict[str, tuple[int, ...]]] = {}
        self.aliases: dict[str, str] = {}
        if self.path.is_file():
            self._read()

    def _read(self) -> None:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            version = int(doc["version"])
            families, aliases = doc["families"], doc["aliases"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"{self.path}: not a family registry ({exc}); restore it or rebuild the store") from exc
        if version > REGISTRY_VERSION:
            raise FormatVersionError(f"{self.path} is version {version}, newer than {REGISTRY_VERSION}; upgrade model-graph-index")
        self.families = {k: {n: tuple(s) for n, s in v.items()} for k, v in families.items()}
        self.aliases = dict(aliases)
        self._warn_renamed()

    def _warn_renamed(self) -> None:
        """Families registered under names that `normalise_name` now maps elsewhere (a prefix learned since:
        `dinov2.`, `language_model.`). Their models keep their rows and edges, but a later relative reads
        under the new names and cannot join them (families are never merged after the fact): said once."""
        renamed = sorted(k for k, shapes in self.families.items() if any(normalise_name(n) != n for n in shapes))
        if renamed:
            logger.warning("%s: %d families were registered under tensor names read differently since (%s); "
                           "their models keep their edges, later relatives start families of their own. Index "
                           "them again into a new INDEX_HOME to join them", self.path, len(renamed),
                           ", ".join(renamed[:3]) + (", ..." if len(renamed) > 3 else ""))

    def resolve(self, key: str, shapes: Shapes) -> str:
        """The family of a model with exact key `key` and these tensor shapes; registers what is new."""
        if key in self.aliases:
            return self.aliases[key]
        best, best_share = key, 0.0
        for family in sorted(self.families):
            share = core_overlap(shapes, self.families[family])
            if share >= CORE_SHARE and share > best_share:
                best, best_share = family, share
        if best == key:
            self.families[key] = {n: tuple(s) for n, s in sorted(shapes.items())}
        else:
            logger.info("body key %s joins family %s (core overlap %.2f)", key, best, best_share)
        self.aliases[key] = best
        self._write()
        return best

    def _write(self) -> None:
        doc = {"version": REGISTRY_VERSION, "families": {k: {n: list(s) for n, s in v.items()} for k, v in sorted(self.families.items())},
               "aliases": dict(sorted(self.aliases.items()))}
        atomic_write_bytes(self.path, (json.dumps(doc, sort_keys=True) + "\n").encode())
