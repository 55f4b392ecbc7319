"""Quantized formats the relations zoo does not hold: MLX (mlx-lm's layout, by mlx itself), AWQ with
AutoAWQ's scales folded in, GGUF files whose rows fall back to IQ4_NL. Each full-precision model of the
relations zoo gets one copy per format, uploaded after everything else; then batch recovery, per format:
is the copy under its source, and labelled `quantized`?

    .venv/bin/python bench/formats.py --zoo /work/zoo/relations --out /tmp/fmt
    .venv/bin/python bench/incremental.py --zoo /tmp/fmt --orders 1      # the crawl's index on the same folder

Copies (`FORMATS`): MLX affine 4-bit group 64 (mlx-lm's default), 8-bit group 64, 3-bit group 32 with
down_proj and lm_head at 6 bits (a mixed recipe), MXFP4 and NVFP4; AWQ GEMM 4-bit group 32 with no
scales and with scales of activation spread e^N(0, 1) folded in (`indexer.zoo.quantize.awq_fold`);
compressed-tensors NVFP4, MXFP4 and MXFP8 by its own compressors; GGUF
Q3_K, whose 64- and 128-wide rows are no whole 256-value super-block, so llama-quantize's fallback writes
them as IQ4_NL; a GGUF Q8_0 gguf-split set of 4 tensors a shard (one model in many files); optimum-quanto
int8, float8 and int4 by quanto itself; ComfyUI's fp8 files (plain E4M3 / E5M2 casts, scaled E4M3); torchao
int8 / float8 (TorchAoConfig's safetensors) by torchao itself. Without
mlx installed the MLX rows are left out (said on stderr).

Two of the zoo's own repos (`CONVERTED`) are turned into what most of the Hub before 2022 looks like: a
pickle-only repo (junk `pytorch_model.bin`, never to be read) whose safetensors are only in the conversion
bot's open PR (`.refs/pr/1/`, hub.json `discussions`): they must keep the parents truth.csv gives them.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safetensors.numpy import load_file

from indexer.evaluate import read_relations_csv
from indexer.lineage import recover as rec
from indexer.lineage.methods import Options
from indexer.zoo.onnx_export import write_onnx
from indexer.zoo.quantize import (
    write_awq,
    write_comfy_fp8,
    write_llama_gguf,
    write_microscaled,
    write_mlx,
    write_quanto,
    write_torchao,
)

ORG = "rel"
SOURCES = ("base-a", "a-ft1", "a-ft2", "a-ft1-ft", "base-b", "b-ft1", "b-ft2")
Writer = Callable[[Path, dict[str, Any], dict[str, Any], int], None]
FORMATS: dict[str, Writer] = {
    "mlx-4bit": lambda f, s, c, i: write_mlx(f, s, c),
    "mlx-8bit": lambda f, s, c, i: write_mlx(f, s, c, bits=8),
    "mlx-3bit-mixed": lambda f, s, c, i: write_mlx(f, s, c, bits=3, group_size=32, module_bits={
        **{f"model.layers.{b}.mlp.down_proj": 6 for b in range(c["num_hidden_layers"])}, "lm_head": 6}),
    "mlx-mxfp4": lambda f, s, c, i: write_mlx(f, s, c, group_size=32, mode="mxfp4"),
    "mlx-nvfp4": lambda f, s, c, i: write_mlx(f, s, c, group_size=16, mode="nvfp4"),
    "awq": lambda f, s, c, i: write_awq(f, s, c),
    "awq-folded": lambda f, s, c, i: write_awq(f, s, c, fold_seed=i, spread=1.0),
    "ct-nvfp4": lambda f, s, c, i: write_microscaled(f, s, c, fmt="nvfp4"),
    "ct-mxfp4": lambda f, s, c, i: write_microscaled(f, s, c, fmt="mxfp4"),
    "ct-mxfp8": lambda f, s, c, i: write_microscaled(f, s, c, fmt="mxfp8"),
    "gguf-q3k": lambda f, s, c, i: (f.mkdir(parents=True, exist_ok=True),
                                    write_llama_gguf(f / "model-Q3_K.gguf", s, "Q3_K", heads=c["num_attention_heads"],
                                                     kv_heads=c["num_key_value_heads"])),
    "gguf-q8-split": lambda f, s, c, i: (f.mkdir(parents=True, exist_ok=True),
                                         write_llama_gguf(f / "model-Q8_0.gguf", s, "Q8_0", heads=c["num_attention_heads"],
                                                          kv_heads=c["num_key_value_heads"], split_max_tensors=4)),
    # transformers.js / optimum exports (indexer.zoo.onnx_export): a full-precision export is the source's
    # weights bit for bit (a duplicate), F16 a dtype copy, the 8-bit ones onnxruntime's quantizer
    "onnx": lambda f, s, c, i: write_onnx(f, s, c, variant="fp32"),
    "onnx-external": lambda f, s, c, i: write_onnx(f, s, c, variant="external"),
    "onnx-fp16": lambda f, s, c, i: write_onnx(f, s, c, variant="fp16"),
    "onnx-uint8": lambda f, s, c, i: write_onnx(f, s, c, variant="uint8"),
    "onnx-int8": lambda f, s, c, i: write_onnx(f, s, c, variant="int8"),
    "onnx-q4": lambda f, s, c, i: write_onnx(f, s, c, variant="q4"),
    # optimum-quanto by quanto itself (indexer.zoo.quantize.write_quanto); its 4-bit codes keep no (out, in): the
    # zoo's projections carry no bias and have 64 or 128 inputs, so each is refused (sketches.packed, quanto)
    "quanto-int8": lambda f, s, c, i: write_quanto(f, s, c, weights="qint8"),
    "quanto-float8": lambda f, s, c, i: write_quanto(f, s, c, weights="qfloat8"),
    "quanto-int4": lambda f, s, c, i: write_quanto(f, s, c, weights="qint4"),
    # ComfyUI's fp8 checkpoints (indexer.zoo.quantize.comfy_fp8): PyTorch's plain casts, no scale, and its
    # scaled E4M3 with a per-tensor scale beside each weight
    "fp8-e4m3fn": lambda f, s, c, i: write_comfy_fp8(f, s, c, fmt="e4m3fn"),
    "fp8-e5m2": lambda f, s, c, i: write_comfy_fp8(f, s, c, fmt="e5m2"),
    "fp8-scaled": lambda f, s, c, i: write_comfy_fp8(f, s, c, fmt="scaled"),
    # transformers' TorchAoConfig checkpoints by torchao itself (indexer.zoo.quantize.write_torchao)
    "torchao-int8": lambda f, s, c, i: write_torchao(f, s, c, kind="int8"),
    "torchao-float8": lambda f, s, c, i: write_torchao(f, s, c, kind="float8"),
}
RELATION = {"onnx": "duplicate", "onnx-external": "duplicate"}  # the truth relation, else "quantized"
CONVERTED = ("a-ft1", "b-ft2")
BOT_PR = {"num": 1, "title": "Adding `safetensors` variant of this model", "author": "SFconvertbot"}


def _mlx_missing() -> str:
    try:
        import mlx.core  # noqa: F401
    except Exception as exc:  # noqa: BLE001 -- an optional extra: any import failure means "not here"
        return f"{type(exc).__name__}: {exc}"
    return ""


def build(zoo: Path, out: Path, only: tuple[str, ...] = ()) -> list[str]:
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(zoo, out)
    hub = json.loads((out / "hub.json").read_text())
    missing = _mlx_missing()
    if missing:
        print(f"mlx does not import ({missing}): no MLX copies", file=sys.stderr)
    made = []
    with (out / "truth.csv").open("a", newline="") as f:
        w = csv.writer(f)
        for i, (fmt, write) in enumerate((k, v) for k, v in FORMATS.items() if not (missing and k.startswith("mlx"))
                                         and (not only or any(k.startswith(o) for o in only))):
            for j, source in enumerate(SOURCES):
                folder = out / ORG / source
                state = {n: a for n, a in load_file(str(folder / "model.safetensors")).items()}
                config = json.loads((folder / "config.json").read_text())
                name = f"{ORG}/{source}-{fmt}"
                write(out / name, state, config, 100 * i + j)
                day, hour = divmod(i, 24)  # one hour a format, a minute a source: more formats than hours in a day
                hub["repos"][name] = {"createdAt": f"2024-01-{3 + day:02d}T{hour:02d}:{j:02d}:00.000Z"}
                w.writerow([name, f"{ORG}/{source}", RELATION.get(fmt, "quantized")])
                made.append(name)
    for source in CONVERTED:  # after the copies above, which read its model.safetensors
        folder = out / ORG / source
        (folder / ".refs/pr/1").mkdir(parents=True)
        (folder / "model.safetensors").rename(folder / ".refs/pr/1/model.safetensors")
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x02 a pickle that must never be read")
        hub["repos"][f"{ORG}/{source}"]["discussions"] = [BOT_PR]
    (out / "hub.json").write_text(json.dumps(hub))
    return made


def fold_table(zoo: Path) -> None:
    """Plain against folded relative distance (indexer.relations.rules.folded_relative) of a-ft1's matrices
    to: AWQ-folded copies of itself (scales only, no rounding), perturbations of it, an unrelated model."""
    import math

    import numpy as np

    from indexer.relations.rules import folded_relative
    from indexer.zoo.quantize import awq_fold

    def mats(state: dict[str, Any]) -> dict[str, Any]:
        return {n: a for n, a in state.items() if np.ndim(a) == 2 and ".layers." in n}

    def plain(a: dict[str, Any], b: dict[str, Any]) -> float:
        num = sum(float(np.square(a[n] - b[n]).sum()) for n in a)
        return math.sqrt(num / sum(float(np.square(a[n]).sum() + np.square(b[n]).sum()) / 2 for n in a))

    src = {n: a for n, a in load_file(str(zoo / ORG / "a-ft1" / "model.safetensors")).items()}
    rng = np.random.default_rng(0)
    rows = [(f"AWQ scales folded, activation spread e^N(0, {s})", mats(awq_fold(src, seed=1, spread=s)))
            for s in (0.5, 1.0, 2.0)]
    rows += [(f"perturbed, step {step} (a fine-tune's size)", {n: (a + step * a.std() * rng.standard_normal(a.shape)).astype(np.float32)
                                                              for n, a in mats(src).items()}) for step in (0.01, 0.05, 0.3)]
    rows.append(("unrelated (rel/base-b)", mats(load_file(str(zoo / ORG / "base-b" / "model.safetensors")))))
    print("| a-ft1 against | plain relative L2 | after fitting row / column scales |")
    print("|---|---|---|")
    for name, other in rows:
        print(f"| {name} | {plain(other, mats(src)):.4f} | {folded_relative(other, mats(src)):.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, required=True, help="a relations zoo (index zoo make DIR --preset relations)")
    ap.add_argument("--out", type=Path, required=True, help="where the extended copy is written (replaced)")
    ap.add_argument("--fold-table", action="store_true", help="also print the plain / folded distance table")
    ap.add_argument("--formats", nargs="*", default=[], help="only the formats starting so (e.g. onnx); default all")
    args = ap.parse_args()
    if args.fold_table:
        fold_table(args.zoo)
        print()
    made = build(args.zoo, args.out, tuple(args.formats))
    forest = rec.recover(args.out, Options())
    truth = read_relations_csv(args.out / "truth.csv")
    rows = {r.repo_id: r for r in forest.rows}
    print("| format | copies | under their source | relation as truth.csv (quantized, duplicate) | failed |")
    print("|---|---|---|---|---|")
    for fmt in FORMATS:
        mine = [m for m in made if m.endswith(f"-{fmt}")]
        if not mine:
            continue
        under = sum(rows[m].parent == truth[m][0][0] for m in mine)
        label = sum(rows[m].relation == truth[m][1] for m in mine)
        failed = sum(rows[m].status != "ok" for m in mine)
        print(f"| {fmt} | {len(mine)} | {under}/{len(mine)} | {label}/{len(mine)} | {failed} |")
    others = [c for c in truth if c not in made and truth[c][1] != "merge"]
    kept = sum(rows[c].parent == (truth[c][0][0] if truth[c][0] else "") for c in others)
    print(f"\nthe zoo's own repos (merges aside): {kept}/{len(others)} parents as in truth.csv")
    converted = [f"{ORG}/{s}" for s in CONVERTED]
    right = sum(rows[c].parent == (truth[c][0][0] if truth[c][0] else "") for c in converted)
    print(f"of them pickle-only, read from the conversion bot's PR: {right}/{len(converted)}")
    for m in made:
        if rows[m].status != "ok":
            print(f"{m}: {rows[m].reason}")


if __name__ == "__main__":
    main()
