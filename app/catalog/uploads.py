"""Receive an upload (or a fetched dataset) into a temporary file while hashing and enforcing the size limit."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from app.errors import PayloadTooLarge, Unprocessable

CHUNK = 1024 * 1024
#: Temp files start with this (app.sweep removes those a killed process left behind).
TEMP_PREFIX = "upload-"


@dataclass(frozen=True)
class Received:
    path: Path
    size_bytes: int
    sha256: str


@contextmanager
def temp_file(tmp_dir: Path) -> Iterator[Path]:
    """A new empty file under ``tmp_dir``, removed on exit."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=tmp_dir, prefix=TEMP_PREFIX)
    os.close(fd)
    path = Path(name)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def write_chunks(chunks: Iterable[bytes], path: Path, limit: int, what: str = "the upload") -> Received:
    """Write ``chunks`` to ``path``, hashing them; 413 past ``limit`` bytes, 422 when there are none."""
    h, n = hashlib.sha256(), 0
    with open(path, "wb") as out:
        for chunk in chunks:
            n += len(chunk)
            if n > limit:
                raise PayloadTooLarge(f"{what} exceeds the limit of {limit} bytes (DISTILLERY_MAX_UPLOAD_BYTES)")
            h.update(chunk)
            out.write(chunk)
    if n == 0:
        raise Unprocessable(f"{'the uploaded file' if what == 'the upload' else what} is empty", code="empty_file")
    return Received(path, n, h.hexdigest())


@contextmanager
def receive(src: BinaryIO, tmp_dir: Path, limit: int) -> Iterator[Received]:
    """Copy ``src`` to a temp file under ``tmp_dir``; 413 past ``limit`` bytes; the file is removed on exit."""
    with temp_file(tmp_dir) as path:
        yield write_chunks(iter(lambda: src.read(CHUNK), b""), path, limit)
