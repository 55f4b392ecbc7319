"""Security: nothing unpickles or runs remote code, the token never leaks, the emulator stays on loopback."""

from __future__ import annotations

import ast
import os
import pickle
import subprocess
import sys
from pathlib import Path

from indexer.crawl import CrawlOptions, add_local, crawl
from indexer.hub_emulator import HubEmulator
from indexer.retry import RetryPolicy
from store.tables import read_table

REPO = Path(__file__).resolve().parents[1]
OUR_CODE = ("cli.py", "errors.py", "settings.py", "indexer", "sketches", "store", "bench")
TOKEN = "hf_SeCrEtTeStToKeN0123456789abcdef"  # distinctive: any occurrence anywhere is a leak

sys.path.insert(0, str(REPO / "tests"))
from test_reliability_faults import build_hub  # noqa: E402


def _sources() -> list[Path]:
    files: list[Path] = []
    for name in OUR_CODE:
        path = REPO / name
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return files


def _call_name(node: ast.Call) -> str:
    parts: list[str] = []
    target: ast.expr = node.func
    while isinstance(target, ast.Attribute):
        parts.append(target.attr)
        target = target.value
    parts.append(target.id if isinstance(target, ast.Name) else "?")  # model(...).eval() is not eval()
    return ".".join(reversed(parts))


def dangerous(tree: ast.AST) -> list[str]:
    """Every construct that could unpickle or run code it did not ship with."""
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            found += [f"import {n}" for n in names if n.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "marshal", "shelve")]
        if not isinstance(node, ast.Call):
            continue
        name = _call_name(node)
        keywords = {k.arg: k.value for k in node.keywords}
        if name in ("eval", "exec", "compile", "torch.load", "pickle.load", "pickle.loads", "joblib.load", "dill.load",
                    "yaml.load", "yaml.unsafe_load", "marshal.loads", "__import__"):
            found.append(name)
        if name.endswith("from_pretrained") and isinstance(keywords.get("trust_remote_code"), ast.Constant) \
                and keywords["trust_remote_code"].value is True:
            found.append(f"{name}(trust_remote_code=True)")
        if name in ("np.load", "numpy.load") and not (isinstance(keywords.get("allow_pickle"), ast.Constant)
                                                     and keywords["allow_pickle"].value is False):
            found.append("np.load without allow_pickle=False")
    return found


def test_the_scanner_catches_what_it_looks_for() -> None:
    assert dangerous(ast.parse("model.eval()\nnet(x).eval()\nre.compile(p)\n")) == []
    bad = ("import pickle\nimport joblib\nfrom dill import loads\neval(x)\nexec(y)\ntorch.load(p)\nnp.load(p)\n"
           "np.load(p, allow_pickle=True)\nAutoModel.from_pretrained(r, trust_remote_code=True)\n")
    assert len(dangerous(ast.parse(bad))) == 9
    assert dangerous(ast.parse("np.load(p, allow_pickle=False)\nAutoModel.from_pretrained(r)\n")) == []


def test_no_code_path_unpickles_or_runs_remote_code() -> None:
    files = _sources()
    assert len(files) > 40  # the scan really covers the code base
    hits = {str(f.relative_to(REPO)): d for f in files if (d := dangerous(ast.parse(f.read_text(), str(f))))}
    # The zoo trains with transformers and writes safetensors; it never loads remote weights or code.
    assert hits == {}


class _Bomb:
    """Unpickling this creates the marker file: proof that the pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _pickle_repo(folder: Path, marker: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Bomb(marker)))
    (folder / "config.json").write_text('{"model_type": "vit"}')
    return folder


def test_a_malicious_pickle_is_never_loaded_by_add_or_crawl(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    bomb = pickle.dumps(_Bomb(marker))
    assert marker.name.encode() in bomb  # the payload really is there
    local = _pickle_repo(tmp_path / "local" / "evil", marker)
    report = add_local(tmp_path / "home", [local], budget=1 << 20, progress=False).as_dict()
    assert report["skipped"] == {"pickle-only": 1}
    hub = tmp_path / "hub"
    _pickle_repo(hub / "evil" / "model", marker)
    (hub / "hub.json").write_text('{"version": 1, "repos": {"evil/model": {"createdAt": "2024-01-01T00:00:00.000Z"}}}')
    with HubEmulator(hub) as emu:
        summary = crawl(tmp_path / "home2", CrawlOptions(endpoint=emu.url, progress=False, device="cpu")).as_dict()
        fetched = [r.path for r in emu.requests() if "/resolve/" in r.path]
    assert summary["skipped"] == {"pickle-only": 1} and fetched == []  # never even downloaded
    assert not marker.exists()
    # and `index inspect` on the file itself refuses it
    out = subprocess.run([sys.executable, "-c", "import cli; cli.main()", "inspect", str(local / "pytorch_model.bin")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "pickle" in out.stderr and not marker.exists()


def test_hf_token_never_appears_in_logs_store_exports_or_errors(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    hub.mkdir()
    build_hub(hub, {"acme/r0": (None, 1), "acme/c1": ("acme/r0", 2), "acme/gated": (None, 3), "acme/down": (None, 4)})
    doc = (hub / "hub.json").read_text().replace('"acme/gated": {', '"acme/gated": {"gated": true, ')
    (hub / "hub.json").write_text(doc)
    home, export = tmp_path / "home", tmp_path / "forest.parquet"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_ENDPOINT", "INDEX_HOME")}
    env |= {"HF_TOKEN": TOKEN, "INDEX_HOME": str(home), "PYTHONPATH": str(REPO), "INDEX_DEBUG": "0"}
    index = [sys.executable, "-c", "import cli; cli.main()"]
    with HubEmulator(hub, token="only-this-one-opens-it") as refusing:  # the token is refused: an error path
        refused = subprocess.run([*index, "-vv", "crawl", "--endpoint", refusing.url], env=env, cwd=REPO,
                                 capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "HF_TOKEN" in refused.stderr
    with HubEmulator(hub) as emu:
        emu.faults.add("503", "/acme/down/resolve/*", count=None)  # a failing repo: its error is logged and stored
        emu.faults.add("reset", "/acme/c1/resolve/*", count=1)
        env_fast = env | {"PYTHONPATH": str(REPO)}
        runs = [subprocess.run([*index, "-vv", "crawl", "--endpoint", emu.url, "--json"], env=env_fast, cwd=REPO,
                               capture_output=True, text=True, timeout=300)]
        runs.append(subprocess.run([*index, "-vv", "export", str(export)], env=env, cwd=REPO, capture_output=True,
                                   text=True, timeout=120))
        runs.append(subprocess.run([*index, "-vv", "query", "acme/c1", "--json"], env=env, cwd=REPO,
                                   capture_output=True, text=True, timeout=120))
        runs.append(subprocess.run([*index, "-vv", "stats", "--json"], env=env, cwd=REPO, capture_output=True,
                                   text=True, timeout=120))
        sent_auth = any(r.path.startswith("/acme/gated/resolve/") and r.status == 206 for r in emu.requests())
    assert all(r.returncode == 0 for r in runs), [r.stderr[-500:] for r in runs]
    assert sent_auth  # the token was really in use (the gated repo was read with it)
    status = {m["repo_id"]: m["status"] for m in read_table(home, "models").to_pylist()}
    assert status["acme/down"] == "failed" and status["acme/gated"] == "indexed"
    assert "DEBUG" in runs[0].stderr and "retry" in runs[0].stderr  # -vv really logged the failures
    for run in [refused, *runs]:
        assert TOKEN not in run.stdout + run.stderr
    files = [p for p in sorted(home.rglob("*")) if p.is_file()] + [export]
    assert len(files) > 10
    for path in files:
        assert TOKEN.encode() not in path.read_bytes(), path


def test_the_emulator_binds_loopback_by_default(tmp_path: Path) -> None:
    with HubEmulator(tmp_path) as emu:
        assert emu.url.startswith("http://127.0.0.1:")
        assert emu._server is not None and emu._server.server_address[0] == "127.0.0.1"
    from click.testing import CliRunner

    from cli import index

    help_text = CliRunner().invoke(index, ["hub", "serve", "--help"]).output
    assert "127.0.0.1" in help_text  # the CLI's default host, too

