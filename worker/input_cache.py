"""A job's inputs (teachers, datasets, uploaded students) as local files for the executor's read-only binds.

Local storage keeps every blob as a file: it is read in place, nothing is copied. A remote store (S3) is read
through a cache on this machine, ``DISTILLERY_BLOB_CACHE_DIR`` (default ``<data_dir>/cache/blobs``): one file
per sha256, downloaded once, checked against the sha256 the API recorded at upload before it is used, and
kept for the next job that reads the same bytes (the same teacher is not downloaded for every job). The
cache is trimmed to ``DISTILLERY_BLOB_CACHE_BYTES``, least recently used first.

Several worker processes on one host may share the cache directory:

* a download holds an exclusive lock on ``.locks/<sha256>``, so two workers fetch the same blob once;
* a job *pins* each input it uses with a shared ``flock`` on the cached file for as long as its executor
  runs; trimming takes an entry only when it can lock it exclusively, so an input in use is never removed
  (the pin is checked to still name the linked file, since a trim may have unlinked it just before).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from app.storage import Storage, sha256_file

log = logging.getLogger("distillery.worker")

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
PARTIAL_SUFFIX = ".partial"


class InputCorrupt(Exception):
    """A downloaded blob does not match the sha256 recorded when it was uploaded."""


@dataclass
class CacheStats:
    """What one :meth:`InputCache.session` did: blobs downloaded (and their bytes), blobs found cached."""

    downloaded: int = 0
    downloaded_bytes: int = 0
    cached: int = 0
    seconds: float = 0.0
    keys: list[str] = field(default_factory=list)


class InputCache:
    """Cached local copies of remote blobs, by sha256, under ``root``, trimmed to ``max_bytes``."""

    def __init__(self, root: Path, max_bytes: int, stale_partial_seconds: float = 3600.0):
        self.root, self.max_bytes, self.stale_partial_seconds = root, max_bytes, stale_partial_seconds

    @contextmanager
    def session(self) -> Iterator[CacheSession]:
        """Pins taken inside are released on exit (after the executor that reads the files has ended)."""
        with ExitStack() as pins:
            yield CacheSession(self, pins)

    # ---- internals shared with CacheSession --------------------------------------------------------
    def entry(self, sha256: str) -> Path:
        if not _SHA256.match(sha256):
            raise ValueError(f"not a sha256 digest: {sha256!r}")
        return self.root / sha256

    @contextmanager
    def download_lock(self, sha256: str) -> Iterator[None]:
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / sha256, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def pin(self, path: Path, pins: ExitStack) -> bool:
        """Hold a shared lock on the cached file ``path``; False when it is not (or no longer) there."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            linked = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            linked = False
        if not linked:  # trimmed between the open and the lock: the name now means nothing (or a newer file)
            os.close(fd)
            return False
        pins.callback(os.close, fd)
        os.utime(path)  # the mtime is the recency the trim goes by
        return True

    def trim(self) -> None:
        """Remove least recently used entries that no job pins until the cache fits ``max_bytes``; and
        downloads left half-done by a killed worker."""
        entries, now = [], time.time()
        for e in os.scandir(self.root):
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if e.name.endswith(PARTIAL_SUFFIX) and now - st.st_mtime > self.stale_partial_seconds:
                Path(e.path).unlink(missing_ok=True)
            elif _SHA256.match(e.name) and e.is_file(follow_symlinks=False):
                entries.append((st.st_mtime, st.st_size, Path(e.path)))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if self._remove_unpinned(path):
                total -= size
                log.info("input cache: removed %s (%d bytes) to stay under %d bytes", path.name, size, self.max_bytes)

    @staticmethod
    def _remove_unpinned(path: Path) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a running job reads it
        else:
            path.unlink(missing_ok=True)  # under the lock: a pin that follows finds the name gone and retries
            return True
        finally:
            os.close(fd)


class CacheSession:
    """Resolves blobs to local files for one job and keeps each one pinned until the session ends."""

    def __init__(self, cache: InputCache, pins: ExitStack):
        self.cache, self.pins = cache, pins
        self.stats = CacheStats()

    def path(self, storage: Storage, key: str, sha256: str) -> Path:
        """A local file holding the blob ``key`` whose content has digest ``sha256``.

        Raises FileNotFoundError when the blob is gone from storage, :class:`InputCorrupt` when its bytes do not
        match ``sha256``, :class:`app.storage.StorageUnavailable` when the store cannot be reached."""
        local = storage.local_path(key)
        if local is not None:
            return local
        self.cache.root.mkdir(parents=True, exist_ok=True)
        entry = self.cache.entry(sha256)
        for _ in range(3):  # a trim by another worker can take the entry between two steps; try again
            if self.cache.pin(entry, self.pins):
                self.stats.cached += 1
                return entry
            with self.cache.download_lock(sha256):
                if entry.exists():  # another worker finished downloading it while we waited for the lock
                    continue
                self._download(storage, key, sha256, entry)
            if self.cache.pin(entry, self.pins):
                self.stats.downloaded += 1
                self.cache.trim()  # after the pin: the new entry itself is never trimmed away
                return entry
        raise RuntimeError(f"the input cache entry {entry} kept disappearing (cache too small for the inputs?)")

    def _download(self, storage: Storage, key: str, sha256: str, entry: Path) -> None:
        began = time.monotonic()
        tmp = entry.with_name(f".{sha256}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")
        try:
            storage.get_file(key, tmp)
            digest, size = sha256_file(tmp)
            if digest != sha256:
                raise InputCorrupt(f"{storage.url} blob {key} has sha256 {digest}, not the {sha256} recorded at "
                                   "upload: the stored bytes changed")
            os.chmod(tmp, 0o444)
            os.replace(tmp, entry)
        finally:
            tmp.unlink(missing_ok=True)
        self.stats.downloaded_bytes += size
        self.stats.seconds += time.monotonic() - began
        self.stats.keys.append(key)
        log.info("input cache: downloaded %s (%d bytes) in %.1f s", key, size, time.monotonic() - began)
