"""Blob storage behind one small interface. Local directory now; an S3 backend implements the same.

Blobs are written first and the database row second, so a row never points at a missing blob.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class StoredBlob:
    key: str
    size_bytes: int
    sha256: str


class Storage(Protocol):
    def put_file(self, key: str, src: Path) -> StoredBlob: ...
    def open(self, key: str) -> BinaryIO: ...
    def local_path(self, key: str) -> Path: ...
    def size(self, key: str) -> int: ...
    def delete(self, key: str) -> None: ...


def sha256_file(path: Path) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


class LocalStorage:
    """Blobs as files under ``root``; keys are relative paths such as ``models/mdl_x``."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        p = (self.root / key).resolve()
        if self.root.resolve() not in p.parents:
            raise ValueError(f"storage key escapes the root: {key!r}")
        return p

    def put_file(self, key: str, src: Path) -> StoredBlob:
        dst = self._path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".partial")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)  # atomic: readers never see half a blob
        digest, size = sha256_file(dst)
        return StoredBlob(key, size, digest)

    def open(self, key: str) -> BinaryIO:
        return open(self._path(key), "rb")

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


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


def get_storage() -> Storage:
    from app.settings import get_settings

    return LocalStorage(get_settings().blob_dir)
