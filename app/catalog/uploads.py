"""Receive an upload into a temporary file while hashing and enforcing the size limit."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from app.errors import PayloadTooLarge, Unprocessable

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Received:
    path: Path
    size_bytes: int
    sha256: str


@contextmanager
def receive(src: BinaryIO, tmp_dir: Path, limit: int) -> Iterator[Received]:
    """Copy ``src`` to a temp file under ``tmp_dir``; 413 past ``limit`` bytes; the file is removed on exit."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="upload-")
    path = Path(name)
    try:
        h, n = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(CHUNK):
                n += len(chunk)
                if n > limit:
                    raise PayloadTooLarge(f"the upload exceeds the limit of {limit} bytes (DISTILLERY_MAX_UPLOAD_BYTES)")
                h.update(chunk)
                out.write(chunk)
        if n == 0:
            raise Unprocessable("the uploaded file is empty", code="empty_file")
        yield Received(path, n, h.hexdigest())
    finally:
        path.unlink(missing_ok=True)
