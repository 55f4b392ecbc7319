"""The CLI surface: every command has help, and `index --help` runs in a real process."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from cli import index


def _walk(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for name in sorted(group.commands):  # deterministic
        cmd = group.commands[name]
        if isinstance(cmd, click.Group):
            paths += _walk(cmd, prefix + (name,))
        else:
            paths.append(prefix + (name,))
    return paths


@pytest.mark.parametrize("path", _walk(index), ids=lambda p: " ".join(p) or "index")
def test_every_command_has_help(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(index, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    cmd = index
    for name in path:
        cmd = cmd.commands[name]  # type: ignore[attr-defined]
    assert (cmd.help or "").strip(), f"`index {' '.join(path)}` has no help text"


def test_console_script_runs() -> None:
    # Through a real interpreter process, the way a user runs it after `make`.
    out = subprocess.run(
        [sys.executable, "-c", "import cli; cli.main()", "--help"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "Model Graph Index" in out.stdout


def test_query_never_imports_torch_or_faiss(tmp_path) -> None:
    # `index query` must start in well under a second: torch and faiss alone take longer to import.
    code = (
        "import sys; import cli\n"
        f"sys.argv = ['index', 'query', 'org/name', '--home', {str(tmp_path)!r}]\n"
        "try:\n    cli.main()\nexcept SystemExit as e:\n    code = e.code\n"
        "print(sorted(m for m in ('torch', 'faiss') if m in sys.modules), code)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[] 1", out
    assert "no index at" in out.stderr
    assert "Traceback" not in out.stderr
