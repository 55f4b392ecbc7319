"""The repos the emulator serves: a folder `DIR/<org>/<name>/...files` plus registered virtual repos.

`DIR/hub.json` (optional) adds what a folder cannot say, per repo:
    {"version": 1, "repos": {"org/name": {"createdAt": "2024-01-02T03:04:05.000Z", "gated": false,
                                         "private": false, "downloads": 0, "likes": 0}}}
`gated` is false, true (= "auto"), "auto" or "manual". A repo missing from hub.json gets createdAt from
the oldest mtime of its files (adding a file later does not move it), lastModified from the newest.

A repo's entry may also list its discussions and pull requests, as the Hub's discussions API gives them:
    "discussions": [{"num": 1, "title": "Adding `safetensors` variant of this model", "author": "SFconvertbot",
                     "status": "open", "isPullRequest": true, "createdAt": "...", "stale": false}]
A pull request's revision `refs/pr/<num>` holds the repo's files with `DIR/<org>/<name>/.refs/pr/<num>/`
laid over them (the Hub's PR ref is main plus the PR's commits). Its parent commit is main's current one,
unless `stale` says main moved on after the PR was opened (then its parent is an older commit).

The folder is rescanned on every request that needs it (a listing scans everything, a file request
only its repo), so repos added or changed while serving show up at once. A repo's sha is the sha1 of
its file list (path, size, and the content digest for small files, or size + mtime_ns + ctime_ns +
inode for LFS files): it changes whenever a file is added, removed or rewritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from errors import BadInputError
from indexer.hub_emulator.blobs import Blob, DiskBlob, is_lfs
from indexer.hub_emulator.virtual import Lineage, StepKind, VirtualRepo, layout_named

logger = logging.getLogger(__name__)

HUB_JSON_VERSION = 1
# Directories that are never repo content (git internals, the client's local-dir cache).
_SKIP_DIRS = frozenset({".git", ".cache", ".huggingface", "__pycache__", ".refs"})  # .refs: PR revisions
PULL_REQUEST_DIR = ".refs/pr"
_DISCUSSION_STATUS = ("open", "closed", "merged", "draft")
# Files being written by someone else right now: never half-serve them.
_SKIP_SUFFIXES = (".tmp", ".incomplete", ".lock", ".partial")

Gated = Literal["auto", "manual", False]


@dataclass(frozen=True)
class Discussion:
    """One discussion or pull request of a repo (hub.json `discussions`)."""

    num: int
    title: str
    author: str
    status: str = "open"
    is_pull_request: bool = True
    created_at: str | None = None
    stale: bool = False  # a PR opened on an older commit of main

    @property
    def ref(self) -> str:
        return f"refs/pr/{self.num}"


@dataclass(frozen=True)
class RepoMeta:
    """What hub.json says about one repo (everything optional)."""

    created_at: str | None = None
    gated: Gated = False
    private: bool = False
    downloads: int = 0
    likes: int = 0
    discussions: tuple[Discussion, ...] = ()


@dataclass(frozen=True)
class Repo:
    """One repo as it is right now. `files` maps sorted relative posix paths to their contents. `refs`
    holds its pull requests' revisions (`refs/pr/<num>`), each a Repo with its discussion and the commit
    it sits on."""

    repo_id: str
    files: Mapping[str, Blob]
    sha: str
    created_at: str
    last_modified: str
    meta: RepoMeta = field(default_factory=RepoMeta)
    refs: Mapping[str, Repo] = field(default_factory=dict)
    pull: Discussion | None = None  # a PR's revision: its discussion,
    parent: str = ""  # and the commit it sits on

    @property
    def author(self) -> str:
        return self.repo_id.split("/", 1)[0]

    def at(self, revision: str) -> Repo | None:
        """The repo at `revision` ("main", its sha, a PR's `refs/pr/<num>` or that PR's sha); None if unknown."""
        if revision in ("main", self.sha):
            return self
        return self.refs.get(revision) or next((r for r in self.refs.values() if r.sha == revision), None)


def iso_ms(ns: int) -> str:
    """Nanoseconds since the epoch -> the Hub's timestamp format, e.g. 2024-01-02T03:04:05.000Z."""
    moment = datetime.fromtimestamp(ns // 1_000_000 / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def check_timestamp(value: str, *, thing: str) -> str:
    try:
        datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError:
        raise BadInputError(thing, f"createdAt {value!r} is not like 2024-01-02T03:04:05.000Z") from None
    return value


def check_repo_id(repo_id: str) -> str:
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts) or any(p in (".", "..") or p.startswith(".") for p in parts):
        raise BadInputError(f"repo id {repo_id!r}", "must be exactly 'org/name'")
    return repo_id


def _parse_gated(value: Any, where: str) -> Gated:
    if value is True:
        return "auto"
    if value in (False, None):
        return False
    if value in ("auto", "manual"):
        return value
    raise BadInputError(where, f"gated must be false, true, 'auto' or 'manual', not {value!r}")


def load_hub_json(path: Path) -> dict[str, RepoMeta]:
    """Parse DIR/hub.json; a missing file means no overrides. Refuses a newer format version."""
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(str(path), f"cannot read hub.json ({exc})") from exc
    # A flat {"org/name": {...}} map, or any other shape, is refused: read as "no overrides" it would date
    # every repo by its files' mtimes, a silently wrong upload time (the worst outcome for lineage).
    if not isinstance(doc, dict) or not isinstance(doc.get("repos"), dict) or "version" not in doc or set(doc) - {"version", "repos"}:
        raise BadInputError(str(path), 'not in the documented form {"version": 1, "repos": {"org/name": {"createdAt": ...}}}')
    if doc.get("version") != HUB_JSON_VERSION:
        raise BadInputError(str(path), f"version {doc.get('version')!r} is not {HUB_JSON_VERSION}; upgrade the tool")
    metas: dict[str, RepoMeta] = {}
    for repo_id, raw in sorted(doc.get("repos", {}).items()):
        where = f"{path} [{repo_id}]"
        if not isinstance(raw, dict):
            raise BadInputError(where, "each repo entry must be an object")
        created = raw.get("createdAt")
        metas[repo_id] = RepoMeta(
            created_at=check_timestamp(created, thing=where) if created is not None else None,
            gated=_parse_gated(raw.get("gated", False), where),
            private=bool(raw.get("private", False)),
            downloads=int(raw.get("downloads", 0)),
            likes=int(raw.get("likes", 0)),
            discussions=_parse_discussions(raw.get("discussions", []), where),
        )
    return metas


def _parse_discussions(value: Any, where: str) -> tuple[Discussion, ...]:
    if not isinstance(value, list) or not all(isinstance(d, dict) for d in value):
        raise BadInputError(where, "discussions must be a list of objects")
    found = []
    for raw in value:
        num, title, author = raw.get("num"), raw.get("title"), raw.get("author")
        status = raw.get("status", "open")
        if type(num) is not int or num < 1 or not isinstance(title, str) or not isinstance(author, str) or not author:
            raise BadInputError(where, f"a discussion needs num (an integer >= 1), title and author: {raw!r}")
        if status not in _DISCUSSION_STATUS:
            raise BadInputError(where, f"discussion {num}: status {status!r} is not one of {', '.join(_DISCUSSION_STATUS)}")
        created = raw.get("createdAt")
        found.append(Discussion(num, title, author, status, bool(raw.get("isPullRequest", True)),
                                check_timestamp(created, thing=where) if created is not None else None,
                                bool(raw.get("stale", False))))
    nums = [d.num for d in found]
    if len(set(nums)) != len(nums):
        raise BadInputError(where, f"discussion numbers repeat: {sorted(nums)}")
    return tuple(sorted(found, key=lambda d: d.num))


def _walk_files(repo_dir: Path) -> list[tuple[str, os.stat_result, Path]]:
    """(relative posix path, stat, absolute path) of every servable file, sorted by path."""
    found: list[tuple[str, os.stat_result, Path]] = []
    for dirpath, dirnames, filenames in os.walk(repo_dir):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in filenames:
            if name.endswith(_SKIP_SUFFIXES):
                continue
            full = Path(dirpath) / name
            try:
                st = full.stat()  # follows symlinks: a zoo may link shared weights
            except OSError:
                continue  # vanished between listing and stat
            if not full.is_file():
                continue
            found.append((full.relative_to(repo_dir).as_posix(), st, full))
    return sorted(found, key=lambda item: item[0])  # deterministic


def _blobs(walked: list[tuple[str, os.stat_result, Path]]) -> dict[str, Blob]:
    """The walked files as blobs, by relative path."""
    return {rel: DiskBlob(full, st.st_size, st.st_mtime_ns, is_lfs(rel, st.st_size), st.st_ctime_ns, st.st_ino)
            for rel, st, full in walked}


def repo_sha(repo_id: str, files: Mapping[str, Blob]) -> str:
    lines = [f"{path}\0{blob.size}\0{blob.fingerprint()}" for path, blob in files.items()]
    return hashlib.sha1((repo_id + "\n" + "\n".join(lines)).encode()).hexdigest()


class RepoSource:
    """Scans the served folder (thread-safe) and holds the registered virtual repos."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._virtual: dict[str, VirtualRepo] = {}
        self._lock = threading.Lock()

    # -- virtual repos -----------------------------------------------------------------------------

    def add_virtual(
        self, repo_id: str, *, layout: str, seed: int, created_at: str, parent: str | None = None,
        delta: float = 0.1, kind: StepKind = "full",
    ) -> None:
        check_repo_id(repo_id)
        check_timestamp(created_at, thing=f"virtual repo {repo_id}")
        with self._lock:
            if parent is None:
                lineage = Lineage(layout_named(layout), seed)
            else:
                above = self._virtual.get(parent)
                if above is None:
                    raise BadInputError(f"virtual repo {repo_id}", f"parent {parent!r} must be registered first")
                if above.lineage.layout.name != layout:
                    raise BadInputError(f"virtual repo {repo_id}", f"layout {layout!r} differs from parent's")
                lineage = above.lineage.child(seed, delta, kind)
            self._virtual[repo_id] = VirtualRepo(repo_id, lineage, created_at=created_at, parent=parent)

    def _virtual_repo(self, repo_id: str, metas: Mapping[str, RepoMeta]) -> Repo:
        vr = self._virtual[repo_id]
        meta = metas.get(repo_id, RepoMeta())
        created = meta.created_at or vr.created_at
        return Repo(repo_id, vr.files, vr.sha, created, created, meta)

    # -- the folder --------------------------------------------------------------------------------

    def _metas(self) -> dict[str, RepoMeta]:
        return load_hub_json(self.root / "hub.json")

    def _disk_repo(self, repo_id: str, repo_dir: Path, metas: Mapping[str, RepoMeta]) -> Repo | None:
        walked = _walk_files(repo_dir)
        if not walked:
            return None  # an empty folder is not a repo yet (someone is about to fill it)
        files = _blobs(walked)
        mtimes = [st.st_mtime_ns for _, st, _ in walked]
        meta = metas.get(repo_id, RepoMeta())
        created = meta.created_at or iso_ms(min(mtimes))
        main = Repo(repo_id, files, repo_sha(repo_id, files), created, iso_ms(max(mtimes)), meta)
        refs = {d.ref: _pull_request(main, d, repo_dir) for d in meta.discussions if d.is_pull_request}
        return replace(main, refs=refs)

    def get(self, repo_id: str) -> Repo | None:
        """One repo, scanned now; None when it does not exist (or the id is malformed)."""
        try:
            check_repo_id(repo_id)
        except BadInputError:
            return None
        metas = self._metas()
        with self._lock:
            if repo_id in self._virtual:
                return self._virtual_repo(repo_id, metas)
        repo_dir = self.root / repo_id
        if not repo_dir.is_dir() or repo_dir.is_symlink() and not _inside(repo_dir, self.root):
            return None
        return self._disk_repo(repo_id, repo_dir, metas)

    def all(self) -> list[Repo]:
        """Every repo, scanned now, sorted by id."""
        metas = self._metas()
        repos: dict[str, Repo] = {}
        for org in _subdirs(self.root):
            for name in _subdirs(org):
                repo = self._disk_repo(f"{org.name}/{name.name}", name, metas)
                if repo is not None:
                    repos[repo.repo_id] = repo
        with self._lock:
            virtual_ids = list(self._virtual)
        for repo_id in virtual_ids:
            repos[repo_id] = self._virtual_repo(repo_id, metas)  # a virtual repo hides a folder of that name
        return [repos[k] for k in sorted(repos)]


def _pull_request(main: Repo, discussion: Discussion, repo_dir: Path) -> Repo:
    """A PR's revision: main's files with the PR folder's laid over them, on main's commit (or, when
    `stale`, on an older one), its sha from both."""
    added = _blobs(_walk_files(repo_dir / PULL_REQUEST_DIR / str(discussion.num)))
    files = dict(sorted({**main.files, **added}.items()))
    parent = hashlib.sha1(f"before {main.sha}".encode()).hexdigest() if discussion.stale else main.sha
    sha = hashlib.sha1(f"{parent}\n{discussion.ref}\n{repo_sha(main.repo_id, files)}".encode()).hexdigest()
    changed = discussion.created_at or main.last_modified
    return Repo(main.repo_id, files, sha, main.created_at, changed, main.meta, pull=discussion, parent=parent)


def _subdirs(path: Path) -> list[Path]:
    try:
        entries = sorted(path.iterdir())
    except OSError:
        return []
    return [e for e in entries if e.is_dir() and not e.name.startswith((".", "_")) and e.name not in _SKIP_DIRS]


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())
