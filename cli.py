"""The `index` command: parse arguments, call one function, print. Nothing else lives here.

Data goes to stdout (tables, or one JSON document with --json); progress and warnings go to stderr.
Known errors become one line and exit code 1; set INDEX_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from errors import ModelGraphError
from settings import DEFAULT_PREFETCH, DEFAULT_THREADS, load_settings


def _emit_json(obj: object) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log lines on stderr (-vv for debug).")
def index(verbose: int) -> None:
    """Model Graph Index: recover which model each model was fine-tuned from, from its weights alone."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")


# --- inspect -------------------------------------------------------------------------------------


@index.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def inspect(path: Path, as_json: bool) -> None:
    """List the tensors of a safetensors file or repo folder (sharded too), reading headers only.

    PATH is a .safetensors file, a model.safetensors.index.json, a TensorFlow tf_model.h5, a Flax
    flax_model.msgpack or an ONNX export (listed under PyTorch's names and shapes), or a folder holding one
    of them.
    """
    from sketches.safetensors import open_local_repo

    with open_local_repo(path) as repo:
        tensors = repo.tensors()
        rows = [
            {"name": n, "dtype": t.dtype, "shape": list(t.shape), "bytes": t.nbytes, "file": repo.file_of(n)}
            for n, t in tensors.items()
        ]
        summary = {
            "path": str(path),
            "files": list(repo.files),
            "tensors": rows,
            "total_tensors": len(rows),
            "total_parameters": sum(t.numel for t in tensors.values()),
            "total_bytes": sum(t.nbytes for t in tensors.values()),
            "header_bytes": repo.header_bytes,
            "bytes_read": repo.bytes_read,
        }
    if as_json:
        _emit_json(summary)
        return
    _print_tensor_table(rows)
    totals = {
        "tensors": summary["total_tensors"],
        "parameters": summary["total_parameters"],
        "bytes of tensors": summary["total_bytes"],
        "files": len(summary["files"]),
        "header bytes": summary["header_bytes"],
        "bytes read": summary["bytes_read"],
    }
    click.echo()
    for label, value in totals.items():
        click.echo(f"{label + ':':<18}{value:>16,}")


def _print_tensor_table(rows: list[dict]) -> None:
    cells = [
        (r["name"], r["dtype"], "[" + ", ".join(map(str, r["shape"])) + "]", f"{r['bytes']:,}") for r in rows
    ]
    header = ("name", "dtype", "shape", "bytes")
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(4)]
    for c in [header, *cells]:
        click.echo(f"{c[0]:<{widths[0]}}  {c[1]:<{widths[1]}}  {c[2]:<{widths[2]}}  {c[3]:>{widths[3]}}")


# --- zoo -----------------------------------------------------------------------------------------


@index.group()
def zoo() -> None:
    """Build model zoos of really trained models with known lineage."""


@zoo.command("make")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--preset", type=click.Choice(["tiny", "small", "vthr", "wild-conv", "wild-bert", "wild-gpt2", "wild-tiny",
                                           "relations"]),
              default="tiny", show_default=True,
              help="tiny: 2 trees x 4 (seconds); small: 3 x 7 (a minute); vthr: 5 x 21, the paper's VTHR. "
                   "wild-conv / wild-bert / wild-gpt2: a ResNet / BERT / GPT-2 family with the real Hub's "
                   "phenomena (about 25 models, minutes); wild-tiny: a handful of conv models (seconds). "
                   "relations: tiny Llamas with every Hub relation -- fine-tunes, a duplicate, peft adapters, "
                   "GGUF and GPTQ copies, mergekit merges (21 repos, 3-12 minutes on 2 cores).")
@click.option("--split", type=click.Choice(["ft", "lora-f", "lora-v"]), default="ft", show_default=True,
              help="ft: full fine-tuning; lora-f: LoRA rank 16; lora-v: LoRA rank from {8,16,32,64}. "
                   "Ignored by the wild and relations presets.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same weights (byte for byte).")
@click.option("--force", is_flag=True, help="Replace a zoo already built in OUT.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Training processes (one thread each). Default: min(2, CPUs). Ignored by the relations preset.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def zoo_make(out: Path, preset: str, split: str, seed: int, force: bool, workers: int | None,
             as_json: bool) -> None:
    """Train a zoo of small models in trees and write Hub-style repos under OUT.

    OUT/<org>/<name>/ holds config.json, model.safetensors and a model card whose base_model is the
    ground truth; OUT/hub.json (upload times), OUT/truth.csv (parent,child; the wild presets add a
    relation column) and OUT/zoo.json (hyper-parameters, accuracies, timings) describe the whole zoo.
    The relations preset writes each repo in its real layout (adapter_config.json +
    adapter_model.safetensors; a .gguf alone; GPTQ packed safetensors) and OUT/truth.csv as
    child,parents,relation (parents ";"-joined for a merge); `index eval OUT --truth OUT/truth.csv`
    scores it per relation.
    """
    if preset == "relations":
        # imported late: torch, peft and mergekit load in seconds
        from indexer.zoo.relations import make_relations_zoo

        rel = make_relations_zoo(out, seed=seed, force=force)
        kinds: dict[str, int] = {}
        for m in rel.models:
            kinds[m.relation or "root"] = kinds.get(m.relation or "root", 0) + 1
        if as_json:
            _emit_json({"out": str(rel.out), "n_models": len(rel.models), "relations": kinds,
                        "seconds": round(rel.seconds, 1)})
            return
        click.echo(f"{len(rel.models)} models ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}) "
                   f"written to {rel.out} in {rel.seconds:.1f} s")
        return
    if preset.startswith("wild-"):
        from indexer.zoo.wild import make_wild_zoo  # imported late: torch and transformers load in seconds

        wild = make_wild_zoo(out, preset=preset, seed=seed, force=force, workers=workers)
        drifts = {repo: round(d, 3) for repo, tag, d in wild.drifts if tag == "long-high-lr" and d is not None}
        if as_json:
            _emit_json({"out": str(wild.out), "n_models": wild.n_models, "n_trees": wild.n_trees,
                        "seconds": round(wild.seconds, 1), "long_high_lr_drift": drifts})
            return
        click.echo(f"{wild.n_models} models in {wild.n_trees} trees written to {wild.out} in {wild.seconds:.1f} s")
        for repo, drift in drifts.items():
            click.echo(f"long-high-lr {repo}: body drift {drift} (median relative L2 vs its parent)")
        return
    from indexer.zoo import make_zoo  # imported late: torch and transformers load in seconds

    summary = make_zoo(out, preset=preset, split=split, seed=seed, force=force, workers=workers)  # type: ignore[arg-type]
    if as_json:
        _emit_json({"out": str(summary.out), "n_models": summary.n_models, "n_trees": summary.n_trees,
                    "seconds": round(summary.seconds, 1)})
    else:
        click.echo(f"{summary.n_models} models in {summary.n_trees} trees written to {summary.out} "
                   f"in {summary.seconds:.1f} s")


@zoo.command("stats")
@click.argument("out", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def zoo_stats_cmd(out: Path, as_json: bool) -> None:
    """Print a built zoo's build time and mean accuracies per level (root / child / grandchild)."""
    from dataclasses import asdict

    from indexer.zoo.stats import zoo_stats

    stats = zoo_stats(out)
    if as_json:
        _emit_json(asdict(stats))
        return
    click.echo(f"{stats.preset}/{stats.split} seed {stats.seed}: built in {stats.total_seconds:.1f} s")
    click.echo(f"{'level':<11}  {'models':>6}  {'train acc':>9}  {'held-out':>8}  {'s/model':>7}")
    for lev in stats.levels:
        click.echo(f"{lev.level:<11}  {lev.n_models:>6}  {lev.train_accuracy:>9.3f}  {lev.test_accuracy:>8.3f}  "
                   f"{lev.seconds:>7.1f}")


# --- hub emulator ----------------------------------------------------------------------------------


@index.group()
def hub() -> None:
    """A local Hub emulator that speaks the real Hugging Face Hub protocol."""


@hub.command("serve")
@click.argument("root", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (keep loopback unless sure).")
@click.option("--port", default=0, show_default=True, help="Port; 0 picks a free one.")
@click.option("--token", default=None, help="Accept only this bearer token (default: any non-empty token).")
@click.option("--virtual", "virtual", multiple=True, metavar="SPEC",
              help="Generated model LAYOUT:ORG/NAME[:seed=N][:parent=ORG/NAME][:created=ISO][:delta=F][:kind=K]; "
                   "LAYOUT is llama-2-7b or llama-2-13b. Repeatable; list parents first.")
@click.option("--fault", "faults", multiple=True, metavar="SPEC",
              help="Inject KIND:GLOB[:count=N][:retry=S][:seconds=S][:after=BYTES]; KIND is 429, 500, 502, "
                   "503, 504, reset, truncate or slow. Repeatable.")
@click.option("--page-size", default=1000, show_default=True, help="Largest /api/models page.")
@click.option("--url-ttl", type=float, default=3600.0, show_default=True,
              help="Seconds a signed CDN URL stays valid (LFS files are a 302 to a second, CDN port).")
@click.option("--direct", is_flag=True, help="Serve LFS files from the Hub port directly, without the CDN redirect.")
@click.option("--latency", type=float, default=0.0, show_default=True,
              help="Seconds every Hub and CDN request waits before its answer (a network round trip).")
def hub_serve(root: Path, host: str, port: int, token: str | None, virtual: tuple[str, ...],
              faults: tuple[str, ...], page_size: int, url_ttl: float, direct: bool, latency: float) -> None:
    """Serve ROOT/<org>/<name>/... over HTTP like huggingface.co until Ctrl-C or SIGTERM.

    Prints the URL on stdout once listening; point the client at it with HF_ENDPOINT=URL. ROOT/hub.json
    may set createdAt, gated and private per repo. The request log is at URL/_emulator/requests.
    """
    from indexer.hub_emulator import serve_forever

    def ready(url: str) -> None:
        click.echo(url)
        sys.stdout.flush()  # a script waiting for the URL must see it now, not at exit

    serve_forever(root, host=host, port=port, token=token, virtual=virtual, faults=faults, page_size=page_size,
                  redirect=not direct, url_ttl=url_ttl, latency=latency, ready=ready)


# --- crawl ---------------------------------------------------------------------------------------


def _parse_since(value: str | None) -> object:
    if value is None:
        return None
    from datetime import UTC, datetime

    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a date like 2024-01-31 or 2024-01-31T12:00:00Z") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _store_option(func):  # type: ignore[no-untyped-def]
    # The one --home flag of every command that reads or writes the store.
    return click.option(
        "--home", type=click.Path(path_type=Path), default=None,
        help="The store (default: $INDEX_HOME or ~/.cache/model-graph-index).",
    )(func)


def _crawl_threads_options(func):  # type: ignore[no-untyped-def]
    # --prefetch, --threads and --revisit, the same for `index crawl` and `index serve`
    func = click.option("--revisit", type=click.IntRange(min=0), default=0, show_default=True,
                        help="Also look again at N pickle-only repos earlier crawls skipped (a different sample "
                             "each day): the conversion bot may have opened its safetensors PR since.")(func)
    func = click.option("--threads", type=click.IntRange(min=1), default=DEFAULT_THREADS, show_default=True,
                        help="Threads of the numeric libraries (torch, BLAS, OpenMP) in this process; its kernels "
                             "are small.")(func)
    return click.option("--prefetch", type=click.IntRange(min=0), default=DEFAULT_PREFETCH, show_default=True,
                        help="Without a cluster: threads reading the next models while this one's lineage runs "
                             "(0: none).")(func)


def _print_crawl(summary: dict) -> None:
    for key in ("seen", "indexed", "unchanged", "bytes_read_total", "bytes_read_max_per_model", "seconds"):
        click.echo(f"{key.replace('_', ' ') + ':':<26}{summary[key]:>16,}")
    for status in ("skipped", "failed"):
        for reason, n in summary[status].items():
            click.echo(f"{status + ' (' + reason + '):':<26}{n:>16,}")


@index.command()
@click.option("--endpoint", default=None, help="The Hub to crawl (default: $HF_ENDPOINT or https://huggingface.co).")
@click.option("--arch", "archs", multiple=True, metavar="NAME",
              help="Only models tagged NAME (e.g. LlamaForCausalLM, llama); repeatable, each its own listing.")
@click.option("--library", default=None, help="Only models of this library tag (e.g. transformers).")
@click.option("--limit", type=click.IntRange(min=0), default=None,
              help="Fetch at most N models this run (already-indexed ones are passed over and not counted).")
@click.option("--since", default=None, metavar="T", help="Never list models created before T (ISO date or time).")
@click.option("--budget-mib", type=click.IntRange(min=1), default=None,
              help="Tensor bytes read per model, in MiB (default: $INDEX_BYTE_BUDGET_MIB or 16).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where exact distances run (auto: CUDA when present).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Fetch and decode on a local Dask cluster of N worker processes (this process writes).")
@click.option("--dask", "dask", default=None, metavar="ADDRESS",
              help="Fetch and decode on the Dask cluster whose scheduler is ADDRESS (e.g. tcp://host:8786).")
@_crawl_threads_options
@_store_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def crawl(endpoint: str | None, archs: tuple[str, ...], library: str | None, limit: int | None, since: str | None,
          budget_mib: int | None, device: str, workers: int | None, dask: str | None, prefetch: int, threads: int,
          revisit: int, home: Path | None, as_json: bool) -> None:
    """Index the models created since the last crawl, newest first, from a few MiB of range reads each.

    Per model: the safetensors headers, then at most the byte budget of planned tensor rows. Adapter-only,
    pickle-only, gated (without HF_TOKEN) and unsupported repos are recorded as skipped with a reason;
    HTTP errors that survive retries, truncated bodies and NaN weights as failed. The high-water mark moves
    only after every row it covers is written.
    """
    from indexer.crawl import CrawlOptions, crawl as run

    settings = load_settings()
    options = CrawlOptions(
        endpoint=(endpoint or settings.endpoint).rstrip("/"), token=settings.token, archs=archs, library=library,
        limit=limit, since=_parse_since(since),  # type: ignore[arg-type]
        budget=budget_mib * 1024 * 1024 if budget_mib else settings.byte_budget, progress=not as_json,
        device=device, cache_bytes=settings.cache_bytes, prefetch=prefetch, threads=threads, revisit=revisit,
    )
    cluster = _cluster(workers, dask, 10.0)
    if cluster is None:
        summary = run(home or settings.home, options).as_dict()
    else:
        from indexer.distributed import crawl_distributed

        summary = crawl_distributed(home or settings.home, options, cluster=cluster).as_dict()  # type: ignore[arg-type]
    if as_json:
        _emit_json(summary)
    else:
        _print_crawl(summary)


@index.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--budget-mib", type=click.IntRange(min=1), default=None,
              help="Tensor bytes read per model, in MiB (default: $INDEX_BYTE_BUDGET_MIB or 16).")
@_store_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def add(paths: tuple[Path, ...], budget_mib: int | None, home: Path | None, as_json: bool) -> None:
    """Index local repo folders (each holding *.safetensors, a sharded index, a GGUF, an adapter, a
    tf_model.h5, a flax_model.msgpack or an ONNX export) with the crawl's pipeline.

    The repo id is ORG/NAME when the folder sits in a zoo root (ROOT/ORG/NAME with ROOT/hub.json), else
    local/<folder name>; the revision is a hash of the weight files' bytes, so re-adding is a no-op.
    """
    from indexer.crawl import add_local

    settings = load_settings()
    budget = budget_mib * 1024 * 1024 if budget_mib else settings.byte_budget
    summary = add_local(home or settings.home, paths, budget=budget, progress=not as_json).as_dict()
    if as_json:
        _emit_json(summary)
    else:
        _print_crawl(summary)


# --- recovery ------------------------------------------------------------------------------------

_METHOD = click.Choice(["mother-paper", "mother", "phylogeny"])


def _recovery_options(method: str, trees: int | None, distance: str, device: str, seed: int,
                      no_time: bool = False, orient: str = "center") -> object:
    from indexer.lineage.methods import Options

    return Options(method=method, trees=trees, distance=distance, device=device, seed=seed,  # type: ignore[arg-type]
                   use_time=not no_time, orient=orient)  # type: ignore[arg-type]


def _recovery_flags(fn: object) -> object:
    """The options `recover` and `eval` share."""
    for deco in reversed([
        click.option("--method", type=_METHOD, default="mother", show_default=True,
                     help="mother (ours: K from data, rank or spectral-tail distance, upload time, else kurtosis), "
                          "mother-paper (the paper: needs --trees) or phylogeny (Neural Phylogeny baseline)."),
        click.option("--trees", "trees", type=click.IntRange(min=1), default=None,
                     help="Number of trees K, when known (required by mother-paper)."),
        click.option("--distance", type=click.Choice(["auto", "linf", "rank", "tail", "l2", "l2n"]), default="auto",
                     show_default=True,
                     help="Pairwise distance: mother-paper uses linf unless told rank (LoRA splits); mother's auto "
                          "picks rank on low-rank layers, else tail (the spectral tail of the difference)."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                     help="Where pairwise distances run; auto uses CUDA when torch sees a GPU."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed (phylogeny's KMeans)."),
        click.option("--no-time", "no_time", is_flag=True,
                     help="Ignore hub.json upload times (as for the Hub's pre-2022 repos, which share one createdAt)."),
        click.option("--orient", type=click.Choice(["center", "center-norm", "kurtosis"]), default="center",
                     show_default=True,
                     help="Direction of a tree without upload times: root the spanning tree at its centre, the "
                          "centre moved up to one hop by the row-norm cue (an ablation), or the paper's kurtosis "
                          "penalty."),
    ]):
        fn = deco(fn)  # type: ignore[operator]
    return fn


@index.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_recovery_flags  # type: ignore[arg-type]
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON instead of a tree.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write one row per model to this Parquet file.")
def recover(folder: Path, method: str, trees: int | None, distance: str, device: str, seed: int,
            no_time: bool, orient: str, as_json: bool, out: Path | None) -> None:
    """Recover which model each model under FOLDER was derived from, and how, from the weights alone.

    FOLDER holds repos as FOLDER/<org>/<name>/: full models (*.safetensors), LoRA adapters
    (adapter_config.json + adapter_model.safetensors), GGUF files and packed quantized safetensors (GPTQ,
    AWQ, bitsandbytes, FP8), each read by the crawl's own reader. Every edge is labelled finetune,
    duplicate, adapter, quantized or merge; merges are detected from the weights and list their parents
    with weights; an adapter whose base is not in FOLDER hangs under the base's declared name. A file that
    cannot be read is one failed row with a one-line reason. FOLDER/hub.json (createdAt) is used as the
    upload time. Model cards are never read.
    """
    from indexer.lineage.recover import recover as run, render_forest, row_dicts, write_parquet

    forest = run(folder, _recovery_options(method, trees, distance, device, seed, no_time, orient))  # type: ignore[arg-type]
    if out is not None:
        write_parquet(forest, out)
        click.echo(f"wrote {len(forest.rows)} rows to {out}", err=True)
    if as_json:
        _emit_json(row_dicts(forest))
    elif out is None:
        click.echo(render_forest(forest))


@index.command()
@click.argument("a")
@click.argument("b")
@click.option("--endpoint", default=None, help="The Hub for ORG/NAME arguments (default: $HF_ENDPOINT or https://huggingface.co).")
@click.option("--budget-mib", type=click.IntRange(min=1), default=None,
              help="Tensor bytes read per Hub model, in MiB (default: $INDEX_BYTE_BUDGET_MIB or 16).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def compare(a: str, b: str, endpoint: str | None, budget_mib: int | None, as_json: bool) -> None:
    """Is B derived from A? Compare two models from their weights alone.

    A and B are local repo folders or Hub repos (ORG/NAME, read by range like the crawl). Prints whether
    they are comparable (and on which shared layers), related or not (the permutation test's Z and
    p-value), the likely direction and why, their distance, and whether their heads match. Two models
    that cannot be compared say so in one line and exit 0. An adapter against a model: whether the
    model's shapes take its updates, the base it declares, and for DoRA whether its magnitudes follow
    the model's rows; two adapters: whether one is the other trained further.
    """
    from indexer.lineage.compare import compare as run, load_side, render

    settings = load_settings()
    where = dict(endpoint=(endpoint or settings.endpoint).rstrip("/"), token=settings.token,
                 budget=budget_mib * 1024 * 1024 if budget_mib else settings.byte_budget)
    result = run(load_side(a, **where), load_side(b, **where))  # type: ignore[arg-type]
    if as_json:
        _emit_json(result.as_dict())
    else:
        click.echo(render(result))


@index.command(name="eval")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--truth", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="CSV `parent,child` (or `child,parents,relation`, a merge's parents ';'-joined) of the true "
                   "lineage (default: the base_model declared in each model card).")
@click.option("--forest", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Score this `index export` Parquet file instead of recovering FOLDER again (draws it too).")
@_recovery_flags  # type: ignore[arg-type]
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
def eval_(folder: Path, truth: Path | None, forest: Path | None, method: str, trees: int | None, distance: str,
          device: str, seed: int, no_time: bool, orient: str, as_json: bool) -> None:
    """Recover the forest of FOLDER and score it against the true lineage (edge and clustering accuracy).

    FOLDER is read as by `index recover` (full models, adapters, GGUF and packed quantized repos; merges
    detected); with a `child,parents,relation` truth CSV the report also scores each relation: parent,
    label, merge parent set and bytes read per model, and the confusion of labels.
    """
    from indexer.evaluate import evaluate_folder, render_report

    if forest is not None:  # score what the index exported instead of recovering again
        _eval_export(folder, forest, truth, as_json)
        return
    report = evaluate_folder(folder, _recovery_options(method, trees, distance, device, seed, no_time, orient),  # type: ignore[arg-type]
                             truth=truth)
    if as_json:
        _emit_json(report.as_dict())
    else:
        click.echo(render_report(report))


def _eval_export(folder: Path, forest: Path, truth: Path | None, as_json: bool) -> None:
    from indexer.evaluate import evaluate, read_exported_forest, read_truth_csv, render_report, truth_from_cards
    from indexer.lineage.recover import render_forest

    exported = read_exported_forest(forest)
    report = evaluate(exported, read_truth_csv(truth) if truth is not None else truth_from_cards(folder))
    if as_json:
        _emit_json(report.as_dict())
        return
    click.echo(render_forest(exported))
    click.echo()
    click.echo(render_report(report))


# --- query / export / stats (read-only; must not import torch or faiss) -----------------------------


def _home(home: Path | None) -> Path:
    return home if home is not None else load_settings().home


@index.command()
@click.argument("repo_id")
@_store_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def query(repo_id: str, home: Path | None, as_json: bool) -> None:
    """Ancestry of REPO_ID: chain to the root, children, siblings, cluster, declared base model."""
    from store.query import query_model

    report = query_model(_home(home), repo_id)
    if as_json:
        _emit_json(report.to_dict())
        return
    _print_report(report)


def _print_report(report) -> None:  # type: ignore[no-untyped-def]
    click.echo(f"{report.repo_id} @ {report.revision[:12]}  family={report.family}  status={report.status}")
    if not report.in_forest:
        click.echo(f"  not in the forest ({report.reason or 'no lineage yet'})")
    if report.weights_format and report.weights_format != "safetensors":
        click.echo(f"  weights: {report.weights_format}  {_details_line(report.details)}".rstrip())
    for step in report.ancestry:
        conf = "" if step.confidence is None else f"  confidence={step.confidence:.2f}"
        dist = "" if step.distance is None else f"  distance={step.distance:.4g}"
        parents = "" if len(step.parents) < 2 else "  (" + ", ".join(f"{p} {w:.2f}" for p, w in step.parents) + ")"
        click.echo(f"  {step.child}  <-{step.relation}-  {step.parent}{parents}{dist}{conf}")
    if report.in_forest:
        click.echo(f"  root: {report.root}  depth: {report.depth}  cluster: {report.cluster}")
    kids = [f"{c} ({r})" for c, r in zip(report.children, report.child_relations, strict=False)] or list(report.children)
    click.echo(f"  children ({len(report.children)}): {', '.join(kids) or '-'}")
    click.echo(f"  siblings ({len(report.siblings)}): {', '.join(report.siblings) or '-'}")
    verdict = {True: "agrees", False: "DISAGREES", None: "n/a"}[report.agrees_with_declared]
    declared = report.declared_base_model or "(none declared)"
    click.echo(f"  declared base_model: {declared}  -> {verdict}")
    if report.declared_relation or report.relation_agrees_with_declared is not None:
        rel = {True: "agrees", False: "DISAGREES", None: "n/a"}[report.relation_agrees_with_declared]
        recovered = report.relation or ("root" if report.relation == "" else "not placed")
        click.echo(f"  declared relation: {report.declared_relation or '(inferred)'}  recovered: {recovered}  -> {rel}")
    click.echo(f"  indexed at: {report.indexed_at.isoformat()}")


def _details_line(details: str) -> str:
    """An adapter's or quantized model's recorded details, one line (`index query`)."""
    import json

    try:
        doc = json.loads(details)
    except ValueError:
        return ""
    flat = {}
    for k, v in sorted(doc.items()):  # one level of nesting shown as key.sub (a DoRA test's figures)
        flat |= {f"{k}.{sub}": w for sub, w in sorted(v.items())} if isinstance(v, dict) else {k: v}
    # a nested False is a verdict (the DoRA test's related=False); a top-level one an unset option
    shown = {k: v for k, v in flat.items() if (v not in (None, False, "", [], {}) or (v is False and "." in k))
             and len(str(v)) < 80}
    return "  ".join(f"{k}={v}" for k, v in shown.items())


_SHOW_FORMATS = ("text", "mermaid", "dot", "svg", "html", "json")  # indexer.web.render.FORMATS, without importing it


@index.command()
@click.argument("repo_id")
@click.option("--depth", type=click.IntRange(min=0), default=None,
              help="Only the models within N edges of REPO_ID (default: the root's whole tree).")
@click.option("--format", "fmt", type=click.Choice(_SHOW_FORMATS), default="text", show_default=True,
              help="text: a tree for the terminal; mermaid / dot: for other tools; svg: a picture; "
                   "html: one self-contained page that opens offline; json: for machines.")
@click.option("--max-children", type=click.IntRange(min=1), default=20, show_default=True,
              help="Children drawn per model; the rest are collapsed into one 'N more' line with a count.")
@click.option("--max-nodes", type=click.IntRange(min=1), default=400, show_default=True,
              help="Models drawn in all; past it every further child is collapsed the same way.")
@_store_option
def show(repo_id: str, depth: int | None, fmt: str, max_children: int, max_nodes: int, home: Path | None) -> None:
    """Draw the family of REPO_ID: its root's tree, one line per model, large families summarised.

    Each line gives the model's relation to its parent, the confidence, the distance, the upload date and,
    where the model card declares another base model, that declared base. REPO_ID is marked with ◀.
    Write a picture with `--format html > family.html` (opens offline) or `--format svg`.
    """
    from indexer.web.render import show_family

    click.echo(show_family(_home(home), repo_id, fmt=fmt, depth=depth,  # type: ignore[arg-type]
                           max_children=max_children, max_nodes=max_nodes), nl=False)


@index.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (keep loopback unless sure).")
@click.option("--port", type=click.IntRange(min=0, max=65535), default=8765, show_default=True,
              help="Port; 0 picks a free one.")
@click.option("--cache", type=click.IntRange(min=0), default=256, show_default=True,
              help="JSON answers kept in memory until the store changes (0: read the store for every request).")
@_store_option
def web(host: str, port: int, cache: int, home: Path | None) -> None:
    """Browse the store in a local, read-only web app until Ctrl-C: search, families drawn, model detail.

    Prints the URL on stdout once listening. JSON for other tools: /api/query/ORG/NAME, /api/show/ORG/NAME,
    /api/stats, /api/search?prefix=P. It reads as `index query` does, so a running crawl is never blocked.
    """
    from indexer.web.app import serve as run

    def ready(url: str) -> None:
        click.echo(url)
        sys.stdout.flush()  # a script waiting for the URL must see it now, not at exit
        click.echo(f"serving {_home(home)} read-only at {url} (Ctrl-C stops)", err=True)

    run(_home(home), host=host, port=port, cache=cache, ready=ready)


@index.command()
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@_store_option
def export(out: Path, home: Path | None) -> None:
    """Write the whole forest to OUT (Parquet), one row per model; readable by pandas, polars, DuckDB."""
    from store.query import export_forest

    rows = export_forest(_home(home), out)
    click.echo(f"wrote {rows} rows to {out}", err=True)


@index.command()
@_store_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def stats(home: Path | None, as_json: bool) -> None:
    """Counts per family, clusters, failures by reason, store size."""
    from store.query import store_stats

    result = store_stats(_home(home))
    if as_json:
        _emit_json(result)
        return
    for key in sorted(result):  # deterministic
        click.echo(f"{key}: {json.dumps(result[key], sort_keys=True, default=str)}")


# --- serve ---------------------------------------------------------------------------------------


def _cluster(workers: int | None, dask: str | None, timeout: float) -> object:
    if workers is None and dask is None:
        return None
    from indexer.distributed import ClusterSpec

    return ClusterSpec(address=dask, workers=workers, timeout=timeout)


def _serve_log() -> None:
    # The run summaries are the service's output: one bare JSON line each on stderr, at any -v level.
    log = logging.getLogger("indexer.schedule")
    for old in list(log.handlers):  # a second call in one process (tests) writes to the current stderr
        log.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


@index.command()
@click.option("--cron", default=None, metavar="EXPR",
              help="When to crawl: five crontab fields in UTC (default: $INDEX_CRON or '0 3 * * *').")
@click.option("--once", is_flag=True, help="Run one crawl now and exit (for cron, systemd timers, Kubernetes).")
@click.option("--run-now", is_flag=True, help="Scheduled mode: also crawl once at start.")
@click.option("--endpoint", default=None, help="The Hub to crawl (default: $HF_ENDPOINT or https://huggingface.co).")
@click.option("--arch", "archs", multiple=True, metavar="NAME", help="Only models tagged NAME; repeatable.")
@click.option("--library", default=None, help="Only models of this library tag (e.g. transformers).")
@click.option("--limit", type=click.IntRange(min=0), default=None, help="Fetch at most N models per run.")
@click.option("--since", default=None, metavar="T", help="Never list models created before T (ISO date or time).")
@click.option("--budget-mib", type=click.IntRange(min=1), default=None,
              help="Tensor bytes read per model, in MiB (default: $INDEX_BYTE_BUDGET_MIB or 16).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Fetch and decode on a local Dask cluster of N worker processes (this process writes).")
@click.option("--dask", "dask", default=None, metavar="ADDRESS",
              help="Fetch and decode on the Dask cluster whose scheduler is ADDRESS (e.g. tcp://host:8786).")
@click.option("--dask-timeout", type=float, default=10.0, show_default=True,
              help="Seconds to wait for the Dask scheduler before giving up.")
@_crawl_threads_options
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the lineage step's exact distances run; auto uses CUDA when torch sees a GPU.")
@click.option("--misfire-grace", type=click.IntRange(min=1), default=6 * 3600, show_default=True,
              help="Seconds a scheduled run may start late (host asleep, previous run long) and still run.")
@_store_option
def serve(cron: str | None, once: bool, run_now: bool, endpoint: str | None, archs: tuple[str, ...],
          library: str | None, limit: int | None, since: str | None, budget_mib: int | None, workers: int | None,
          dask: str | None, dask_timeout: float, prefetch: int, threads: int, revisit: int, device: str,
          misfire_grace: int, home: Path | None) -> None:
    """Crawl on a schedule (the nightly job), or once with --once; the options are `index crawl`'s.

    Each run logs one JSON line on stderr (status ok / stopped / locked / error, and the crawl summary).
    SIGTERM or Ctrl-C lets the crawl finish its current model, writes its rows and exits 0; the next run
    resumes. A failed scheduled run is logged and the next one is awaited; with --once it exits 1.
    """
    from indexer.crawl import CrawlOptions
    from indexer.schedule import ServeOptions, serve as run

    settings = load_settings()
    crawl_options = CrawlOptions(
        endpoint=(endpoint or settings.endpoint).rstrip("/"), token=settings.token, archs=archs, library=library,
        limit=limit, since=_parse_since(since),  # type: ignore[arg-type]
        budget=budget_mib * 1024 * 1024 if budget_mib else settings.byte_budget, progress=False, device=device,
        cache_bytes=settings.cache_bytes, prefetch=prefetch, threads=threads, revisit=revisit,
    )
    _serve_log()
    run(home or settings.home, ServeOptions(
        crawl=crawl_options, cron=cron or settings.cron, once=once, run_now=run_now, misfire_grace=misfire_grace,
        cluster=_cluster(workers, dask, dask_timeout),  # type: ignore[arg-type]
    ))


def main() -> None:
    """Console entry point: run the group, turn our errors into one line and exit code 1."""
    try:
        index.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except ModelGraphError as exc:
        if load_settings().debug:
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        if load_settings().debug:
            raise
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        click.echo(f"error: {where}{exc.strerror or exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
