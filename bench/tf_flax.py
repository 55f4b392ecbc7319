"""TensorFlow-only, Flax-only and ONNX-only repos (`tf_model.h5`, `flax_model.msgpack`, `onnx/model.onnx`): accuracy
on a zoo whose models are re-published as TF, Flax or ONNX, and the cost of reading one over HTTP.

    .venv/bin/python bench/tf_flax.py --zoo /work/zoo/wild-bert [--zoo ...] [--remote-layers 12]

1. Accuracy. A copy of each zoo in which every model `transformers` loads from its folder (config.json
   `architectures`), that it loads without a missing or unexpected key, and that is stored in F32 or F16 is
   re-published TF-only (its safetensors replaced by the TF twin's tf_model.h5, Keras 2's layout), and in a
   second copy Flax-only (flax_model.msgpack; indexer.zoo.twins), in a third ONNX-only (transformers.js' onnx/model.onnx,
   or model_fp16.onnx for an F16 model; indexer.zoo.onnx_export), so that fine-tunes of a PyTorch base are
   Keras, Flax or ONNX uploads and their children may be PyTorch again. Roots stay PyTorch (the Hub's bases are).
   Batch `mother` edge accuracy with and without upload times, on the PyTorch zoo and on each copy: reading
   is bit for bit, so they should match.
2. Cost. A BERT-shaped model (hidden 768, `--remote-layers` layers, random init) as safetensors, as
   tf_model.h5, as flax_model.msgpack and as onnx/model.onnx in a local Hub emulator, each read by the crawl's reader at the default 16 MiB budget: HTTP
   requests (Hub resolves + CDN ranges) and MiB read. HDF5 keeps each dataset's object header next to its
   data, so its metadata costs about one range request per variable, where a safetensors header is one.
Prints markdown tables (stdout).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexer.evaluate import read_truth_csv
from indexer.lineage.methods import Options
from indexer.lineage.recover import discover_repos, recover

logger = logging.getLogger("bench.tf_flax")


def _republish(folder: Path, root: bool, framework: str) -> bool:
    """Replace the folder's safetensors by its TF or Flax twin; False (left as it is) when it is not a
    transformers model stored in F32 / F16, or is a root."""
    import torch
    import transformers

    from indexer.zoo.twins import write_flax_msgpack, write_tf_h5

    config = folder / "config.json"
    files = list(folder.glob("*.safetensors"))
    if root or not config.is_file() or len(files) != 1:
        return False
    arch = (json.loads(config.read_text()).get("architectures") or [None])[0]
    cls = getattr(transformers, arch or "", None)
    if cls is None:
        return False
    from safetensors import safe_open

    with safe_open(str(files[0]), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    if not dtypes <= {"F32", "F16", "I64"}:
        return False
    try:
        model, info = cls.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    except Exception as exc:  # noqa: BLE001 -- a re-save transformers does not load: stays PyTorch
        logger.info("%s: kept as safetensors (%s)", folder, str(exc).splitlines()[0][:100])
        return False
    if any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")):
        # loading would drop a layer (an inserted transfer layer) or draw a missing one at random: the twin
        # would be another model, so it stays PyTorch
        logger.info("%s: kept as safetensors (%s)", folder, {k: v for k, v in info.items() if v})
        return False
    dtype = "float16" if "F16" in dtypes else "float32"
    if framework == "onnx":  # transformers.js' layout: onnx/model.onnx, or model_fp16.onnx for an F16 model
        from indexer.zoo.onnx_export import write_onnx

        state = {n: t.detach().numpy() for n, t in model.state_dict().items()}
        write_onnx(folder, state, json.loads(config.read_text()), variant="fp16" if dtype == "float16" else "fp32")
    elif framework == "tf":
        write_tf_h5(folder / "tf_model.h5", model, dtype=dtype)
    else:
        write_flax_msgpack(folder / "flax_model.msgpack", model, dtype=dtype)
    files[0].unlink()
    return True


def accuracy(zoo: Path, *, times: bool) -> float:
    truth = read_truth_csv(zoo / "truth.csv")
    parents = recover(zoo, Options(device="cpu", use_time=times)).parents()
    edges = [c for c in truth if truth[c]]
    return sum(parents.get(c) == truth[c] for c in edges) / len(edges)


def accuracy_table(zoos: list[Path], frameworks: tuple[str, ...] = ("tf", "flax", "onnx")) -> list[str]:
    rows = ["| zoo | copy | models | re-published | PyTorch: with times | copy: with times | PyTorch: no times | copy: no times |",
            "|---|---|---|---|---|---|---|---|"]
    for zoo in zoos:
        original = [accuracy(zoo, times=t) for t in (True, False)]
        for framework in frameworks:
            with tempfile.TemporaryDirectory() as tmp:
                copy = Path(tmp) / zoo.name
                shutil.copytree(zoo, copy)
                truth = read_truth_csv(copy / "truth.csv")
                repos = discover_repos(copy)
                converted = sum(_republish(path, not truth.get(repo), framework) for repo, path in repos)
                figures = [f for t, o in zip((True, False), original, strict=True) for f in (o, accuracy(copy, times=t))]
            rows.append(f"| {zoo.name} | {framework} | {len(repos)} | {converted} | "
                        + " | ".join(f"{f:.3f}" for f in figures) + " |")
    return rows


def cost_table(layers: int) -> list[str]:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from indexer.crawl import CrawlOptions, crawl
    from indexer.hub_emulator import HubEmulator
    from indexer.retry import RetryPolicy
    from indexer.zoo.onnx_export import write_onnx
    from indexer.zoo.twins import write_flax_msgpack, write_tf_h5
    from store.tables import read_records

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(num_hidden_layers=layers))
    rows = ["| format | file MiB | requests (Hub resolve + CDN) | MiB read | seconds |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        hub = Path(tmp) / "hub"
        model.save_pretrained(hub / "lab/bert-pt")
        write_tf_h5(hub / "lab/bert-tf/tf_model.h5", model)
        (hub / "lab/bert-tf/config.json").write_text((hub / "lab/bert-pt/config.json").read_text())
        write_flax_msgpack(hub / "lab/bert-flax/flax_model.msgpack", model)
        (hub / "lab/bert-flax/config.json").write_text((hub / "lab/bert-pt/config.json").read_text())
        write_onnx(hub / "lab/bert-onnx", {n: t.detach().numpy() for n, t in model.state_dict().items()},
                   json.loads((hub / "lab/bert-pt/config.json").read_text()))
        for repo, file in (("lab/bert-pt", "model.safetensors"), ("lab/bert-tf", "tf_model.h5"),
                           ("lab/bert-flax", "flax_model.msgpack"), ("lab/bert-onnx", "onnx/model.onnx")):
            only = Path(tmp) / repo.replace("/", "-")
            shutil.copytree(hub / repo, only / repo)
            with HubEmulator(only) as emu:
                started = time.perf_counter()
                crawl(Path(tmp) / f"home-{only.name}", CrawlOptions(endpoint=emu.url, progress=False, device="cpu",
                                                                    policy=RetryPolicy(sleep=lambda s: None)))
                seconds = time.perf_counter() - started
                reads = [r for r in emu.requests() if r.path.endswith(file)]  # both hops: CDN ones are logged under the file
            (row,) = read_records(Path(tmp) / f"home-{only.name}", "models")
            size = (hub / repo / file).stat().st_size / 2**20
            rows.append(f"| {file} | {size:.0f} | {len(reads)} | {row.bytes_read / 2**20:.2f} | {seconds:.1f} |")  # type: ignore[union-attr]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, action="append", default=[])
    parser.add_argument("--frameworks", nargs="+", default=["tf", "flax", "onnx"], choices=["tf", "flax", "onnx"])
    parser.add_argument("--remote-layers", type=int, default=12, help="layers of the BERT-shaped model read over HTTP (0: skip)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
    lines = accuracy_table(args.zoo, tuple(args.frameworks)) if args.zoo else []
    if args.remote_layers:
        lines += ["", *cost_table(args.remote_layers)]
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
