"""Blob storage behind one small interface (:class:`Storage`): a local directory or an S3-compatible store.

``DISTILLERY_STORAGE_URL`` picks the backend: ``file:///abs/dir`` (default ``<data_dir>/blobs``) or
``s3://bucket/prefix`` (``DISTILLERY_S3_*`` settings, boto3's credential chain). Blobs are written first and
the database row second, so a row never points at a missing blob.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from app.storage.base import (CHUNK, BlobInfo, Storage, StorageUnavailable, StoredBlob, check_key, iter_range,
                              sha256_file)
from app.storage.local import LocalStorage

if TYPE_CHECKING:
    from app.settings import Settings

__all__ = ["CHUNK", "BlobInfo", "LocalStorage", "Storage", "StorageUnavailable", "StoredBlob", "check_key",
           "get_storage", "iter_range", "sha256_file", "storage_for"]


def file_url_path(url: str) -> Path:
    """``file:///abs/dir`` → ``/abs/dir``; anything else (a relative path, a host) is a ValueError."""
    parts = urlsplit(url)
    path = unquote(parts.path)
    if parts.scheme != "file" or parts.netloc not in ("", "localhost") or not path.startswith("/"):
        raise ValueError(f"not a file:///absolute/path URL: {url!r}")
    return Path(path)


@functools.lru_cache(maxsize=8)
def _s3(url: str, options) -> Storage:
    from app.storage.s3 import S3Storage

    return S3Storage(url, options)


def storage_for(settings: Settings) -> Storage:
    """The storage ``settings`` configure (an S3 backend is built once per URL and options)."""
    url = settings.resolved_storage_url
    if url.startswith("s3://"):
        from app.storage.s3 import S3Options

        return _s3(url, S3Options.from_settings(settings))
    return LocalStorage(file_url_path(url))


def get_storage() -> Storage:
    """The configured storage (a FastAPI dependency: it takes no arguments)."""
    from app.settings import get_settings

    return storage_for(get_settings())
