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
from settings import load_settings


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

    PATH is a .safetensors file, a model.safetensors.index.json, or a folder holding either.
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
              help="Generated model LAYOUT:ORG/NAME[:seed=N][:parent=ORG/NAME][:created=ISO][:delta=F]; "
                   "LAYOUT is llama-2-7b or llama-2-13b. Repeatable; list parents first.")
@click.option("--fault", "faults", multiple=True, metavar="SPEC",
              help="Inject KIND:GLOB[:count=N][:retry=S][:seconds=S][:after=BYTES]; KIND is 429, 500, 502, "
                   "503, 504, reset, truncate or slow. Repeatable.")
@click.option("--page-size", default=1000, show_default=True, help="Largest /api/models page.")
def hub_serve(root: Path, host: str, port: int, token: str | None, virtual: tuple[str, ...],
              faults: tuple[str, ...], page_size: int) -> None:
    """Serve ROOT/<org>/<name>/... over HTTP like huggingface.co until Ctrl-C or SIGTERM.

    Prints the URL on stdout once listening; point the client at it with HF_ENDPOINT=URL. ROOT/hub.json
    may set createdAt, gated and private per repo. The request log is at URL/_emulator/requests.
    """
    from indexer.hub_emulator import serve_forever

    def ready(url: str) -> None:
        click.echo(url)
        sys.stdout.flush()  # a script waiting for the URL must see it now, not at exit

    serve_forever(root, host=host, port=port, token=token, virtual=virtual, faults=faults, page_size=page_size,
                  ready=ready)


# --- recovery ------------------------------------------------------------------------------------


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
