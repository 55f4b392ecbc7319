"""The family forest of each wild preset: which model comes from which, by what phenomenon, trained how.

Every architecture gets the same forest (the conv net one model more: the extra-layer transfer):

    R   pre-trained root: most data and steps, a broad objective (20 image classes / MLM + NSP / LM on
        a corpus of 6 languages and 2 dialects)
    S1, S2  strangers: same architecture and init scheme, other seeds, other data; they stay roots
        S1 -> S1f   a fine-tune of a stranger (so strangers are trees, not lone points)
    R -> T1, T2     frozen-backbone transfer, new heads of different class counts (bodies bit-identical)
         T1 -> T1f  full fine-tune of the probe (linear probe, then fine-tune)
    R -> X      (conv) transfer with an extra block before the head (Linear, a new BatchNorm1d, ReLU, Linear)
    R -> H      long, high-learning-rate full fine-tune: its body drifts far from R
    R -> C      continued pre-training on a new domain (a generalisation step)
         C -> Cf
    R -> K1 -> K2 -> K3   one fine-tuning run saved at three successive steps (a "snake")
    R -> F1..F4           plain fine-tunes, varied lr / epochs (a fan)
         F1 -> F1a, F1b
    copies: R -> P (re-saved under another prefix), F2 -> NB (re-saved without buffers), R -> BF (bf16),
            T1f -> FP (f16), F3 -> D (byte-identical duplicate)

Names (`org/<arch word>-<word>-<4 hex>`), orgs, seeds and upload times are drawn from the zoo seed;
names carry no lineage hint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from indexer.zoo.build import ORGS, _upload_times
from indexer.zoo.wild.archs import ArchName
from indexer.zoo.wild.train import Recipe

logger = logging.getLogger(__name__)

Tag = Literal["root", "stranger", "frozen-transfer", "extra-layer", "long-high-lr", "continued-pretrain", "snake",
              "finetune", "resave-prefix", "resave-nobuffer", "f16", "bf16", "duplicate"]
CopyOp = Literal["prefix", "nobuffer", "f16", "bf16", "duplicate"]
Relation = Literal["", "finetune", "quantized", "duplicate"]

_COPY_TAGS: dict[str, Tag] = {"prefix": "resave-prefix", "nobuffer": "resave-nobuffer", "f16": "f16",
                              "bf16": "bf16", "duplicate": "duplicate"}
_COPY_RELATIONS: dict[str, Relation] = {"prefix": "duplicate", "nobuffer": "duplicate", "f16": "quantized",
                                        "bf16": "quantized", "duplicate": "duplicate"}


@dataclass(frozen=True)
class Node:
    """One model of a preset before names and seeds: a key, its parent's key, and how it is made."""

    key: str
    parent: str | None
    tag: Tag
    recipe: Recipe | None = None
    copy: CopyOp | None = None
    job: str | None = None  # a later snake checkpoint: the key of the run's first checkpoint
    checkpoint: int = 0  # its position in that run


@dataclass(frozen=True)
class WildSpec:
    """One model of a wild zoo as laid out before training."""

    index: int
    repo_id: str
    parent: str | None
    tag: Tag
    relation: Relation
    arch: ArchName
    recipe: Recipe | None  # None for copies
    copy: CopyOp | None
    job: str  # repo id of the first model its job writes: itself, or a snake's first checkpoint
    checkpoint: int  # position within its job (0 unless a later snake checkpoint)
    level: int
    seed: int
    created_at: str


def _copy(key: str, parent: str, op: CopyOp) -> Node:
    return Node(key, parent, _COPY_TAGS[op], copy=op)


def _snake(parent: str, recipe: Recipe) -> list[Node]:
    run = replace(recipe, checkpoints=3)
    return [Node("K1", parent, "snake", run), Node("K2", "K1", "snake", run, job="K1", checkpoint=1),
            Node("K3", "K2", "snake", run, job="K1", checkpoint=2)]


@dataclass(frozen=True)
class Book:
    """The recipes of one architecture's forest, by role."""

    root: Recipe
    strangers: tuple[Recipe, Recipe]
    stranger_child: Recipe
    transfers: tuple[Recipe, Recipe]
    transfer_ft: Recipe
    extra: Recipe | None
    high: Recipe
    continued: Recipe
    continued_ft: Recipe
    snake: Recipe
    fan: tuple[Recipe, Recipe, Recipe, Recipe]
    fan_children: tuple[Recipe, Recipe]


def _forest(book: Book) -> list[Node]:
    """The full forest of the module doc, parents listed before children."""
    nodes = [Node("R", None, "root", book.root), Node("S1", None, "stranger", book.strangers[0]),
             Node("S2", None, "stranger", book.strangers[1]), Node("S1f", "S1", "finetune", book.stranger_child),
             Node("T1", "R", "frozen-transfer", book.transfers[0]), Node("T2", "R", "frozen-transfer", book.transfers[1]),
             Node("T1f", "T1", "finetune", book.transfer_ft)]
    if book.extra is not None:
        nodes.append(Node("X", "R", "extra-layer", book.extra))
    nodes += [Node("H", "R", "long-high-lr", book.high), Node("C", "R", "continued-pretrain", book.continued),
              Node("Cf", "C", "finetune", book.continued_ft), *_snake("R", book.snake)]
    nodes += [Node(f"F{i + 1}", "R", "finetune", r) for i, r in enumerate(book.fan)]
    nodes += [Node("F1a", "F1", "finetune", book.fan_children[0]), Node("F1b", "F1", "finetune", book.fan_children[1])]
    nodes += [_copy("P", "R", "prefix"), _copy("NB", "F2", "nobuffer"), _copy("BF", "R", "bf16"),
              _copy("FP", "T1f", "f16"), _copy("D", "F3", "duplicate")]
    return nodes


# --- recipes per architecture ------------------------------------------------------------------------


def _img(task: str, n: int, epochs: int, lr: float, *, optimizer: str = "sgd", head: str = "classify",
         **kw: Any) -> Recipe:
    """A conv-net recipe: SGD fine-tuning unless told otherwise."""
    return Recipe(head=head, task=task, objective="classify", n_train=n, epochs=epochs, lr=lr,  # type: ignore[arg-type]
                  optimizer=optimizer, **kw)  # type: ignore[arg-type]


def _conv_book() -> Book:
    pre: dict[str, Any] = {"optimizer": "adamw", "weight_decay": 0.05, "warmup": True}
    return Book(
        root=_img("digits-patterns", 6144, 12, 2e-3, **pre),
        strangers=(_img("digits", 2048, 6, 2e-3, **pre), _img("shapes", 2048, 5, 2e-3, **pre)),
        stranger_child=_img("parity", 2048, 4, 1e-2),
        transfers=(_img("parity", 1024, 4, 1e-2, frozen_body=True), _img("low", 1024, 4, 1e-2, frozen_body=True)),
        transfer_ft=_img("parity", 2048, 4, 3e-3, keep_head=True),
        extra=_img("mod3", 2048, 5, 1e-2, head="classify-extra"),
        high=_img("noisy", 4096, 20, 1e-2, weight_decay=2e-2),  # drift 0.72 (seed 0); wd 5e-4: 0.27
        continued=_img("broad", 4096, 6, 1e-3, **pre),
        continued_ft=_img("invert", 2048, 5, 1e-2),
        snake=_img("count", 2048, 6, 1e-2),
        fan=(_img("mirror", 2048, 8, 3e-3), _img("high", 2048, 5, 1e-2), _img("lt5", 2048, 3, 3e-2),
             _img("orientation", 2048, 6, 1e-3)),
        fan_children=(_img("rot90", 2048, 5, 1e-2), _img("mirror", 1024, 3, 1e-3, keep_head=True)),
    )


def _txt(task: str, objective: str, n: int, epochs: int, lr: float, **kw: Any) -> Recipe:
    """A BERT / GPT-2 recipe: AdamW, weight decay 0.01."""
    head = {"classify": "classify", "mlm-nsp": "pretrain", "lm": "lm"}[objective]
    return Recipe(head=head, task=task, objective=objective, n_train=n, epochs=epochs, lr=lr,  # type: ignore[arg-type]
                  optimizer="adamw", weight_decay=0.01, **kw)


def _bert_book() -> Book:
    pre: dict[str, Any] = {"warmup": True}
    return Book(
        root=_txt("web", "mlm-nsp", 12800, 4, 1e-3, **pre),  # 800 steps: 0.20 masked-token accuracy
        strangers=(_txt("forum", "mlm-nsp", 4096, 2, 1e-3, **pre), _txt("dialect-3", "classify", 2048, 3, 1e-3, **pre)),
        stranger_child=_txt("forum-2", "classify", 2048, 3, 2e-4),
        transfers=(_txt("dialect-2", "classify", 2048, 3, 1e-2, frozen_body=True),
                   _txt("dialect-5", "classify", 2048, 3, 1e-2, frozen_body=True)),
        transfer_ft=_txt("dialect-2", "classify", 2048, 3, 2e-4, keep_head=True),
        extra=None,
        high=_txt("dialect-4", "classify", 1024, 20, 2e-3),  # 320 steps: drift 0.65 (seed 0)
        continued=_txt("bio", "mlm-nsp", 4096, 3, 5e-4, keep_head=True, **pre),
        continued_ft=_txt("bio-3", "classify", 2048, 3, 2e-4),
        snake=_txt("langid-3", "classify", 2048, 6, 2e-4),
        fan=(_txt("langid-6", "classify", 2048, 3, 5e-4), _txt("dialect-4", "classify", 1024, 4, 5e-5),
             _txt("dialect-3", "classify", 2048, 2, 1e-4), _txt("langid-3", "classify", 2048, 3, 3e-4)),
        fan_children=(_txt("dialect-5", "classify", 2048, 3, 2e-4),
                      _txt("langid-6", "classify", 1024, 2, 5e-5, keep_head=True)),
    )


def _gpt2_book() -> Book:
    pre: dict[str, Any] = {"warmup": True}
    return Book(
        root=_txt("web", "lm", 12800, 3, 1e-3, **pre),  # 600 steps: 0.27 next-token accuracy
        strangers=(_txt("forum", "lm", 4096, 2, 1e-3, **pre), _txt("legal", "lm", 2048, 3, 1e-3, **pre)),
        stranger_child=_txt("forum-2", "classify", 2048, 3, 2e-4),
        transfers=(_txt("dialect-2", "classify", 2048, 3, 1e-2, frozen_body=True),
                   _txt("dialect-5", "classify", 2048, 3, 1e-2, frozen_body=True)),
        transfer_ft=_txt("dialect-2", "classify", 2048, 3, 2e-4, keep_head=True),
        extra=None,
        high=_txt("reviews", "lm", 1024, 20, 1e-3, keep_head=True),  # 320 steps: drift 0.62; at 2e-3 0.94
        continued=_txt("bio", "lm", 4096, 3, 5e-4, keep_head=True, **pre),
        continued_ft=_txt("patents", "lm", 1024, 3, 2e-4, keep_head=True),
        snake=_txt("chat", "lm", 2048, 6, 2e-4, keep_head=True),
        fan=(_txt("news", "lm", 2048, 3, 2e-4, keep_head=True), _txt("poetry", "lm", 1024, 4, 1e-4, keep_head=True),
             _txt("langid-6", "classify", 2048, 2, 5e-4), _txt("dialect-4", "classify", 2048, 3, 1e-4)),
        fan_children=(_txt("reviews", "lm", 1024, 3, 1e-4, keep_head=True),
                      _txt("poetry", "lm", 1024, 2, 5e-5, keep_head=True)),
    )


def _tiny_nodes() -> list[Node]:
    """A handful of conv models covering what the tests check; under a minute on one core."""
    pre: dict[str, Any] = {"optimizer": "adamw", "weight_decay": 0.05, "warmup": True}
    return [Node("R", None, "root", _img("digits-patterns", 2048, 4, 2e-3, **pre)),
            Node("S1", None, "stranger", _img("digits", 512, 2, 2e-3, **pre)),
            Node("S2", None, "stranger", _img("shapes", 512, 2, 2e-3, **pre)),
            Node("T1", "R", "frozen-transfer", _img("parity", 512, 2, 1e-2, frozen_body=True)),
            Node("T2", "R", "frozen-transfer", _img("low", 512, 2, 1e-2, frozen_body=True)),
            Node("X", "R", "extra-layer", _img("mod3", 512, 2, 3e-3, head="classify-extra")),
            *_snake("R", _img("count", 512, 3, 5e-3)),
            _copy("P", "R", "prefix"), _copy("NB", "T1", "nobuffer"), _copy("BF", "R", "bf16"),
            _copy("FP", "T1", "f16"), _copy("D", "T2", "duplicate")]


@dataclass(frozen=True)
class WildPreset:
    arch: ArchName
    stem: tuple[str, ...]  # the architecture words of the repo names


WILD_PRESETS: dict[str, WildPreset] = {
    "wild-conv": WildPreset("conv", ("resnet-mini", "resnet8", "convnet-s")),
    "wild-bert": WildPreset("bert", ("bert-mini", "bert-small", "tiny-bert")),
    "wild-gpt2": WildPreset("gpt2", ("gpt2-mini", "gpt2-small", "tiny-gpt2")),
    "wild-tiny": WildPreset("conv", ("resnet-mini", "resnet8", "convnet-s")),
}
WILD_ORDER: tuple[str, ...] = ("wild-conv", "wild-bert", "wild-gpt2", "wild-tiny")


def nodes_of(preset: str) -> list[Node]:
    if preset == "wild-tiny":
        return _tiny_nodes()
    book = {"conv": _conv_book, "bert": _bert_book, "gpt2": _gpt2_book}[WILD_PRESETS[preset].arch]()
    return _forest(book)


# --- names, seeds, times -----------------------------------------------------------------------------

_WORDS = ("alder", "basalt", "cobalt", "dune", "estuary", "fennel", "garnet", "heron", "iris", "juniper", "kestrel",
          "lichen", "marlin", "nimbus", "onyx", "pumice", "quartz", "rowan", "sorrel", "tamarack", "umber", "vesper",
          "willow", "yarrow", "zephyr")


def _names(n: int, stems: tuple[str, ...], rng: np.random.Generator) -> list[str]:
    """Unique `org/<stem>-<word>-<4 hex>` ids, every part drawn per model: no lineage in a name."""
    taken: set[str] = set()
    out = []
    while len(out) < n:
        org, stem, word = (ORGS[int(rng.integers(len(ORGS)))], stems[int(rng.integers(len(stems)))],
                           _WORDS[int(rng.integers(len(_WORDS)))])
        name = f"{org}/{stem}-{word}-{int(rng.integers(16**4)):04x}"
        if name not in taken:
            taken.add(name)
            out.append(name)
    return out


def wild_seed(zoo_seed: int, preset: str, index: int) -> int:
    """The torch seed of model `index` of a preset: a SeedSequence hash, neighbours unrelated."""
    return int(np.random.SeedSequence([zoo_seed, 77, WILD_ORDER.index(preset), index]).generate_state(1)[0])


def _levels(nodes: list[Node]) -> dict[str, int]:
    level: dict[str, int] = {}
    for node in nodes:  # parents come first
        level[node.key] = 0 if node.parent is None else level[node.parent] + 1
    return level


def layout(preset: str, seed: int) -> list[WildSpec]:
    """All models of a wild preset, parents before children, every random choice drawn from `seed`."""
    nodes = nodes_of(preset)
    keys = [n.key for n in nodes]
    rng = np.random.default_rng([seed, 77, WILD_ORDER.index(preset)])
    names = dict(zip(keys, _names(len(nodes), WILD_PRESETS[preset].stem, rng), strict=True))
    stamps = _upload_times([None if n.parent is None else keys.index(n.parent) for n in nodes], rng)
    levels = _levels(nodes)
    specs = []
    for i, node in enumerate(nodes):
        relation: Relation = "" if node.parent is None else _COPY_RELATIONS[node.copy] if node.copy else "finetune"
        job = node.job or node.key
        specs.append(WildSpec(i, names[node.key], None if node.parent is None else names[node.parent], node.tag,
                              relation, WILD_PRESETS[preset].arch, node.recipe, node.copy, names[job],
                              node.checkpoint, levels[node.key],
                              wild_seed(seed, preset, i), stamps[i]))
    return specs
