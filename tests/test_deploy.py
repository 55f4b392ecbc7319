"""deploy/: every file parses, every `index ...` it runs names commands and options our CLI has, the image
installs CPU torch 2.13.0 and runs as non-root, and no token value is written anywhere."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from cli import index
from indexer.schedule import parse_cron

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
YAMLS = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
K8S = sorted((DEPLOY / "k8s").glob("*.yaml"))


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def check_invocation(args: list[str]) -> None:
    """Walk `index`'s Click tree along ARGS: each command must exist, each --option must be one it takes."""
    command: click.Command = index
    for token in args:
        if isinstance(command, click.Group) and not token.startswith("-"):
            assert token in command.commands, f"`index` has no command {token!r} (in {args})"
            command = command.commands[token]
        elif token.startswith("--"):
            name = token.split("=", 1)[0]
            known = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)} | {"--help"}
            assert name in known, f"`{command.name}` has no option {name} (in {args})"
    assert not isinstance(command, click.Group), f"{args} names a group, not a command"


def _containers(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = doc.get("spec", {})
    if doc.get("kind") == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    yield from spec.get("template", {}).get("spec", {}).get("containers", [])


def _index_args_k8s(doc: dict[str, Any]) -> Iterator[list[str]]:
    for container in _containers(doc):
        command = container.get("command")
        if command is None or Path(command[0]).name == "index":  # none: the image's ENTRYPOINT is `index`
            yield [*(command or [])[1:], *container.get("args", [])]


def test_the_walker_catches_a_wrong_command_or_option() -> None:
    check_invocation(["serve", "--once", "--dask", "tcp://x:8786"])
    with pytest.raises(AssertionError, match="no command"):
        check_invocation(["serv", "--once"])
    with pytest.raises(AssertionError, match="no option --oncee"):
        check_invocation(["serve", "--oncee"])


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_every_yaml_parses(path: Path) -> None:
    assert _docs(path)


def test_k8s_commands_exist_and_cronjobs_are_safe() -> None:
    invocations, claims = [], set()
    pvcs = {d["metadata"]["name"] for p in K8S for d in _docs(p) if d["kind"] == "PersistentVolumeClaim"}
    for path in K8S:
        for doc in _docs(path):
            invocations += list(_index_args_k8s(doc))
            if doc["kind"] == "CronJob":
                assert doc["spec"]["concurrencyPolicy"] == "Forbid", path
                parse_cron(doc["spec"]["schedule"])
                pod = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
                claims |= {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
                for container in pod["containers"]:
                    token = [e for e in container["env"] if e["name"] == "HF_TOKEN"]
                    assert token and "secretKeyRef" in token[0]["valueFrom"], f"{path}: HF_TOKEN must come from a Secret"
    assert len(invocations) == 3  # cronjob, cronjob-gpu, the Dask cronjob; no other pod runs `index`
    for args in invocations:
        check_invocation(args)
        assert "--once" in args  # a Kubernetes CronJob runs one cycle and exits
    assert claims == pvcs == {"model-graph-index-data"}
    gpu = _docs(DEPLOY / "k8s" / "cronjob-gpu.yaml")[0]
    (container,) = gpu["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    kinds = sorted(d["kind"] for d in _docs(DEPLOY / "k8s" / "dask-workers.yaml"))
    assert kinds == ["CronJob", "Deployment", "Deployment", "Service"]


def test_compose_and_systemd_commands_exist() -> None:
    compose = _docs(DEPLOY / "docker-compose.yml")[0]
    runs = [s["command"] for s in compose["services"].values() if "entrypoint" not in s]
    assert len(runs) == 2
    for args in runs:
        check_invocation(args)
    service = (DEPLOY / "systemd" / "model-graph-index.service").read_text()
    (exec_start,) = [line.split("=", 1)[1] for line in service.splitlines() if line.startswith("ExecStart=")]
    argv = shlex.split(exec_start)
    assert Path(argv[0]).name == "index" and argv[1:] == ["serve", "--once"]
    check_invocation(argv[1:])
    assert "Type=oneshot" in service and "EnvironmentFile=" in service
    timer = (DEPLOY / "systemd" / "model-graph-index.timer").read_text()
    assert re.search(r"^OnCalendar=.+", timer, re.M) and "Persistent=true" in timer


def test_dockerfile_cpu_torch_non_root_entrypoint() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert text.startswith("#") and re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert re.search(r"pip install torch==2\.13\.0 --index-url \"?\$\{TORCH_INDEX_URL\}\"?", text)
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    torch_at = text.index("pip install torch==2.13.0")
    assert torch_at < text.index("pip install .")  # the pin first, so the project's range keeps it
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert "ENV" in text and "INDEX_HOME=/data" in text and 'VOLUME ["/data"]' in text
    assert 'ENTRYPOINT ["index"]' in text and 'CMD ["serve"]' in text
    assert not re.search(r"^(ENV|ARG)\b.*HF_TOKEN", text, re.M)  # the token only ever comes at run time


_TOKEN = re.compile(r"hf_[A-Za-z0-9]{20,}")
_ASSIGNED = re.compile(r"HF_TOKEN[ \t]*[=:][ \t]*(\S*)")


def test_no_token_value_anywhere_in_deploy() -> None:
    files = sorted(p for p in DEPLOY.rglob("*") if p.is_file())
    assert len(files) >= 10
    for path in files:
        text = path.read_text()
        assert not _TOKEN.search(text), path
        for value in _ASSIGNED.findall(text):
            # allowed: empty, a reference to the caller's environment, or a k8s valueFrom block on the next line
            assert value in ("", '""', "${HF_TOKEN:-}") or value.startswith("$"), f"{path}: HF_TOKEN={value}"
