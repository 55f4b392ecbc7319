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


# --- zoo -----------------------------------------------------------------------------------------


@index.group()
def zoo() -> None:
    """Build model zoos of really trained models with known lineage."""


# --- hub emulator ----------------------------------------------------------------------------------


@index.group()
def hub() -> None:
    """A local Hub emulator that speaks the real Hugging Face Hub protocol."""


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
