"""The one interface every blob goes through (models, datasets, artifacts, checkpoints), and helpers it shares.

Keys are relative, ``/``-separated paths such as ``models/mdl_x`` or ``checkpoints/job_x/<token>/checkpoint.pt``.
A *folder* is a key prefix without its trailing slash (``checkpoints/job_x``): :meth:`Storage.list` and
:meth:`Storage.delete_folder` take one. Blobs are written first and the database row second, so a row never
points at a missing blob.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from app.errors import ServiceUnavailable

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class StoredBlob:
    """What :meth:`Storage.put_file` wrote: its key, size and sha256 (hex)."""

    key: str
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class BlobInfo:
    """One blob found by :meth:`Storage.list`: its key, size and last write (POSIX seconds)."""

    key: str
    size_bytes: int
    modified: float


class StorageUnavailable(ServiceUnavailable):
    """The object store cannot be reached now (connection refused, timed out, 5xx): not the blob's fault.
    A request that meets it answers 503 ``storage_unavailable`` with ``Retry-After``."""

    code = "storage_unavailable"
    retry_after = 5


class Storage(Protocol):
    """A blob store. A missing blob raises :class:`FileNotFoundError` from every reading method."""

    #: ``file:///…`` or ``s3://bucket/prefix``: where the blobs live (for logs and messages).
    url: str

    def put_file(self, key: str, src: Path) -> StoredBlob:
        """Store the local file ``src`` under ``key`` (replacing any blob there). Readers see the old blob or
        the whole new one, never part of it."""
        ...

    def get_file(self, key: str, dst: Path) -> None:
        """Write the blob at ``key`` to the local path ``dst`` (created or replaced)."""
        ...

    def open(self, key: str) -> BinaryIO:
        """The blob as a readable stream (read it in chunks; close it)."""
        ...

    def read_range(self, key: str, start: int, length: int) -> Iterator[bytes]:
        """``length`` bytes of the blob from offset ``start``, in chunks of at most :data:`CHUNK`. The blob is
        looked up when this is called (a missing one raises here), its bytes are read as the iterator runs."""
        ...

    def local_path(self, key: str) -> Path | None:
        """The blob as a file on this machine when the backend keeps it as one (read it in place, never write
        to it); None when it must be downloaded (:meth:`get_file`)."""
        ...

    def size(self, key: str) -> int: ...

    def exists(self, key: str) -> bool: ...

    def list(self, folder: str) -> Iterator[BlobInfo]:
        """Every blob whose key starts with ``folder + "/"``, in no particular order."""
        ...

    def delete(self, key: str) -> None:
        """Remove the blob; a missing one is no error."""
        ...

    def delete_folder(self, folder: str) -> None:
        """Remove every blob under ``folder`` (see :meth:`list`); an empty or missing folder is no error."""
        ...

    def presigned_url(self, key: str, *, expires_seconds: int, filename: str, media_type: str) -> str | None:
        """A URL that serves the blob to whoever holds it for ``expires_seconds`` (as an attachment named
        ``filename``), or None when the backend has no such URLs (local files)."""
        ...


def check_key(key: str) -> str:
    """``key`` when it is a clean relative key (no empty, ``.`` or ``..`` segment, no NUL, no backslash)."""
    parts = key.split("/")
    if (not key or key.startswith("/") or "\x00" in key or "\\" in key
            or any(p in ("", ".", "..") for p in parts)):
        raise ValueError(f"invalid storage key: {key!r}")
    return key


def sha256_file(path: Path) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of a local file, read in chunks."""
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def iter_range(f: BinaryIO, start: int, length: int) -> Iterator[bytes]:
    """Yield ``length`` bytes of ``f`` from ``start`` in chunks, then close it."""
    try:
        f.seek(start)
        left = length
        while left > 0:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                break
            left -= len(chunk)
            yield chunk
    finally:
        f.close()
