"""K-quant GGUF copies through the batch path: parent, relation label and bytes read per model.

    .venv/bin/python bench/gguf_kquant.py [--out DIR] [--json]

1. write indexer.zoo.quantize.write_kquant_folder into DIR (default: a temporary folder): llamas 256 wide
   (rows of whole 256-value super-blocks), and a Q4_K_M, a Q6_K and a Q4_K copy made by ggml's own
   quantizer (ggml_quantize_chunk, libggml-python) -- the relations zoo's 64-wide llamas get no K block;
2. recover it as `index recover DIR` does (indexer.lineage.recover, whole models read) and score it as
   `index eval DIR --truth DIR/truth.csv` does;
3. print one row per model: block types, file bytes, bytes read, recovered parent and relation.
The same folder can then be read by the CLI itself: `index recover DIR`, `index eval DIR --truth DIR/truth.csv`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexer.evaluate import evaluate, read_relations_csv
from indexer.lineage.methods import Options
from indexer.lineage.recover import recover
from indexer.zoo.quantize import write_kquant_folder
from sketches.gguf import read_header
from sketches.safetensors import FileSource


def _types(folder: Path) -> tuple[str, int]:
    """(block types of the repo's file, its size in bytes)."""
    gguf_files = sorted(folder.glob("*.gguf"))
    if not gguf_files:
        return "F32 safetensors", sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    with FileSource(gguf_files[0]) as src:
        header = read_header(src)
    return " ".join(f"{q}x{n}" for q, n in header.qtypes().items()), src.size


def run(out: Path) -> dict[str, object]:
    started = time.perf_counter()
    write_kquant_folder(out)
    built = time.perf_counter() - started
    started = time.perf_counter()
    forest = recover(out, Options(device="cpu"))
    recovered = time.perf_counter() - started
    relations = read_relations_csv(out / "truth.csv")
    expected = {child: parents[0] if parents else "" for child, (parents, _) in relations.items()}
    report = evaluate(forest, expected, relations)
    rows = []
    for r in forest.rows:
        types, size = _types(out / r.repo_id)
        rows.append({"repo": r.repo_id, "types": types, "file_bytes": size, "bytes_read": r.bytes_read,
                     "parent": r.parent, "relation": r.relation, "true": list(relations[r.repo_id])})
    return {"build_seconds": round(built, 2), "recover_seconds": round(recovered, 2), "accuracy": report.accuracy,
            "relations": {k: dict(v) for k, v in report.relations.items()}, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the folder here (kept) instead of a temporary one")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.out is not None:
        result = run(args.out)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = run(Path(tmp) / "kquant")
    if args.json:
        print(json.dumps(result, indent=1, sort_keys=True))
        return
    print(f"{'repo':<18} {'block types':<24} {'file bytes':>11} {'bytes read':>11}  recovered (true)")
    for row in result["rows"]:  # type: ignore[union-attr]
        parents, relation = row["true"]
        parent = ";".join(parents)
        got = f"{row['parent'] or '-'} {row['relation'] or 'root'}"
        print(f"{row['repo']:<18} {row['types']:<24} {row['file_bytes']:>11,} {row['bytes_read']:>11,}  "
              f"{got} ({parent or '-'} {relation or 'root'})")
    q = result["relations"].get("quantized", {})  # type: ignore[union-attr]
    print(f"edge accuracy {result['accuracy']:.2f}; quantized: parent {q.get('parent', 0):.2f} label "
          f"{q.get('label', 0):.2f} bytes/model {q.get('bytes', 0):,.0f}; build {result['build_seconds']} s, "
          f"recover {result['recover_seconds']} s")


if __name__ == "__main__":
    main()
