"""`index show` and `index web` without a browser: every format on a hand-built store, the summary's
invariants, the JSON endpoints and the start-up errors, through real processes over loopback."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from web_support import (
    CHILDREN,
    FAILED,
    GRANDCHILDREN,
    HOSTILE,
    HOSTILE_CARD,
    LONE_ROOT,
    ROOT,
    SHA,
    build_store,
    get,
    repo_path,
    run_index,
    running_web,
)

from errors import UnknownModelError
from indexer.web.render import render_html, render_svg, show_family
from indexer.web.view import summarise
from store.format import write_format
from store.graph import Family, FamilyNode, family_of, model_detail, overview, search
from store.layout import table_dir
from store.schema import SPECS, EdgeRecord, ModelRecord
from store.tables import Store


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_store(tmp_path_factory.mktemp("web") / "home")


# --- store.graph -------------------------------------------------------------------------------------


def test_family_is_the_whole_tree_from_any_member(home: Path) -> None:
    family = family_of(home, GRANDCHILDREN[1])
    assert family.root == ROOT and family.size == 1 + len(CHILDREN) + 3
    assert {n.repo_id for n in family.nodes} == {ROOT, *CHILDREN, *GRANDCHILDREN, HOSTILE}
    by_id = {n.repo_id: n for n in family.nodes}
    assert by_id[ROOT].relation == "root" and by_id[ROOT].confidence is None
    assert by_id[CHILDREN[0]].relation == "finetune"  # no relation column in this store: a fine-tune
    assert by_id[CHILDREN[0]].confidence == pytest.approx(0.9)
    assert by_id[HOSTILE].agrees_with_declared is False and by_id[GRANDCHILDREN[0]].agrees_with_declared is True


def test_depth_keeps_the_neighbourhood_only(home: Path) -> None:
    family = family_of(home, GRANDCHILDREN[0], depth=1)
    assert {n.repo_id for n in family.nodes} == {GRANDCHILDREN[0], CHILDREN[0]}
    two = family_of(home, GRANDCHILDREN[0], depth=2)
    assert {n.repo_id for n in two.nodes} == {ROOT, CHILDREN[0], *GRANDCHILDREN, HOSTILE}
    assert two.size == family.size == 34  # the tree's size, whatever the cut


def test_unknown_and_unplaced_models(home: Path) -> None:
    with pytest.raises(UnknownModelError) as err:
        family_of(home, "zoo/bsae")
    assert ROOT in err.value.suggestions
    failed = family_of(home, FAILED)
    assert not failed.in_forest and failed.reason == "HTTP 500 from the Hub"


def test_search_by_prefix_of_the_id_or_the_name(home: Path) -> None:
    assert [r["repo_id"] for r in search(home, "ZOO/FT-0")] == sorted(CHILDREN[:10] + GRANDCHILDREN)
    assert [r["repo_id"] for r in search(home, "only")] == [LONE_ROOT]
    assert [r["repo_id"] for r in search(home, "<scr")] == [HOSTILE]
    assert search(home, "   ") == [] and search(home, "nothing-like-it") == []


def test_detail_and_overview(home: Path) -> None:
    d = model_detail(home, CHILDREN[0])
    assert d["query"]["children"] == sorted([*GRANDCHILDREN, HOSTILE]) and d["bytes_read"] == 1002
    assert d["relation"] == "finetune" and d["sketch"]["dim"] == 64 and d["sketch"]["mean_kurtosis"] == 4.0
    o = overview(home)
    assert o["largest_trees"][0]["root"] == ROOT and o["largest_trees"][0]["models"] == 34
    assert o["failures"] == [{"status": "failed", "reason": "HTTP 500 from the Hub", "models": 1, "example": FAILED}]
    assert o["recent"][0]["repo_id"] == FAILED


def _edges_part(home: Path, rows: list[dict]) -> None:
    """Edges rows as format v2 writes them (`relation`, `parents`), as one more part: older parts lack them."""
    spec = SPECS["edges"]
    extra = [pa.field("relation", pa.string()),
             pa.field("parents", pa.list_(pa.struct([("repo_id", pa.string()), ("weight", pa.float64())])))]
    schema = pa.schema([*spec.stored_schema, *(f for f in extra if f.name not in spec.stored_schema.names)])
    base = {"revision": SHA, "family": "vit", "cluster": ROOT, "root": ROOT, "distance": 0.03, "direction_score": 0.5,
            "confidence": 0.6, "updated_at": datetime(2024, 6, 1, tzinfo=UTC), "_seq": 999, "_deleted": False,
            "_hash": "x"}
    table = pa.Table.from_pylist([{**base, **r} for r in rows], schema=schema)
    pq.write_table(table, table_dir(home, "edges") / "part-000000000999-0000abcd.parquet")


def test_relations_merges_and_unindexed_parents_of_format_v2(tmp_path: Path) -> None:
    home = build_store(tmp_path / "home")
    _edges_part(home, [
        {"repo_id": GRANDCHILDREN[0], "parent": CHILDREN[0], "depth": 2, "relation": "merge",
         "parents": [{"repo_id": CHILDREN[0], "weight": 0.6}, {"repo_id": CHILDREN[1], "weight": 0.4}]},
        {"repo_id": "zoo/adapter", "parent": "ext/not-indexed", "depth": 1, "relation": "adapter",
         "parents": [{"repo_id": "ext/not-indexed", "weight": 1.0}]},
    ])
    by_id = {n.repo_id: n for n in family_of(home, ROOT).nodes}
    assert by_id[GRANDCHILDREN[0]].relation == "merge" and by_id[GRANDCHILDREN[1]].relation == "finetune"
    assert by_id[GRANDCHILDREN[0]].other_parents == ((CHILDREN[1], 0.4),)
    text = show_family(home, ROOT, max_children=40).splitlines()
    assert "│   ├── zoo/ft-00-a  merge  conf 0.60  d=0.03  2024-06-10  also from zoo/ft-01 (0.40)" in text
    assert "zoo/adapter  adapter  of ext/not-indexed  conf 0.60  d=0.03  date ?" in text  # a second top line
    dot = show_family(home, ROOT, fmt="dot", max_children=40)
    assert '"zoo/ft-01" -> "zoo/ft-00-a" [label="merge"' in dot


# --- the summary ------------------------------------------------------------------------------------


def test_text_tree_collapses_siblings_beyond_max_children(home: Path) -> None:
    text = show_family(home, GRANDCHILDREN[0], max_children=20)
    lines = text.splitlines()
    assert lines[0].startswith("vit tree of zoo/base: 34 models") and "10 collapsed" in lines[0]
    assert lines[1] == "zoo/base  root  2024-05-01"
    assert "└── … 10 more children (10 models)" in lines
    assert any(line.startswith("│   ├── zoo/ft-00-a  ◀  finetune  conf 0.60  d=0.03  2024-06-10") for line in lines)
    assert any(line.endswith(f"declared: {HOSTILE_CARD} (disagrees)") for line in lines)
    assert sum(line.startswith(("├── zoo/ft-", "└── zoo/ft-")) for line in lines) == 20  # the root's children


def test_terminal_output_escapes_control_characters(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with Store.open(home) as store:
        store.append("models", [ModelRecord("org/m", SHA, "vit", "indexed", datetime(2024, 1, 1, tzinfo=UTC),
                                            declared_base_model="\x1b[31mred\x1b[0m")])
        store.append("edges", [EdgeRecord("org/m", SHA, "vit", "org/m", "", "org/m", 0, 0.0, 0.0, 0.0,
                                          datetime(2024, 1, 1, tzinfo=UTC))])
    text = show_family(home, "org/m")
    assert "\x1b" not in text and "\\x1b[31mred" in text


def _tree(draw: st.DrawFn) -> Family:
    n = draw(st.integers(1, 120))
    parents = [""] + [f"m{draw(st.integers(0, i - 1)):03d}" for i in range(1, n)]
    depth: dict[str, int] = {}
    nodes = []
    for i, p in enumerate(parents):
        name = f"m{i:03d}"
        depth[name] = depth[p] + 1 if p else 0
        nodes.append(FamilyNode(name, p, depth[name], "finetune" if p else "root", 0.5, 0.1, None, "", None, SHA))
    focus = f"m{draw(st.integers(0, n - 1)):03d}"
    return Family(focus, "vit", "m000", "m000", n, None, tuple(nodes))


@settings(max_examples=150, deadline=None)
@given(st.composite(_tree)(), st.integers(1, 6), st.integers(1, 60))
def test_summary_shows_or_counts_every_model_exactly_once(family: Family, max_children: int, max_nodes: int) -> None:
    view = summarise(family, max_children=max_children, max_nodes=max_nodes)
    shown = [n.repo_id for n in view.nodes]
    assert len(shown) == len(set(shown)) and len(shown) + view.hidden == family.size
    by_id = {n.repo_id: n for n in family.nodes}
    here = family.focus
    while here:  # the model asked about and all its ancestors are drawn
        assert here in shown
        here = by_id[here].parent
    on_path = set(_ancestors(family.focus, by_id))
    for kids in view.children.values():
        assert len([k for k in kids if k not in on_path]) <= max_children
        assert set(kids) <= set(shown)


def _ancestors(repo: str, by_id: dict[str, FamilyNode]) -> list[str]:
    out = []
    while repo:
        out.append(repo)
        repo = by_id[repo].parent
    return out


# --- formats ----------------------------------------------------------------------------------------


def test_every_format_draws_the_same_models(home: Path) -> None:
    view = summarise(family_of(home, HOSTILE))
    doc = json.loads(show_family(home, HOSTILE, fmt="json"))
    assert [n["repo_id"] for n in doc["nodes"]] == [n.repo_id for n in view.nodes] and doc["shown"] == 24
    assert doc["collapsed"] == [{"id": f"+{ROOT}", "parent": ROOT, "count": 10, "models": 10,
                                 "label": "… 10 more children (10 models)"}]
    svg = ET.fromstring(render_svg(view))
    groups = svg.findall(".//{http://www.w3.org/2000/svg}g")
    assert sum(g.get("class") == "node" for g in groups) == 24 and sum(g.get("class") == "collapsed" for g in groups) == 1
    assert HOSTILE in {g.get("data-repo") for g in groups}  # escaped in the file, the name itself once parsed
    mermaid = show_family(home, HOSTILE, fmt="mermaid")
    assert mermaid.count("-->") == 23 and "<script>" not in mermaid and "#lt;script#gt;" in mermaid
    dot = show_family(home, HOSTILE, fmt="dot")
    assert dot.count(" -> ") == 23 + 1  # the lineage edges and the link to the "10 more" box
    assert dot.startswith("digraph family {") and dot.rstrip().endswith("}")


def test_html_is_self_contained_and_inert(home: Path) -> None:
    page = render_html(summarise(family_of(home, HOSTILE)))
    assert "<script src" not in page and "<link" not in page
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", page)  # nothing to fetch: it opens offline
    assert page.count("</script>") == 4  # the data, cytoscape.js, dagre, the viewer: the hostile name closes none
    data = page.split('<script type="application/json" id="family-data">', 1)[1].split("</script>", 1)[0]
    assert json.loads(data)["focus"] == HOSTILE and "<" not in data


def test_show_cli_formats_and_errors(home: Path) -> None:
    done = run_index("show", CHILDREN[1], "--home", str(home), "--format", "text", "--max-children", "5")
    assert done.returncode == 0, done.stderr
    assert "└── … 25 more children (25 models)" in done.stdout.splitlines()  # ft-01 asked, ft-00 the largest
    gone = run_index("show", "zoo/bsae", "--home", str(home))
    assert gone.returncode == 1 and gone.stdout == "" and len(gone.stderr.strip().splitlines()) == 1
    assert "did you mean zoo/base" in gone.stderr


def test_show_imports_no_web_framework_nor_torch(home: Path) -> None:
    code = ("import sys, cli\n"
            f"sys.argv = ['index', 'show', {ROOT!r}, '--home', {str(home)!r}, '--format', 'svg']\n"
            "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'faiss', 'starlette', 'uvicorn') if m in sys.modules), file=sys.stderr)\n")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert out.stderr.strip().endswith("[]"), out.stderr
    assert out.stdout.startswith("<svg")


# --- index web --------------------------------------------------------------------------------------


def test_web_api_mirrors_the_cli(home: Path) -> None:
    with running_web(home) as url:
        status, body, headers = get(url + "api/show/" + repo_path(HOSTILE))
        assert status == 200 and json.loads(body) == json.loads(run_index("show", HOSTILE, "--home", str(home),
                                                                         "--format", "json").stdout)
        assert "script-src 'self'" in headers["content-security-policy"]
        status, body, _ = get(url + "api/query/" + repo_path(CHILDREN[0]))
        assert status == 200 and json.loads(body) == json.loads(run_index("query", CHILDREN[0], "--home", str(home),
                                                                          "--json").stdout)
        status, body, _ = get(url + "api/stats")
        assert status == 200 and json.loads(body)["models"] == 36
        status, body, _ = get(url + "api/search?prefix=zoo/ft-2")
        assert [r["repo_id"] for r in json.loads(body)["results"]] == CHILDREN[20:30]
        status, body, _ = get(url + "api/show/" + repo_path(ROOT) + "?depth=1&max_children=3")
        doc = json.loads(body)
        assert (doc["shown"], doc["collapsed"][0]["count"], doc["depth_limit"]) == (4, 27, 1)


def test_web_unknown_repo_is_a_404_page_and_json_error(home: Path) -> None:
    with running_web(home) as url:
        status, body, _ = get(url + "api/query/zoo/bsae")
        assert status == 404 and "unknown model" in json.loads(body)["error"]
        status, body, _ = get(url + "api/show/zoo/bsae")
        assert status == 404 and set(json.loads(body)) == {"error"}
        status, body, _ = get(url + "family/zoo/bsae")
        assert status == 404 and "Unknown model" in body and 'href="/family/zoo/base"' in body
        status, body, _ = get(url + "api/show/zoo/base?depth=-1")
        assert status == 400 and "depth" in json.loads(body)["error"]


def test_web_escapes_names_and_cards_in_pages(home: Path) -> None:
    with running_web(home) as url:
        status, body, _ = get(url + "search?prefix=" + repo_path("<scr"))
        assert status == 200 and "<script>window" not in body
        assert "evil/&lt;script&gt;window.__pwned=1&lt;/script&gt;" in body
        status, body, _ = get(url + "family/" + repo_path(HOSTILE))
        assert status == 200 and "<script>window" not in body and body.count("<script") == 3  # ours, by src


def test_web_answers_only_loopback_host_names(home: Path) -> None:
    with running_web(home) as url:
        assert get(url, Host="attacker.example")[0] == 400  # a DNS-rebinding page cannot read the store
        assert get(url.replace("127.0.0.1", "localhost"))[0] == 200


def test_web_reads_while_a_crawl_writes(tmp_path: Path) -> None:
    home = build_store(tmp_path / "home")
    with running_web(home) as url, Store.open(home) as writer:  # the writer holds the store's lock throughout
        assert get(url + "api/stats")[0] == 200
        writer.append("models", [ModelRecord("late/arrival", SHA, "vit", "indexed", datetime(2024, 9, 1, tzinfo=UTC))])
        status, body, _ = get(url + "api/search?prefix=late")
        assert status == 200 and [r["repo_id"] for r in json.loads(body)["results"]] == ["late/arrival"]
        # a family answered (and kept) before the write is answered anew after it: the new part is seen
        assert json.loads(get(url + "api/show/" + LONE_ROOT)[1])["shown"] == 1
        writer.append("edges", [EdgeRecord("late/arrival", SHA, "vit", LONE_ROOT, LONE_ROOT, LONE_ROOT, 1, 0.1, 0.5,
                                           0.8, datetime(2024, 9, 1, tzinfo=UTC))])
        doc = json.loads(get(url + "api/show/" + LONE_ROOT)[1])
        assert [n["repo_id"] for n in doc["nodes"]] == [LONE_ROOT, "late/arrival"]


def test_web_start_up_errors_are_one_line(home: Path, tmp_path: Path) -> None:
    missing = run_index("web", "--home", str(tmp_path / "nothing"), "--port", "0", timeout=60)
    assert missing.returncode == 1 and "no index at" in missing.stderr and len(missing.stderr.splitlines()) == 1
    newer = tmp_path / "newer"
    newer.mkdir()
    write_format(newer, 99)
    refused = run_index("web", "--home", str(newer), "--port", "0", timeout=60)
    assert refused.returncode == 1 and "format version 99" in refused.stderr and len(refused.stderr.splitlines()) == 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = run_index("web", "--home", str(home), "--port", str(port), timeout=60)
    assert busy.returncode == 1 and "port is in use" in busy.stderr and len(busy.stderr.splitlines()) == 1
    assert "Traceback" not in missing.stderr + refused.stderr + busy.stderr
