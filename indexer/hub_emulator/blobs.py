"""File contents the emulator serves: files on disk and generated (virtual) files behind one interface.

The Hub names a file version by an ETag: the git blob sha1 of the content for files kept in git, the
sha256 of the content for files kept in LFS (safetensors, pickles, anything of 10 MiB or more). Hashing
a multi-GB file costs seconds, so digests are cached by (path, size, mtime_ns): a rewritten file gets a
new mtime and is hashed again, an untouched one never twice.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

logger = logging.getLogger(__name__)

# Suffixes the Hub's default .gitattributes routes to LFS; any other file of 10 MiB or more too.
LFS_SUFFIXES = frozenset(
    {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".npy", ".npz",
     ".pkl", ".pickle", ".tflite", ".ot", ".joblib", ".model", ".zip", ".gz", ".tar", ".arrow", ".parquet"}
)
LFS_MIN_SIZE = 10 * 1024 * 1024
_CHUNK = 1024 * 1024  # 1 MiB reads keep memory flat while hashing or streaming big files


class Blob(Protocol):
    """Bytes of one repo file, readable by range, with the digests the Hub reports for it."""

    size: int
    lfs: bool

    def read(self, offset: int, length: int) -> bytes: ...

    def git_sha1(self) -> str: ...

    def sha256(self) -> str: ...

    def fingerprint(self) -> str:
        """What goes into the repo sha for this file: cheap, and different when the content changes."""
        ...


def is_lfs(path: str, size: int) -> bool:
    return Path(path).suffix.lower() in LFS_SUFFIXES or size >= LFS_MIN_SIZE


def etag_of(blob: Blob) -> str:
    """The (unquoted) ETag the Hub sends: sha256 for LFS files, the git blob sha1 otherwise."""
    return blob.sha256() if blob.lfs else blob.git_sha1()


def lfs_pointer(blob: Blob) -> bytes:
    """The git-lfs pointer file that git stores in place of an LFS file (its sha1 is the blob id)."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{blob.sha256()}\nsize {blob.size}\n".encode()


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


ALWAYS_HASH_BELOW = 1024 * 1024  # files this small are re-hashed on every scan: cheap, and exact

_digest_cache: dict[tuple[str, int, int, int, int, str], str] = {}
_digest_lock = threading.Lock()


def _hash_file(path: Path, size: int, kind: str) -> str:
    digest = hashlib.sha1(b"blob %d\0" % size) if kind == "git" else hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _cached_digest(blob: DiskBlob, kind: str) -> str:
    if blob.size < ALWAYS_HASH_BELOW:
        return _hash_file(blob.path, blob.size, kind)
    # ctime and inode join (size, mtime_ns): a rewrite that restores the mtime, or a rename over the
    # file, still changes them, so a stale digest is never served.
    key = (str(blob.path), blob.size, blob.mtime_ns, blob.ctime_ns, blob.inode, kind)
    with _digest_lock:
        hit = _digest_cache.get(key)
    if hit is not None:
        return hit
    value = _hash_file(blob.path, blob.size, kind)
    with _digest_lock:
        _digest_cache[key] = value
    return value


@dataclass(frozen=True)
class DiskBlob:
    """A file under the served folder, as it was when the folder was scanned."""

    path: Path
    size: int
    mtime_ns: int
    lfs: bool
    ctime_ns: int = 0
    inode: int = 0

    def read(self, offset: int, length: int) -> bytes:
        # pread: no shared file position, so concurrent range reads of one file need no lock
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return os.pread(fd, max(0, length), offset)
        finally:
            os.close(fd)

    def git_sha1(self) -> str:
        return _cached_digest(self, "git")

    def sha256(self) -> str:
        return _cached_digest(self, "sha256")

    def fingerprint(self) -> str:
        # Small files: their content (survives a same-size rewrite inside one mtime tick).
        # LFS files: size + times + inode, because hashing GBs on every listing is not affordable.
        if self.lfs:
            return f"{self.size}:{self.mtime_ns}:{self.ctime_ns}:{self.inode}"
        return self.git_sha1()


def iter_chunks(blob: Blob, start: int, end: int, *, chunk: int = _CHUNK):
    """Yield the bytes [start, end) of a blob in chunks of at most `chunk` bytes."""
    pos = start
    while pos < end:
        n = min(chunk, end - pos)
        data = blob.read(pos, n)
        if not data:
            return  # the file shrank under us: stop, the caller sees a short body
        yield data
        pos += len(data)
