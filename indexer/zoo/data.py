"""Tasks the zoo's models are trained on: scikit-learn's 8x8 digits and seeded procedural images.

Nothing is downloaded: `sklearn.datasets.load_digits()` ships inside the scikit-learn wheel (1,797
images, 8x8, grey levels 0..16) and everything else is drawn from a seeded numpy Generator.

Images are float32 arrays of shape (n, 1, 8, 8), normalised to [-1, 1] ((x - 0.5) / 0.5), labels int64.
The digits are cut once, per zoo seed, into a train pool and a held-out pool, so that no model of a zoo
ever trains on an image that any model of the same zoo is evaluated on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np

logger = logging.getLogger(__name__)

IMAGE_SIZE = 8
HELD_OUT_FRACTION = 0.2  # 360 of the 1,797 digits: enough for a stable accuracy, leaves 1,437 to train

Kind = Literal["root", "child"]


@dataclass(frozen=True)
class Task:
    """One classification task. `kind` says whether it is a broad pre-training task or a narrow one."""

    name: str
    kind: Kind
    labels: tuple[str, ...]
    description: str

    @property
    def n_classes(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class TaskData:
    """Train and held-out arrays of one task, drawn for one model."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


_DIGITS = tuple(str(d) for d in range(10))
_PATTERNS = ("hbar", "vbar", "diag", "antidiag", "box", "square", "cross", "dot", "ring", "checker")

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("digits", "root", _DIGITS, "10-class handwritten digits, shifted and noised (augmentation)"),
        Task("digits-patterns", "root", _DIGITS + _PATTERNS,
             "20 classes: the 10 digits plus 10 procedural patterns, augmented"),
        Task("parity", "child", ("even", "odd"), "is the digit even or odd"),
        Task("lt5", "child", ("lt5", "ge5"), "is the digit below 5"),
        Task("mod3", "child", ("r0", "r1", "r2"), "the digit modulo 3"),
        Task("low", "child", _DIGITS[:5], "digits 0-4 only"),
        Task("high", "child", _DIGITS[5:], "digits 5-9 only"),
        Task("rot90", "child", _DIGITS, "digits rotated by 90 degrees"),
        Task("mirror", "child", _DIGITS, "digits mirrored left-right"),
        Task("invert", "child", _DIGITS, "digits with inverted grey levels"),
        Task("noisy", "child", _DIGITS, "digits under heavy Gaussian noise (sigma 0.35)"),
        Task("shapes", "child", ("box", "square", "cross", "ring"), "procedural shapes at random places"),
        Task("orientation", "child", ("hbar", "vbar", "diag", "antidiag"), "orientation of a line"),
        Task("count", "child", ("one", "two", "three", "four"), "how many bright dots"),
    )
}
ROOT_TASKS = tuple(sorted(n for n, t in TASKS.items() if t.kind == "root"))
CHILD_TASKS = tuple(sorted(n for n, t in TASKS.items() if t.kind == "child"))


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # imported late: only the zoo needs scikit-learn

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)  # grey levels 0..16 -> 0..1
    return images, bunch.target.astype(np.int64)


def digit_pools(zoo_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the train pool and the held-out pool of the digits, fixed for one zoo seed."""
    images, _ = _digits()
    order = np.random.default_rng([zoo_seed, 1797]).permutation(len(images))
    n_test = int(round(len(images) * HELD_OUT_FRACTION))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def _shift_and_noise(x: np.ndarray, rng: np.random.Generator, *, max_shift: int, sigma: float) -> np.ndarray:
    """Augment: move each image by up to `max_shift` pixels (zero fill) and add Gaussian noise."""
    out = np.zeros_like(x)
    shifts = rng.integers(-max_shift, max_shift + 1, size=(len(x), 2))
    for i, (dy, dx) in enumerate(shifts):
        src = x[i]
        ys, yd = (slice(0, IMAGE_SIZE - dy), slice(dy, None)) if dy >= 0 else (slice(-dy, None), slice(0, dy))
        xs, xd = (slice(0, IMAGE_SIZE - dx), slice(dx, None)) if dx >= 0 else (slice(-dx, None), slice(0, dx))
        out[i][yd, xd] = src[ys, xs]
    out += rng.normal(0.0, sigma, size=out.shape).astype(np.float32)
    return np.clip(out, 0.0, 1.0)


def _pattern(label: str, rng: np.random.Generator) -> np.ndarray:
    """One 8x8 procedural pattern at a random place and size, grey level 0.6..1."""
    img = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    v = np.float32(rng.uniform(0.6, 1.0))
    s = int(rng.integers(4, 7))  # side of the pattern's box: 4..6 pixels
    r, c = (int(v_) for v_ in rng.integers(0, IMAGE_SIZE - s + 1, size=2))
    box = img[r : r + s, c : c + s]
    k = np.arange(s)
    if label == "hbar":
        box[s // 2, :] = v
    elif label == "vbar":
        box[:, s // 2] = v
    elif label == "diag":
        box[k, k] = v
    elif label == "antidiag":
        box[k, s - 1 - k] = v
    elif label == "box":
        box[0, :] = box[-1, :] = box[:, 0] = box[:, -1] = v
    elif label == "square":
        box[:, :] = v
    elif label == "cross":
        box[k, k] = v
        box[k, s - 1 - k] = v
    elif label == "dot":
        box[s // 2 - 1 : s // 2 + 1, s // 2 - 1 : s // 2 + 1] = v
    elif label == "ring":
        box[0, 1:-1] = box[-1, 1:-1] = box[1:-1, 0] = box[1:-1, -1] = v
    elif label == "checker":
        box[(k[:, None] + k[None, :]) % 2 == 0] = v
    else:  # pragma: no cover - the labels are a closed set above
        raise ValueError(label)
    return img


def _dots(count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` bright 1-pixel dots at distinct places on an 8x8 grid whose cells are 2 apart."""
    img = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    cells = rng.choice(16, size=count, replace=False)  # a 4x4 grid of cells keeps dots from touching
    for cell in cells:
        img[2 * (cell // 4) + int(rng.integers(0, 2)), 2 * (cell % 4) + int(rng.integers(0, 2))] = rng.uniform(0.6, 1.0)
    return img


def _synthetic(task: Task, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, task.n_classes, size=n)
    if task.name == "count":
        x = np.stack([_dots(int(label) + 1, rng) for label in y])
    else:
        x = np.stack([_pattern(task.labels[int(label)], rng) for label in y])
    x = np.clip(x + rng.normal(0.0, 0.1, size=x.shape).astype(np.float32), 0.0, 1.0)
    return x, y.astype(np.int64)


# Per digit task: which digits it keeps, how it maps a digit to its label, how it transforms the image.
_KEEP: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "low": lambda d: d < 5,
    "high": lambda d: d >= 5,
}
_LABEL: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "parity": lambda d: d % 2,
    "lt5": lambda d: (d >= 5).astype(np.int64),
    "mod3": lambda d: d % 3,
    "high": lambda d: d - 5,
}
_IMAGE: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "rot90": lambda x: np.rot90(x, k=1, axes=(1, 2)),
    "mirror": lambda x: x[:, :, ::-1],
    "invert": lambda x: 1.0 - x,
}


def _digit_task(task: Task, idx: np.ndarray, rng: np.random.Generator, *, copies: int) -> tuple[np.ndarray, np.ndarray]:
    images, digits = _digits()
    keep = idx[_KEEP.get(task.name, lambda d: np.ones_like(d, dtype=bool))(digits[idx])]
    x = np.concatenate([images[keep]] * copies)
    d = np.concatenate([digits[keep]] * copies)
    sigma = 0.35 if task.name == "noisy" else 0.05
    x = _shift_and_noise(x, rng, max_shift=1, sigma=sigma)
    x = np.ascontiguousarray(_IMAGE.get(task.name, lambda a: a)(x))
    y = _LABEL.get(task.name, lambda a: a)(d).astype(np.int64)
    return x, y


def _mix(task: Task, idx: np.ndarray, rng: np.random.Generator, *, copies: int) -> tuple[np.ndarray, np.ndarray]:
    """digits-patterns: the digits (labels 0-9) plus as many procedural patterns (labels 10-19)."""
    xd, yd = _digit_task(TASKS["digits"], idx, rng, copies=copies)
    patterns = Task("patterns", "child", _PATTERNS, "")
    xp, yp = _synthetic(patterns, len(xd), rng)
    return np.concatenate([xd, xp]), np.concatenate([yd, yp + 10])


def _draw(task: Task, idx: np.ndarray, rng: np.random.Generator, *, copies: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    if task.name in ("shapes", "orientation", "count"):
        return _synthetic(task, n, rng)
    if task.name == "digits-patterns":
        return _mix(task, idx, rng, copies=copies)
    return _digit_task(task, idx, rng, copies=copies)


def _normalise(x: np.ndarray) -> np.ndarray:
    return ((x - 0.5) / 0.5).astype(np.float32)[:, None, :, :]


def make_task_data(task_name: str, *, zoo_seed: int, model_seed: int, n_train: int) -> TaskData:
    """Train and held-out data of one task for one model.

    The train set has `n_train` examples (augmented copies of the train pool, subsampled; for the
    procedural tasks fresh draws) and depends on `model_seed`; the held-out set depends on the zoo seed
    only, so every model on a task is measured on the same images.
    """
    task = TASKS[task_name]
    train_idx, test_idx = digit_pools(zoo_seed)
    rng = np.random.default_rng([model_seed, 7])
    copies = -(-n_train // len(train_idx)) + 1  # enough copies that subsampling reaches n_train
    x, y = _draw(task, train_idx, rng, copies=copies, n=n_train)
    pick = np.sort(rng.choice(len(x), size=min(n_train, len(x)), replace=False))
    test_rng = np.random.default_rng([zoo_seed, 11, sorted(TASKS).index(task_name)])
    xt, yt = _draw(task, test_idx, test_rng, copies=1, n=len(test_idx))
    return TaskData(_normalise(x[pick]), y[pick], _normalise(xt), yt)
