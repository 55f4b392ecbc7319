"""mlx-lm's own conversion against our reader: MLX copies of each architecture read under their sources' names.

    .venv/bin/python bench/mlx_converter.py [--mlx-lm DIR] [--bits 4] [--group 64] [MODEL_TYPE ...]

mlx-lm (0.32.2) and mlx are the `quant` extra's; `--mlx-lm DIR` runs another mlx_lm package found in DIR.
For each transformers model type (bench/gguf_converter.py's list and small configs):
1. a small random model of that type, saved by transformers (BF16 safetensors, as the Hub's checkpoints are);
2. converted as `mlx_lm.convert --quantize` converts it (in a process of its own: `mlx_lm.utils.load_model`,
   which runs the architecture's own `sanitize`, then `quantize_model` and `save_model` / `save_config`; the
   tokenizer is the one step skipped: a random model has none);
3. read by our packed reader (`indexer.readers.read_packed`, every body matrix whole) and scored against the
   source: matrices read under a source name within the scheme's error, read with other values, read under a
   name the source lacks, and source body matrices not read.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from gguf_converter import FIXTURES, MODEL_TYPES, make_model, source_tensors  # noqa: E402

from indexer.readers import read_packed  # noqa: E402
from sketches.layers import is_head, is_vocabulary, normalise_name  # noqa: E402
from sketches.safetensors import open_local_repo  # noqa: E402

_DRIVER = """
import sys
from pathlib import Path
from mlx_lm.utils import load_model, quantize_model, save_config, save_model
src, dst, bits, group = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model, config = load_model(src, lazy=True)
model, config = quantize_model(model, config, group, bits)
save_model(dst, model)
save_config(config, dst / "config.json")
print(type(model).__module__)
"""


def convert(mlx_lm: Path | None, src: Path, dst: Path, bits: int, group: int) -> str:
    env = os.environ | ({"PYTHONPATH": str(mlx_lm)} if mlx_lm else {})
    done = subprocess.run([sys.executable, "-c", _DRIVER, str(src), str(dst), str(bits), str(group)], env=env,
                          capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
    return done.stdout.strip().splitlines()[-1].rsplit(".", 1)[-1]


def read_mlx(folder: Path) -> tuple[dict[str, np.ndarray], float]:
    """Every body matrix our packed reader reads from the MLX folder (a budget nothing exceeds), and the
    relative error its scheme predicts."""
    config = json.loads((folder / "config.json").read_text())
    with open_local_repo(folder) as repo:
        read, _ = read_packed(repo.sources(), repo.locations(), config, budget=1 << 40)
    return dict(read.arrays), read.quant.predicted_error


def score(folder: Path, source: dict[str, np.ndarray]) -> dict[str, object]:
    src = {normalise_name(n): v.astype(np.float32) for n, v in source.items()}
    arrays, predicted = read_mlx(folder)
    counts = {"within error": 0, "other values": 0, "no such name": 0}
    bad = []
    for name, got in arrays.items():
        want = src.get(name)
        if want is None or want.shape != got.shape:
            counts["no such name"] += 1
            bad.append(f"{name} (no such name{'' if want is None else ' of that shape'})")
            continue
        error = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
        if error <= 3 * predicted:
            counts["within error"] += 1
        else:
            counts["other values"] += 1
            bad.append(f"{name} (error {error:.3f}, predicted {predicted:.3f})")
    body = [n for n, v in src.items() if v.ndim in (2, 4) and not is_head(n) and not is_vocabulary(n)]
    counts["not read"] = sum(1 for n in body if n not in arrays)
    counts["body"] = len(body)
    counts["examples"] = bad[:3] + [f"{n} (not read)" for n in body if n not in arrays][:2]
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mlx-lm", type=Path, help="a folder holding another mlx_lm package than the venv's")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("model_types", nargs="*", default=list(MODEL_TYPES))
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore")
    lines = ["| model type | mlx-lm model | body matrices | read within error | other values | name not in source | "
             "not read |", "|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for mt in args.model_types:
            folder = Path(tmp) / mt
            try:
                make_model(mt, folder / "hf", FIXTURES.get(mt), bf16=True)
                model = convert(args.mlx_lm, folder / "hf", folder / "mlx", args.bits, args.group)
                s = score(folder / "mlx", source_tensors(folder / "hf"))
            except Exception as exc:  # noqa: BLE001 -- a type mlx-lm or our reader cannot do: reported
                lines.append(f"| {mt} | not converted or not read: {type(exc).__name__}: {str(exc)[:90]} | | | | | |")
                continue
            lines.append(f"| {mt} | {model} | {s['body']} | {s['within error']} | {s['other values']} | "
                         f"{s['no such name']} | {s['not read']} |")
            lines += [f"|  | {e} | | | | | |" for e in s["examples"]]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
