"""Data of the wild zoo: seeded Markov-chain languages for BERT and GPT-2, image tasks for the conv net.

Nothing is downloaded. Token ids (one vocabulary of 96 for both text architectures):
    0 [PAD]  1 [UNK]  2 [CLS] (GPT-2's bos)  3 [SEP] (eos)  4 [MASK]  5..95 the 91 words

A language is a first-order Markov chain over the words: half of its transitions come from a chain
common to all languages, half from its own; each chain gives every word 4 likely successors with
Dirichlet(0.5) weights plus 3 % of uniform mass (so any sequence is possible in any language). A dialect mixes its base language's transitions with a fresh chain
(DIALECT_STRENGTH): close languages make a classification that is learnt, not solved in one step.
Every language is fixed by (zoo seed, base, variant); training samples by the model's seed; held-out
samples by the zoo seed and the task only, so every model on a task is measured on the same sequences.

Image tasks reuse `indexer.zoo.data` (8x8 digits and procedural patterns); `broad` adds the dot-count
task to the 20 digit/pattern classes (24 classes) for the conv net's continued pre-training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np

from indexer.zoo.data import TASKS as IMAGE_TASKS
from indexer.zoo.data import TaskData, make_task_data

logger = logging.getLogger(__name__)

VOCAB = 96
PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
FIRST_WORD = 5
N_WORDS = VOCAB - FIRST_WORD
SEQ_LEN = 32
BRANCHING = 4
UNIFORM_MASS = 0.03
# Every language mixes its own chain with one common to all (SHARED): a mixture corpus then has bigram
# statistics worth learning (with 8 unrelated chains a tiny BERT was at 0.14 masked-token accuracy after
# 400 steps, the unigram level).
SHARED = 0.5
DIALECT_STRENGTH = 0.35  # close enough that dialect-5 stays hard: a frozen-body probe reached 0.29 (chance 0.20)
MASK_RATE = 0.3  # BERT used 0.15; 0.3 reached 0.20 masked-token accuracy in 800 steps, 0.15 needed 1,200
N_HELD_OUT = 512

Source = tuple[int, int]  # (base language, variant): variant 0 is the base itself, k > 0 its k-th dialect
TextKind = Literal["corpus", "classify"]


@dataclass(frozen=True)
class TextTask:
    """A corpus (pre-training / LM data: a uniform mixture of sources) or a classification over sources."""

    name: str
    kind: TextKind
    sources: tuple[Source, ...]
    description: str

    @property
    def n_classes(self) -> int:
        return len(self.sources) if self.kind == "classify" else 0


def _dialects(base: int, n: int) -> tuple[Source, ...]:
    return tuple((base, k) for k in range(1, n + 1))


TEXT_TASKS: dict[str, TextTask] = {
    t.name: t
    for t in (
        # corpora
        TextTask("web", "corpus", tuple((b, 0) for b in range(6)) + _dialects(0, 2),
                 "broad pre-training corpus: 6 languages and 2 dialects"),
        TextTask("forum", "corpus", ((6, 0), (7, 0)), "two other languages (the first stranger's corpus)"),
        TextTask("legal", "corpus", ((8, 0),), "one other language (the second stranger's corpus)"),
        TextTask("bio", "corpus", ((9, 0), (10, 0), (0, 3), (1, 1)),
                 "domain corpus for continued pre-training: 2 new languages and 2 dialects of old ones"),
        TextTask("news", "corpus", ((1, 0),), "one of the pre-training languages alone"),
        TextTask("chat", "corpus", ((2, 0), (2, 1)), "a pre-training language and a dialect of it"),
        TextTask("reviews", "corpus", ((3, 1),), "a dialect of a pre-training language"),
        TextTask("poetry", "corpus", ((4, 2),), "another dialect"),
        TextTask("patents", "corpus", ((9, 1),), "a dialect of a domain language"),
        # classifications (class = which source wrote the sequence)
        TextTask("dialect-2", "classify", _dialects(0, 2), "which of 2 dialects of language 0"),
        TextTask("langid-3", "classify", ((1, 0), (2, 0), (3, 0)), "which of 3 languages"),
        TextTask("dialect-4", "classify", _dialects(2, 4), "which of 4 dialects of language 2"),
        TextTask("dialect-5", "classify", _dialects(4, 5), "which of 5 dialects of language 4"),
        TextTask("langid-6", "classify", tuple((b, 0) for b in range(6)), "which of 6 languages"),
        TextTask("dialect-3", "classify", _dialects(5, 3), "which of 3 dialects of language 5"),
        TextTask("bio-3", "classify", _dialects(9, 3), "which of 3 dialects of domain language 9"),
        TextTask("forum-2", "classify", ((6, 1), (7, 1)), "which of 2 forum dialects"),
    )
}


@dataclass(frozen=True)
class Language:
    """A Markov chain over the words: start probabilities and the row-cumulative transition matrix."""

    start_cum: np.ndarray  # (N_WORDS,)
    trans_cum: np.ndarray  # (N_WORDS, N_WORDS)


def _chain(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(start, transitions) of a fresh sparse chain: BRANCHING likely successors per word."""
    trans = np.full((N_WORDS, N_WORDS), UNIFORM_MASS / N_WORDS)
    for row in range(N_WORDS):
        succ = rng.choice(N_WORDS, size=BRANCHING, replace=False)
        trans[row, succ] += (1.0 - UNIFORM_MASS) * rng.dirichlet(np.full(BRANCHING, 0.5))
    start = rng.dirichlet(np.full(N_WORDS, 0.3))
    return start, trans


@lru_cache(maxsize=64)
def language(zoo_seed: int, source: Source) -> Language:
    """The language of `source`, fixed by the zoo seed: a base chain, or the base mixed with a fresh one."""
    base, variant = source
    start, own = _chain(np.random.default_rng([zoo_seed, 4242, base, 0]))
    _, common = _chain(np.random.default_rng([zoo_seed, 4243]))
    trans = (1.0 - SHARED) * own + SHARED * common
    if variant:
        other_start, other = _chain(np.random.default_rng([zoo_seed, 4242, base, variant]))
        trans = (1.0 - DIALECT_STRENGTH) * trans + DIALECT_STRENGTH * other
        start = (1.0 - DIALECT_STRENGTH) * start + DIALECT_STRENGTH * other_start
    return Language(np.cumsum(start), np.cumsum(trans, axis=1))


def _draw(cum: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One categorical draw per row of `cum` (rows are cumulative distributions)."""
    u = rng.random(len(cum))[:, None]
    return np.minimum((cum < u).sum(axis=1), N_WORDS - 1)  # the min guards a last cum of 0.9999999


def sample_words(lang: Language, n: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """(n, length) token ids (words only) of `n` sequences of `lang`."""
    out = np.empty((n, length), dtype=np.int64)
    out[:, 0] = _draw(np.broadcast_to(lang.start_cum, (n, N_WORDS)), rng)
    for t in range(1, length):
        out[:, t] = _draw(lang.trans_cum[out[:, t - 1]], rng)
    return out + FIRST_WORD


def sample_sources(task: TextTask, n: int, length: int, *, zoo_seed: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(words (n, length), source index (n,)): each sequence from a uniformly drawn source of `task`."""
    which = rng.integers(0, len(task.sources), size=n)
    words = np.empty((n, length), dtype=np.int64)
    for k, source in enumerate(task.sources):
        rows = np.flatnonzero(which == k)
        words[rows] = sample_words(language(zoo_seed, source), len(rows), length, rng)
    return words, which.astype(np.int64)


# --- batches per objective ---------------------------------------------------------------------------

Arrays = dict[str, np.ndarray]


def _mask(ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """BERT's static masking of the word positions: (masked input ids, labels with -100 elsewhere)."""
    words = ids >= FIRST_WORD
    picked = words & (rng.random(ids.shape) < MASK_RATE)
    labels = np.where(picked, ids, -100)
    roll = rng.random(ids.shape)
    out = ids.copy()
    out[picked & (roll < 0.8)] = MASK
    swap = picked & (roll >= 0.8) & (roll < 0.9)
    out[swap] = rng.integers(FIRST_WORD, VOCAB, size=int(swap.sum()))
    return out, labels


def mlm_nsp(task: TextTask, n: int, *, zoo_seed: int, rng: np.random.Generator) -> Arrays:
    """BERT pre-training pairs `[CLS] A [SEP] B [SEP]` (32 ids): B follows A in half of them (NSP label 0),
    else B is another sequence of the corpus (label 1); MASK_RATE of the words picked, of those 80 % [MASK],
    10 % a random word, 10 % kept (as BERT)."""
    half = (SEQ_LEN - 3) // 2  # 14 + 15 words
    words, _ = sample_sources(task, n, SEQ_LEN - 3, zoo_seed=zoo_seed, rng=rng)
    other, _ = sample_sources(task, n, SEQ_LEN - 3, zoo_seed=zoo_seed, rng=rng)
    random_next = rng.random(n) < 0.5
    second = np.where(random_next[:, None], other[:, half:], words[:, half:])
    col = np.full((n, 1), 0, dtype=np.int64)
    ids = np.concatenate([col + CLS, words[:, :half], col + SEP, second, col + SEP], axis=1)
    types = np.zeros_like(ids)
    types[:, half + 2 :] = 1
    masked, labels = _mask(ids, rng)
    return {"input_ids": masked, "token_type_ids": types, "labels": labels,
            "next_sentence_label": random_next.astype(np.int64)}


def lm(task: TextTask, n: int, *, zoo_seed: int, rng: np.random.Generator) -> Arrays:
    """GPT-2 language-modelling sequences `[bos] words...` (32 ids)."""
    words, _ = sample_sources(task, n, SEQ_LEN - 1, zoo_seed=zoo_seed, rng=rng)
    return {"input_ids": np.concatenate([np.full((n, 1), CLS, dtype=np.int64), words], axis=1)}


def classify(task: TextTask, n: int, *, zoo_seed: int, rng: np.random.Generator, style: Literal["bert", "gpt2"]
             ) -> Arrays:
    """Labelled sequences: BERT `[CLS] words [SEP]`, GPT-2 `[bos] words` (the last token is pooled)."""
    n_words = SEQ_LEN - 2 if style == "bert" else SEQ_LEN - 1
    words, label = sample_sources(task, n, n_words, zoo_seed=zoo_seed, rng=rng)
    col = np.full((n, 1), 0, dtype=np.int64)
    parts = [col + CLS, words, col + SEP] if style == "bert" else [col + CLS, words]
    return {"input_ids": np.concatenate(parts, axis=1), "labels": label}


Objective = Literal["classify", "mlm-nsp", "lm"]


def _text_arrays(task_name: str, objective: Objective, n: int, *, zoo_seed: int, rng: np.random.Generator,
                 style: Literal["bert", "gpt2"]) -> Arrays:
    task = TEXT_TASKS[task_name]
    if objective == "mlm-nsp":
        return mlm_nsp(task, n, zoo_seed=zoo_seed, rng=rng)
    if objective == "lm":
        return lm(task, n, zoo_seed=zoo_seed, rng=rng)
    return classify(task, n, zoo_seed=zoo_seed, rng=rng, style=style)


def text_data(task_name: str, objective: Objective, *, zoo_seed: int, model_seed: int, n_train: int,
              style: Literal["bert", "gpt2"]) -> tuple[Arrays, Arrays]:
    """(train, held-out) arrays of one text task for one model; held-out depends on the zoo seed only."""
    if task_name not in TEXT_TASKS:
        raise ValueError(f"unknown text task {task_name!r}; choose one of {', '.join(sorted(TEXT_TASKS))}")
    train = _text_arrays(task_name, objective, n_train, zoo_seed=zoo_seed,
                         rng=np.random.default_rng([model_seed, 17]), style=style)
    test_rng = np.random.default_rng([zoo_seed, 23, sorted(TEXT_TASKS).index(task_name)])
    test = _text_arrays(task_name, objective, N_HELD_OUT, zoo_seed=zoo_seed, rng=test_rng, style=style)
    return train, test


# --- images (the conv net) ---------------------------------------------------------------------------

BROAD = "broad"  # digits + patterns (20 classes) + dot counts (4 classes): the continued pre-training mix


def image_classes(task_name: str) -> int:
    if task_name == BROAD:
        return IMAGE_TASKS["digits-patterns"].n_classes + IMAGE_TASKS["count"].n_classes
    return IMAGE_TASKS[task_name].n_classes


def _arrays(data: TaskData) -> tuple[Arrays, Arrays]:
    return {"x": data.x_train, "labels": data.y_train}, {"x": data.x_test, "labels": data.y_test}


def image_data(task_name: str, *, zoo_seed: int, model_seed: int, n_train: int) -> tuple[Arrays, Arrays]:
    """(train, held-out) arrays of one image task for one model (images (n, 1, 8, 8) in [-1, 1])."""
    if task_name != BROAD:
        return _arrays(make_task_data(task_name, zoo_seed=zoo_seed, model_seed=model_seed, n_train=n_train))
    main = make_task_data("digits-patterns", zoo_seed=zoo_seed, model_seed=model_seed, n_train=n_train * 5 // 6)
    dots = make_task_data("count", zoo_seed=zoo_seed, model_seed=model_seed, n_train=n_train // 6)
    offset = IMAGE_TASKS["digits-patterns"].n_classes
    train = {"x": np.concatenate([main.x_train, dots.x_train]),
             "labels": np.concatenate([main.y_train, dots.y_train + offset])}
    test = {"x": np.concatenate([main.x_test, dots.x_test]),
            "labels": np.concatenate([main.y_test, dots.y_test + offset])}
    return train, test
