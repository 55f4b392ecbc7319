"""Sketch vectors: a few hundred float32 per model, whose L2 distances track the models' weight distances.

The vector is a *count sketch* (a sparse random projection with one +-1 per input value) of the model's
selected body tensors (2-D and 4-D, heads and vocabulary embeddings excluded: they are re-drawn per
task), sorted by name. Entry i of tensor t goes to bucket h_t(i) with sign s_t(i); h and s come from
numpy's PCG64 seeded by blake2b(family key, tensor name, seed) -- never Python's hash() -- so every model
of a family, on any night and any machine, uses the same projection and sketches stay comparable.

Why a linear count sketch of the raw weights: it is linear, so sketch(a) - sketch(b) = sketch(a - b),
and E ||sketch(a - b)||^2 = ||a - b||^2: nearest neighbours in sketch space are nearest in weight space,
the L2 distance `mother` clusters and (without LoRA) compares on. One pass, O(values), no matrix.
Measured on the zoos (bench/incremental.py): the true parent is among the k = 16 sketch neighbours
essentially always (recall table in bench/RESULTS.md).

Alongside the vector: per-layer excess kurtosis and Frobenius norms (sketches.stats) of every selected
tensor, which the direction cue needs, and their layer names.

Byte layout of `Sketch.to_bytes()` (little-endian; what a sketch is when it leaves the process):
    offset 0   4 bytes  magic b"MGSK"
    offset 4   u16      SKETCH_VERSION
    offset 6   u16      L, number of layers
    offset 8   u32      D, vector length
    offset 12  D x f32  the vector
    then       L x f64  excess kurtosis per layer (NaN for a constant layer)
    then       L x f64  Frobenius norm per layer
    then       u32 N + N bytes of UTF-8 JSON: {"layers": [names, sorted], "family": key, "seed": int}
The store keeps the same fields as columns of the `sketches` table (vector list<float32>, ...).
A reader refuses a newer SKETCH_VERSION.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from errors import BadInputError, FormatVersionError
from sketches.layers import is_head
from sketches.stats import model_stats

logger = logging.getLogger(__name__)

SKETCH_VERSION = 1
DEFAULT_DIM = 256  # 1 KiB a model; count-sketch distance error ~ sqrt(2 / D) = 9% relative (bench: recall)
_MAGIC = b"MGSK"
_HEAD = struct.Struct("<4sHHI")
_PLAN_CACHE = 64  # (bucket, sign) arrays kept per (family, tensor): a family's tensors in one process


@dataclass(frozen=True)
class Sketch:
    family: str
    vector: np.ndarray  # float32 (D,)
    layer_names: tuple[str, ...]  # sorted
    kurtosis: tuple[float, ...]
    norms: tuple[float, ...]
    seed: int = 0
    version: int = SKETCH_VERSION

    def to_bytes(self) -> bytes:
        meta = json.dumps({"layers": list(self.layer_names), "family": self.family, "seed": self.seed},
                          separators=(",", ":")).encode()
        return b"".join([
            _HEAD.pack(_MAGIC, self.version, len(self.layer_names), len(self.vector)),
            np.asarray(self.vector, dtype="<f4").tobytes(),
            np.asarray(self.kurtosis, dtype="<f8").tobytes(),
            np.asarray(self.norms, dtype="<f8").tobytes(),
            struct.pack("<I", len(meta)), meta,
        ])

    @classmethod
    def from_bytes(cls, data: bytes) -> Sketch:
        magic, version, n_layers, dim = _HEAD.unpack_from(data, 0)
        if magic != _MAGIC:
            raise BadInputError("sketch bytes", "not a sketch (bad magic); was it written by Sketch.to_bytes?")
        if version > SKETCH_VERSION:
            raise FormatVersionError(f"sketch version {version} is newer than {SKETCH_VERSION}; upgrade model-graph-index")
        at = _HEAD.size
        vector = np.frombuffer(data, "<f4", dim, at).astype(np.float32)
        at += 4 * dim
        kurt = np.frombuffer(data, "<f8", n_layers, at)
        norms = np.frombuffer(data, "<f8", n_layers, at + 8 * n_layers)
        at += 16 * n_layers
        (size,) = struct.unpack_from("<I", data, at)
        meta = json.loads(data[at + 4: at + 4 + size])
        return cls(meta["family"], vector, tuple(meta["layers"]), tuple(map(float, kurt)), tuple(map(float, norms)),
                   int(meta["seed"]), version)


def stable_seed(*parts: str | int) -> int:
    """A 63-bit seed from blake2b of the parts (stable across processes, unlike hash())."""
    raw = json.dumps([str(p) for p in parts], separators=(",", ":")).encode()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big") >> 1


_plans: OrderedDict[tuple[str, str, int, int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()


def _projection(family: str, name: str, size: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(bucket, sign) of each of `size` values of tensor `name`, for this family and seed."""
    key = (family, name, size, dim, seed)
    hit = _plans.get(key)
    if hit is not None:
        _plans.move_to_end(key)
        return hit
    rng = np.random.Generator(np.random.PCG64(stable_seed(family, name, seed)))
    bucket = rng.integers(0, dim, size=size, dtype=np.int64)
    sign = rng.integers(0, 2, size=size, dtype=np.int8).astype(np.float64) * 2.0 - 1.0
    _plans[key] = (bucket, sign)
    while len(_plans) > _PLAN_CACHE:
        _plans.popitem(last=False)
    return bucket, sign


def sketch_layers(arrays: Mapping[str, np.ndarray]) -> tuple[str, ...]:
    """The tensors a sketch covers: 2-D and 4-D body tensors, heads excluded, sorted."""
    return tuple(sorted(n for n, a in arrays.items() if np.ndim(a) in (2, 4) and not is_head(n)))


def sketch_model(arrays: Mapping[str, np.ndarray], *, family: str, dim: int = DEFAULT_DIM, seed: int = 0) -> Sketch:
    """The sketch of one model from its selected tensors (see the module docstring)."""
    if dim < 1:
        raise BadInputError("dim", f"must be at least 1, got {dim}")
    names = sketch_layers(arrays)
    if not names:
        raise BadInputError(family, "no 2-D or 4-D body tensor to sketch; pass the model's selected tensors")
    acc = np.zeros(dim, dtype=np.float64)
    for name in names:
        flat = np.asarray(arrays[name], dtype=np.float64).ravel()
        bucket, sign = _projection(family, name, flat.size, dim, seed)
        acc += np.bincount(bucket, weights=flat * sign, minlength=dim)
    stats = model_stats({n: arrays[n] for n in names})
    return Sketch(
        family=family,
        vector=acc.astype(np.float32),
        layer_names=names,
        kurtosis=tuple(layer.kurtosis for layer in stats.layers),
        norms=tuple(layer.l2 for layer in stats.layers),
        seed=seed,
    )
