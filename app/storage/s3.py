"""Blobs in an S3-compatible object store (AWS S3, MinIO, Ceph RGW, …) through boto3.

Credentials come from boto3's standard chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, the shared config files, instance and container roles), never from Distillery's settings, and
only the trusted processes (API, worker supervisor) hold them: executors get a scrubbed environment and no
network. Large blobs go up as multipart uploads and come down as parallel ranged GETs (boto3's managed
transfer; threshold and part size are settings); downloads through the API stream ranged GETs.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import urlsplit

from app.storage.base import CHUNK, BlobInfo, StorageUnavailable, StoredBlob, check_key, sha256_file

if TYPE_CHECKING:
    from app.settings import Settings

#: S3 error codes that mean "no such object" (HEAD answers a bare 404).
_MISSING = {"NoSuchKey", "NotFound", "404", "NoSuchBucket"}
_DELETE_BATCH = 1000  # DeleteObjects takes at most this many keys


@dataclass(frozen=True)
class S3Options:
    """How to reach the object store: endpoint, addressing, managed-transfer sizes (from the settings)."""

    endpoint_url: str | None = None
    public_endpoint_url: str | None = None
    addressing_style: str = "auto"
    multipart_threshold: int = 64 * 1024**2
    multipart_chunksize: int = 64 * 1024**2
    max_concurrency: int = 8
    connect_timeout: float = 10.0
    read_timeout: float = 60.0

    @classmethod
    def from_settings(cls, s: Settings) -> S3Options:
        return cls(endpoint_url=s.s3_endpoint_url, public_endpoint_url=s.s3_public_endpoint_url,
                   addressing_style=s.s3_addressing_style, multipart_threshold=s.s3_multipart_threshold_bytes,
                   multipart_chunksize=s.s3_multipart_chunk_bytes, max_concurrency=s.s3_max_concurrency)


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → (``bucket``, ``some/prefix/``); the prefix may be empty."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"not an s3://bucket[/prefix] URL: {url!r}")
    prefix = parts.path.strip("/")
    if prefix:
        check_key(prefix)
    return parts.netloc, f"{prefix}/" if prefix else ""


@functools.lru_cache(maxsize=16)
def _client(options: S3Options, endpoint_url: str | None, pid: int) -> Any:
    # One client per process and endpoint (boto3 clients are thread-safe, sessions are not; a client made
    # before a fork must not be used after it, hence the pid in the cache key).
    import boto3
    from botocore.config import Config

    config = Config(signature_version="s3v4", s3={"addressing_style": options.addressing_style},
                    retries={"mode": "standard", "max_attempts": 5}, connect_timeout=options.connect_timeout,
                    read_timeout=options.read_timeout, max_pool_connections=max(10, 2 * options.max_concurrency))
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


_client_lock = threading.Lock()


def s3_client(options: S3Options, *, public: bool = False) -> Any:
    """The process's boto3 S3 client for ``options`` (``public``: the one that signs URLs for clients)."""
    endpoint = (options.public_endpoint_url or options.endpoint_url) if public else options.endpoint_url
    with _client_lock:
        return _client(options, endpoint, os.getpid())


def is_missing(exc: BaseException) -> bool:
    """True for botocore's answer that the object (or its bucket) does not exist."""
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError) and str(exc.response.get("Error", {}).get("Code")) in _MISSING


def is_unavailable(exc: BaseException) -> bool:
    """True when the store could not be reached or failed on its side (connection, timeout, 5xx)."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    if isinstance(exc, (ConnectionError, HTTPClientError)):
        return True
    if isinstance(exc, ClientError):
        return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0) >= 500
    return False


@contextmanager
def _translated(what: str) -> Iterator[None]:
    """botocore's errors as the ones every Storage raises: FileNotFoundError, StorageUnavailable."""
    try:
        yield
    except Exception as exc:
        if is_missing(exc):
            raise FileNotFoundError(f"no blob {what}") from exc
        if is_unavailable(exc):
            raise StorageUnavailable(f"the object store did not answer for {what}: {exc}") from exc
        raise


class S3Storage:
    """Blobs as objects ``<prefix><key>`` in ``bucket``."""

    def __init__(self, url: str, options: S3Options):
        self.url = url
        self.bucket, self.prefix = parse_s3_url(url)
        self.options = options
        self._s3 = s3_client(options)

    @functools.cached_property
    def _transfer(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=self.options.multipart_threshold,
                              multipart_chunksize=self.options.multipart_chunksize,
                              max_concurrency=self.options.max_concurrency)

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _where(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._name(key)}"

    def put_file(self, key: str, src: Path) -> StoredBlob:
        digest, size = sha256_file(src)
        with _translated(self._where(key)):
            # Multipart above the threshold; the object appears whole when the upload completes.
            self._s3.upload_file(str(src), self.bucket, self._name(key), Config=self._transfer,
                                 ExtraArgs={"Metadata": {"sha256": digest}})
        return StoredBlob(key, size, digest)

    def get_file(self, key: str, dst: Path) -> None:
        with _translated(self._where(key)):
            self._s3.download_file(self.bucket, self._name(key), str(dst), Config=self._transfer)

    def open(self, key: str) -> BinaryIO:
        with _translated(self._where(key)):
            return self._s3.get_object(Bucket=self.bucket, Key=self._name(key))["Body"]

    def read_range(self, key: str, start: int, length: int) -> Iterator[bytes]:
        if length <= 0:
            return iter(())
        with _translated(self._where(key)):
            body = self._s3.get_object(Bucket=self.bucket, Key=self._name(key),
                                       Range=f"bytes={start}-{start + length - 1}")["Body"]
        return _chunks(body)

    def local_path(self, key: str) -> None:
        return None

    def _head(self, key: str) -> dict:
        with _translated(self._where(key)):
            return self._s3.head_object(Bucket=self.bucket, Key=self._name(key))

    def size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except FileNotFoundError:
            return False
        return True

    def list(self, folder: str) -> Iterator[BlobInfo]:
        start = self._name(folder) + "/"
        with _translated(f"s3://{self.bucket}/{start}"):
            for page in self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
                for obj in page.get("Contents", []):
                    yield BlobInfo(obj["Key"][len(self.prefix):], int(obj["Size"]), obj["LastModified"].timestamp())

    def delete(self, key: str) -> None:
        with _translated(self._where(key)):
            self._s3.delete_object(Bucket=self.bucket, Key=self._name(key))

    def delete_folder(self, folder: str) -> None:
        keys = [self._name(b.key) for b in self.list(folder)]
        for i in range(0, len(keys), _DELETE_BATCH):
            batch = keys[i:i + _DELETE_BATCH]
            with _translated(f"s3://{self.bucket}/{self._name(folder)}/"):
                out = self._s3.delete_objects(Bucket=self.bucket,
                                              Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
            if out.get("Errors"):
                first = out["Errors"][0]
                raise StorageUnavailable(f"could not delete {len(out['Errors'])} blobs under {folder}: "
                                         f"{first.get('Key')}: {first.get('Code')} {first.get('Message')}")

    def presigned_url(self, key: str, *, expires_seconds: int, filename: str, media_type: str) -> str:
        # Signed for the endpoint clients reach (DISTILLERY_S3_PUBLIC_ENDPOINT_URL), which may differ from ours.
        return s3_client(self.options, public=True).generate_presigned_url(
            "get_object", ExpiresIn=expires_seconds,
            Params={"Bucket": self.bucket, "Key": self._name(key), "ResponseContentType": media_type,
                    "ResponseContentDisposition": f'attachment; filename="{filename}"'})


def _chunks(body: Any) -> Iterator[bytes]:
    try:
        with _translated("a ranged read"):
            yield from body.iter_chunks(CHUNK)
    finally:
        body.close()
