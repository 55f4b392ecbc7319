"""store.tables / store.format / store.lock: real Parquet parts, real processes, real flock."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from errors import BadInputError, FormatVersionError, StoreError, StoreLockedError
from store.format import FORMAT_FILE, read_format, write_format
from store.schema import (
    spec_of,
    CandidateRecord,
    CrawlStateRecord,
    EdgeRecord,
    ModelRecord,
    SketchRecord,
)
from store.tables import Store, list_parts, read_records, read_table, table_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2024, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
SHA_A, SHA_B = "a" * 40, "b" * 40


def model(repo: str = "org/m", rev: str = SHA_A, **kw: object) -> ModelRecord:
    fields: dict[str, object] = {"family": "vit", "status": "indexed", "indexed_at": T0} | kw
    return ModelRecord(repo_id=repo, revision=rev, **fields)  # type: ignore[arg-type]


def one_of_each() -> dict[str, list[object]]:
    return {
        "models": [
            model(created_at=T0 - timedelta(days=3), last_modified=T0 - timedelta(days=1),
                  declared_base_model="org/base;org/other", declared_relation="merge", library="transformers",
                  pipeline_tag="image-classification", n_parameters=86_000_000, bytes_read=4096,
                  source="http://127.0.0.1:1"),
            model("org/bad", "local:abc123", status="skipped", reason="pickled weights only", family=""),
        ],
        "sketches": [SketchRecord("org/m", SHA_A, "vit", 2, [0.1, -2.5, 3.0], kurtosis=[1.5, 2.25],
                                  norms=[10.0, 11.0], layer_names=["l0", "l1"], stats='{"n": 3}')],
        "candidates": [CandidateRecord("vit", "org/base", "org/m", 0.25, -1.0, 0.3)],
        "edges": [EdgeRecord("org/m", SHA_A, "vit", "c0", "org/base", "org/base", 1, 0.25, 0.5, 0.9, T0),
                  EdgeRecord("org/base", SHA_B, "vit", "c0", "", "org/base", 0, 0.0, 0.0, 1.0, T0),
                  EdgeRecord("org/merged", SHA_A, "vit", "c0", "org/m", "org/base", 2, 0.1, 0.0, 0.8, T0,
                             relation="merge", parents=(("org/m", 0.7), ("org/base", 0.3)))],
        "crawl_state": [CrawlStateRecord("https://hub", T0, "org/m", T0, "run-1")],
    }


def test_every_table_round_trips_its_records(tmp_path: Path) -> None:
    rows = one_of_each()
    with Store.open(tmp_path) as store:
        for table, records in rows.items():
            assert store.append(table, records) == len(records)  # type: ignore[arg-type]
    for table, records in rows.items():
        key = lambda r: tuple(str(v) for v in r.__dict__.values())  # noqa: E731
        assert sorted(read_records(tmp_path, table), key=key) == sorted(records, key=key), table
    # non-UTC input comes back as the same instant
    cet = timezone(timedelta(hours=1))
    with Store.open(tmp_path) as store:
        store.append("models", [model("org/tz", indexed_at=datetime(2024, 1, 1, 13, tzinfo=cet))])
    (got,) = read_records(tmp_path, "models", repo_id="org/tz")
    assert got.indexed_at == datetime(2024, 1, 1, 12, tzinfo=UTC)


def test_mappings_are_accepted_and_validated(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        assert store.append("models", [dict(model().__dict__)]) == 1
        with pytest.raises(BadInputError, match="40-hex"):
            store.append("models", [model(rev="main")])
        with pytest.raises(BadInputError, match="timezone-aware"):
            store.append("models", [model(indexed_at=datetime(2024, 1, 1))])
        with pytest.raises(BadInputError, match="needs a reason"):
            store.append("models", [model(status="failed")])
        with pytest.raises(BadInputError, match="unexpected keyword"):
            store.append("models", [{"repo_id": "x", "nope": 1}])
        with pytest.raises(BadInputError, match="expected one of"):
            store.append("nope", [])  # type: ignore[arg-type]


def test_rewriting_an_unchanged_row_writes_nothing(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        assert store.append("models", [model()]) == 1
        assert store.append("models", [model()]) == 0
        # indexed_at is our own bookkeeping: re-indexing the same revision later is still a no-op
        assert store.append("models", [model(indexed_at=T0 + timedelta(days=9))]) == 0
        assert len(list_parts(tmp_path, "models")) == 1
        assert store.append("models", [model(library="timm")]) == 1
    # a fresh writer (new process state) sees the same: the hash is stored, not only in memory
    with Store.open(tmp_path) as store:
        assert store.append("models", [model(library="timm")]) == 0
    assert len(list_parts(tmp_path, "models")) == 2


def test_latest_version_of_a_key_wins(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        store.append("models", [model(library="one"), model("org/x")])
        store.append("models", [model(library="two")])
        store.append("models", [model(library="three"), model(library="four")])  # last in a batch wins
    got = {r.repo_id: r.library for r in read_records(tmp_path, "models")}  # type: ignore[attr-defined]
    assert got == {"org/m": "four", "org/x": ""}
    # a second revision of the same repo is a second key, not a replacement
    with Store.open(tmp_path) as store:
        store.append("models", [model(rev=SHA_B, library="rev-b")])
    assert read_table(tmp_path, "models").num_rows == 3


def test_tombstones_hide_and_a_rewrite_revives(tmp_path: Path) -> None:
    edge = one_of_each()["edges"][0]
    with Store.open(tmp_path) as store:
        store.append("edges", [edge])  # type: ignore[list-item]
        assert store.delete("edges", [("org/m",), ("org/never",)]) == 1
        assert store.delete("edges", [("org/m",)]) == 0  # already gone
        assert not store.contains("edges", ("org/m",))
        assert store.get("edges", ("org/m",)) is None
        assert read_table(tmp_path, "edges").num_rows == 0
        assert store.append("edges", [edge]) == 1  # type: ignore[list-item]
        assert store.get("edges", ("org/m",)) == edge


def _populate(store: Store, n_batches: int) -> None:
    for i in range(n_batches):
        store.append("models", [model(f"org/m{j}", library=f"v{i}") for j in range(i % 4, 8, 3)])
        if i % 5 == 4:
            store.delete("models", [(f"org/m{i % 8}", SHA_A)])


def test_compaction_reads_the_same_before_and_after(tmp_path: Path) -> None:
    with Store.open(tmp_path, compact_after=1000) as store:
        _populate(store, 20)
        before = read_table(tmp_path, "models")
        assert len(list_parts(tmp_path, "models")) > 20
        assert store.compact("models", force=True)
        assert len(list_parts(tmp_path, "models")) == 1
        assert read_table(tmp_path, "models").equals(before)
        _populate(store, 3)  # appends after a compaction still win
        after_more = read_table(tmp_path, "models")
    with Store.open(tmp_path, compact_after=2) as store:
        store.append("models", [model("org/new")])  # > 2 parts: compacts on its own
        assert len(list_parts(tmp_path, "models")) == 1
    expected = {r["repo_id"]: r["library"] for r in after_more.to_pylist()} | {"org/new": ""}
    assert {r["repo_id"]: r["library"] for r in read_table(tmp_path, "models").to_pylist()} == expected


def test_crash_between_compacted_part_and_old_part_removal_reads_the_same(tmp_path: Path) -> None:
    with Store.open(tmp_path, compact_after=1000) as store:
        _populate(store, 12)
    before = read_table(tmp_path, "models")
    folder = table_dir(tmp_path, "models")
    saved = tmp_path / "saved"
    shutil.copytree(folder, saved)
    with Store.open(tmp_path, compact_after=1000) as store:
        store.compact("models", force=True)
    # State 1: the new part is in place and not one old part was deleted yet.
    for old in sorted(saved.iterdir()):
        shutil.copy2(old, folder / old.name)
    assert read_table(tmp_path, "models").equals(before)


def test_crash_while_deleting_old_parts_never_revives_a_deleted_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store.open(tmp_path, compact_after=1000) as store:
        store.append("models", [model("org/gone")])
        store.append("models", [model("org/kept")])
        store.delete("models", [("org/gone", SHA_A)])
        before = read_table(tmp_path, "models")
        assert before.column("repo_id").to_pylist() == ["org/kept"]
        real_unlink = Path.unlink
        calls = {"n": 0}

        def dying_unlink(self: Path, missing_ok: bool = False) -> None:
            if self.name.startswith("part-"):
                calls["n"] += 1
                if calls["n"] == 2:  # the "process" dies after removing exactly one old part
                    raise KeyboardInterrupt("simulated kill")
            real_unlink(self, missing_ok=missing_ok)

        monkeypatch.setattr(Path, "unlink", dying_unlink)
        with pytest.raises(KeyboardInterrupt):
            store.compact("models", force=True)
        monkeypatch.setattr(Path, "unlink", real_unlink)
        assert len(list_parts(tmp_path, "models")) == 3  # new part + 2 of the 3 old ones
        assert read_table(tmp_path, "models").equals(before)


def test_temp_leftovers_are_ignored_then_cleaned(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        store.append("models", [model()])
    before = read_table(tmp_path, "models")
    junk = table_dir(tmp_path, "models") / ".tmp-deadbeef-part-000000000002-00000000.parquet"
    junk.write_bytes(b"PAR1 half a file")
    (tmp_path / "vectors").mkdir()
    faiss_junk = tmp_path / "vectors" / ".tmp-0123-vit.faiss"
    faiss_junk.write_bytes(b"IxM2 half")
    assert read_table(tmp_path, "models").equals(before)
    with Store.open(tmp_path):
        assert not junk.exists() and not faiss_junk.exists()


_KILLED_WRITER = textwrap.dedent("""
    import os, sys
    from datetime import datetime, UTC
    sys.path.insert(0, sys.argv[1])
    from store.tables import Store
    from store.schema import ModelRecord
    store = Store.open(sys.argv[2])
    stage = sys.argv[3]
    real = {"fsync": os.fsync, "replace": os.replace}
    def die(*args, **kwargs):
        os._exit(9)  # like SIGKILL: no cleanup, no finally, no lock release by us
    setattr(os, stage, die)
    store.append("models", [ModelRecord("org/late", "c" * 40, "vit", "indexed", datetime(2024, 1, 1, tzinfo=UTC))])
""")


@pytest.mark.parametrize("stage", ["fsync", "replace"])
def test_a_killed_writer_leaves_readers_and_the_next_writer_unaffected(tmp_path: Path, stage: str) -> None:
    with Store.open(tmp_path) as store:
        store.append("models", [model()])
    before = read_table(tmp_path, "models")
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(REPO_ROOT), str(tmp_path), stage],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 9, proc.stderr
    folder = table_dir(tmp_path, "models")
    assert [p.name for p in folder.iterdir() if p.name.startswith(".tmp-")]  # it died mid-write
    assert read_table(tmp_path, "models").equals(before)
    with Store.open(tmp_path) as store:  # the dead process's lock is gone
        assert not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]
        assert store.append("models", [model("org/late", "c" * 40)]) == 1


_HOLDER = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from store.tables import Store
    store = Store.open(sys.argv[2])
    print("locked", flush=True)
    sys.stdin.readline()
    store.close()
""")


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        store.append("models", [model()])
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(REPO_ROOT), str(tmp_path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLockedError, match=rf"locked by another process \(pid {holder.pid}\)"):
            Store.open(tmp_path)
        assert read_table(tmp_path, "models").num_rows == 1  # readers take no lock
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(timeout=30) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
    with Store.open(tmp_path):
        pass


def test_a_closed_store_refuses_writes(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.append("models", [model()])


def test_newer_format_is_refused_with_upgrade_advice(tmp_path: Path) -> None:
    with Store.open(tmp_path):
        pass
    assert json.loads((tmp_path / FORMAT_FILE).read_text()) == {"format": "model-graph-index", "version": 2}
    write_format(tmp_path, 7)
    with pytest.raises(FormatVersionError, match="format version 7.*up to version 2.*upgrade"):
        Store.open(tmp_path)
    (tmp_path / FORMAT_FILE).write_text("{}")
    with pytest.raises(StoreError, match="not a model-graph-index FORMAT"):
        Store.open(tmp_path)


def test_migrations_run_in_order_and_resume_after_a_crash(tmp_path: Path) -> None:
    write_format(tmp_path, 0)  # a fake v0 store: its models folder was called "model_rows"
    (tmp_path / "model_rows").mkdir()
    ran: list[int] = []

    def v0_to_v1(home: Path) -> None:
        ran.append(0)
        if (home / "model_rows").exists():  # idempotent: safe to run twice
            (home / "model_rows").rename(home / "renamed")

    def v1_to_v2(home: Path) -> None:
        ran.append(1)
        if len(ran) == 2:
            raise RuntimeError("crash in step 2")

    steps = {0: v0_to_v1, 1: v1_to_v2}
    with pytest.raises(RuntimeError):
        Store.open(tmp_path, target_version=2, migrations=steps)
    assert read_format(tmp_path) == 1 and (tmp_path / "renamed").is_dir()
    with Store.open(tmp_path, target_version=2, migrations=steps):
        pass
    assert ran == [0, 1, 1] and read_format(tmp_path) == 2
    write_format(tmp_path, 0)
    with pytest.raises(StoreError, match="no migration from format version 0"):
        Store.open(tmp_path, target_version=2, migrations={})


def test_sketch_vectors_keep_one_length_per_family(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        store.append("sketches", [SketchRecord("org/a", SHA_A, "vit", 1, [1.0, 2.0])])
    with Store.open(tmp_path) as store:  # the length is learnt from disk, not only from this session
        with pytest.raises(BadInputError, match="vector has 3 values but family 'vit' uses 2"):
            store.append("sketches", [SketchRecord("org/b", SHA_A, "vit", 1, [1.0, 2.0, 3.0])])
        assert store.append("sketches", [SketchRecord("org/b", SHA_A, "llama", 1, [1.0, 2.0, 3.0])]) == 1
        with pytest.raises(BadInputError, match="family 'gpt' uses 1"):  # a refused batch teaches nothing
            store.append("sketches", [SketchRecord("org/c", SHA_A, "gpt", 1, [1.0]),
                                      SketchRecord("org/d", SHA_A, "gpt", 1, [1.0, 2.0])])
        assert store.append("sketches", [SketchRecord("org/d", SHA_A, "gpt", 1, [1.0, 2.0])]) == 1


# --- property: any sequence of writes reads back as a dict with latest-wins ----------------------

_KEYS = [f"org/k{i}" for i in range(4)]
_op = st.one_of(
    st.tuples(st.just("put"), st.lists(st.tuples(st.sampled_from(_KEYS), st.integers(0, 3)), min_size=1, max_size=4)),
    st.tuples(st.just("del"), st.lists(st.sampled_from(_KEYS), min_size=1, max_size=2)),
    st.tuples(st.just("compact"), st.just([])),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_op, min_size=1, max_size=8))
def test_reading_equals_a_latest_wins_dict_model(ops: list[tuple[str, list[object]]]) -> None:
    expected: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp, Store.open(Path(tmp), compact_after=3) as store:
        for kind, args in ops:
            if kind == "put":
                batch = [model(k, library=f"v{v}") for k, v in args]  # type: ignore[misc]
                store.append("models", batch)
                expected.update({k: f"v{v}" for k, v in args})  # type: ignore[misc]
            elif kind == "del":
                store.delete("models", [(k, SHA_A) for k in args])
                for k in args:
                    expected.pop(k, None)  # type: ignore[call-overload]
            else:
                store.compact("models", force=True)
            got = {r["repo_id"]: r["library"] for r in read_table(Path(tmp), "models").to_pylist()}
            assert got == expected
        assert all(p.name.startswith("part-") for p in table_dir(Path(tmp), "models").iterdir())
        assert os.path.exists(Path(tmp) / FORMAT_FILE)


def test_the_light_layout_agrees_with_the_arrow_schemas() -> None:
    """store.layout (read side, no pyarrow) and store.schema (writer, pyarrow) describe the same tables."""
    import duckdb

    from store.layout import COLUMNS, KEYS, TABLES, empty_select

    con = duckdb.connect()
    for table in TABLES:
        spec = spec_of(table)
        assert KEYS[table] == spec.key
        assert [name for name, _ in COLUMNS[table]] == spec.stored_schema.names
        from_sql = con.sql(empty_select(table)).to_arrow_table().schema

        def plain(types: object) -> list[str]:  # the session time zone's name and list item names aside
            return [str(f.type).replace("Etc/UTC", "UTC").replace("<l: ", "<item: ").replace("<element: ", "<item: ") for f in types]  # type: ignore[attr-defined]

        assert plain(from_sql) == plain(spec.stored_schema), table


def test_query_imports_neither_pyarrow_nor_numpy() -> None:
    code = "import sys, store.query; print(sorted(m for m in ('pyarrow', 'numpy', 'pandas') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert out.stdout.strip() == "[]"
