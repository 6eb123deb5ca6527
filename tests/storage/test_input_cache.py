"""The worker's input cache: remote blobs downloaded once per sha256, verified, pinned while used, bounded."""

from __future__ import annotations

import hashlib
import os

import pytest


@pytest.fixture()
def remote(s3_server, tmp_path):
    """(S3 storage, put(key, bytes) → sha256)."""
    from app.storage import storage_for

    storage = storage_for(s3_server.settings(f"s3://{s3_server.bucket()}/blobs"))

    def put(key: str, content: bytes) -> str:
        (tmp_path / "src").write_bytes(content)
        return storage.put_file(key, tmp_path / "src").sha256

    return storage, put


def test_a_blob_is_downloaded_once_and_reused(remote, tmp_path):
    from worker.input_cache import InputCache

    storage, put = remote
    sha = put("models/mdl_t", b"teacher bytes" * 1000)
    cache = InputCache(tmp_path / "cache", max_bytes=10**9)
    with cache.session() as first:
        path = first.path(storage, "models/mdl_t", sha)
        assert path == tmp_path / "cache" / sha and path.read_bytes() == b"teacher bytes" * 1000
        assert (first.stats.downloaded, first.stats.cached, first.stats.downloaded_bytes) == (1, 0, 13000)
        assert not os.access(path, os.W_OK) or os.geteuid() == 0  # read-only for whoever is not root
    with cache.session() as second:  # the next job: no download
        assert second.path(storage, "models/mdl_t", sha) == path
        assert (second.stats.downloaded, second.stats.cached) == (0, 1)
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")] == [sha]


def test_bytes_that_do_not_match_the_recorded_sha256_are_refused(remote, tmp_path):
    from worker.input_cache import InputCache, InputCorrupt

    storage, put = remote
    put("models/mdl_t", b"changed behind our back")
    recorded = hashlib.sha256(b"what was uploaded").hexdigest()
    cache = InputCache(tmp_path / "cache", max_bytes=10**9)
    with cache.session() as s, pytest.raises(InputCorrupt, match="does not match|not the"):
        s.path(storage, "models/mdl_t", recorded)
    assert not (tmp_path / "cache" / recorded).exists()
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".partial")]
    with cache.session() as s, pytest.raises(FileNotFoundError):
        s.path(storage, "models/gone", recorded)


def test_the_cache_is_trimmed_least_recently_used_first_but_never_a_pinned_input(remote, tmp_path):
    from worker.input_cache import InputCache

    storage, put = remote
    shas = [put(f"datasets/ds_{i}", bytes([i]) * 1000) for i in range(4)]
    cache = InputCache(tmp_path / "cache", max_bytes=2500)
    with cache.session() as running:  # a job that holds input 0 all along
        running.path(storage, "datasets/ds_0", shas[0])
        for i in (1, 2, 3):
            with cache.session() as s:
                s.path(storage, f"datasets/ds_{i}", shas[i])
                os.utime(tmp_path / "cache" / shas[i], (1000 + i, 1000 + i))  # recency order: 1 < 2 < 3
        os.utime(tmp_path / "cache" / shas[0], (1, 1))  # the oldest of all, but pinned
        kept = {p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")}
        assert shas[0] in kept and shas[1] not in kept and len(kept) <= 3
        assert sum((tmp_path / "cache" / k).stat().st_size for k in kept) <= 2500 + 1000  # the pin may overshoot
    with cache.session() as s:  # once released, input 0 is the first to go
        s.path(storage, "datasets/ds_1", shas[1])
    kept = {p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")}
    assert shas[0] not in kept and shas[1] in kept
    assert sum((tmp_path / "cache" / k).stat().st_size for k in kept) <= 2500


def test_local_storage_is_read_in_place(tmp_path):
    from app.storage import LocalStorage
    from worker.input_cache import InputCache

    storage = LocalStorage(tmp_path / "blobs")
    (tmp_path / "f").write_bytes(b"abc")
    blob = storage.put_file("models/mdl_x", tmp_path / "f")
    with InputCache(tmp_path / "cache", 10**9).session() as s:
        assert s.path(storage, "models/mdl_x", blob.sha256) == (tmp_path / "blobs" / "models" / "mdl_x").resolve()
    assert not (tmp_path / "cache").exists()  # nothing copied
