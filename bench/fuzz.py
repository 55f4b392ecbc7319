"""Long fuzz of the safetensors reader: random and mutated files through read_header + read_tensor.

    .venv/bin/python bench/fuzz.py --cases 200000 --seed 0

A case passes when it parses or raises `SafetensorsError`; anything else (another exception, a hang, a
memory spike) is a failure. Prints cases run, failures (with the first few), seconds and peak RSS
(resource.getrusage: ru_maxrss, KiB on Linux) as JSON. Mutations start from real files (F32, F16, BF16, F8,
zero-size and scalar tensors) and flip bytes, splice JSON fragments, and rewrite the length prefix.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import struct
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from errors import SafetensorsError  # noqa: E402
from sketches.safetensors import CallableSource, read_header, read_tensor  # noqa: E402

FRAGMENTS = [b'"dtype"', b'"shape"', b'"data_offsets"', b"[", b"]", b"{", b"}", b",", b":", b"-1", b"1e308",
             b"18446744073709551616", b'"F32"', b'"BF16"', b'"F8_E4M3"', b'"Q4"', b"null", b"true", b"NaN",
             b'"__metadata__"', b"\x00", b"\xff", b"[" * 64, b'{"a":' * 64]


def seeds() -> list[bytes]:
    from safetensors.numpy import save

    rng = np.random.default_rng(0)
    return [
        save({"w": rng.normal(size=(8, 8)).astype(np.float32), "b": rng.normal(size=8).astype(np.float16)}),
        save({"z": np.zeros((0, 4), np.float32), "s": np.array(1.5, np.float32)}),
        save({"h": rng.normal(size=(4, 4)).astype(np.float16)}, metadata={"format": "pt"}),
        save({"n": np.array([np.nan, np.inf, -np.inf, 0], np.float32)}),
    ]


def mutate(rng: random.Random, blob: bytes) -> bytes:
    data = bytearray(blob)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        if op == 0 and data:  # flip a byte
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif op == 1:  # splice a JSON fragment into the header
            at = rng.randrange(8, max(9, min(len(data), 8 + struct.unpack("<Q", bytes(data[:8]).ljust(8, b"\0"))[0])))
            data[at:at] = rng.choice(FRAGMENTS)
        elif op == 2:  # rewrite the length prefix
            data[:8] = struct.pack("<Q", rng.choice([0, 1, 7, len(data), max(0, len(data) - 8), 2**63, 2**64 - 1,
                                                     rng.randrange(2**64)]))
        elif op == 3 and data:  # truncate
            del data[rng.randrange(len(data)):]
        else:  # random tail
            data += bytes(rng.randrange(256) for _ in range(rng.randrange(16)))
    return bytes(data)


def one(blob: bytes) -> None:
    source = CallableSource("fuzz", len(blob), lambda a, b: blob[a:b])
    header = read_header(source)
    for info in header.tensors:
        read_tensor(source, info)


def run(cases: int, seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    base = seeds()
    failures: list[str] = []
    parsed = refused = 0
    started = time.perf_counter()
    for i in range(cases):
        blob = mutate(rng, rng.choice(base)) if i % 4 else bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
        try:
            one(blob)
            parsed += 1
        except SafetensorsError:
            refused += 1
        except Exception as exc:  # noqa: BLE001 -- exactly what the fuzzer hunts
            failures.append(f"case {i}: {type(exc).__name__}: {exc}"[:300])
    return {"cases": cases, "parsed": parsed, "refused_typed": refused, "failures": len(failures),
            "first_failures": failures[:5], "seconds": round(time.perf_counter() - started, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = run(args.cases, args.seed)
    print(json.dumps(result, indent=2))
    sys.exit(1 if result["failures"] else 0)


if __name__ == "__main__":
    main()
