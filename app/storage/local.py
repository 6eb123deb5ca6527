"""Blobs as files under one directory (the default: ``<data_dir>/blobs``)."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from app.storage.base import BlobInfo, StoredBlob, check_key, iter_range, sha256_file

#: A blob being written; renamed onto its key once complete (the sweep removes stale ones).
PARTIAL_SUFFIX = ".partial"


class LocalStorage:
    """Blobs as files under ``root``; keys are relative paths such as ``models/mdl_x``."""

    def __init__(self, root: Path):
        self.root = root
        self.url = root.resolve().as_uri()
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        p = (self.root / check_key(key)).resolve()
        if self.root.resolve() not in p.parents:
            raise ValueError(f"storage key escapes the root: {key!r}")
        return p

    def put_file(self, key: str, src: Path) -> StoredBlob:
        dst = self._path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + PARTIAL_SUFFIX)
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)  # atomic: readers never see half a blob
        digest, size = sha256_file(dst)
        return StoredBlob(key, size, digest)

    def get_file(self, key: str, dst: Path) -> None:
        shutil.copyfile(self._path(key), dst)

    def open(self, key: str) -> BinaryIO:
        return open(self._path(key), "rb")

    def read_range(self, key: str, start: int, length: int) -> Iterator[bytes]:
        return iter_range(self.open(key), start, length)  # opened now: a missing blob raises here

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, folder: str) -> Iterator[BlobInfo]:
        top = self._path(folder)
        if top.is_symlink() or not top.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
            dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
            for name in filenames:
                if name.endswith(PARTIAL_SUFFIX):
                    continue
                path = Path(dirpath) / name
                try:
                    st = path.lstat()
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    yield BlobInfo(path.relative_to(self.root.resolve()).as_posix(), st.st_size, st.st_mtime)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_folder(self, folder: str) -> None:
        top = self._path(folder)
        if top.is_dir() and not top.is_symlink():
            shutil.rmtree(top, ignore_errors=True)
        # Empty parents go too (checkpoints/<job> once its last attempt is gone), never the root itself.
        root, parent = self.root.resolve(), top.parent
        while parent != root and root in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def presigned_url(self, key: str, *, expires_seconds: int, filename: str, media_type: str) -> None:
        return None
