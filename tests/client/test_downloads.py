"""artifacts.download: streams to .part, resumes with Range/If-Range, checks the sha256, raises on a mismatch."""

from __future__ import annotations

import hashlib
import re

import httpx
import pytest

from distillery_client import Artifact, ChecksumMismatch
from tests.client.mock_api import chunks, sdk

CONTENT = bytes(range(256)) * 64  # 16 KiB
SHA = hashlib.sha256(CONTENT).hexdigest()
META = {"id": "art_1", "job_id": "job_1", "kind": "student", "format": "torchscript", "step_index": 0,
        "filename": "student.pt", "size_bytes": len(CONTENT), "sha256": SHA, "created_at": "2025-01-01T00:00:00Z"}


class ArtifactServer:
    """Serves META and CONTENT like app/api/routes/artifacts.py (ETag, Range, If-Range), optionally dropping the
    connection after ``drop_after`` bytes of the first content response, or serving ``body`` instead."""

    def __init__(self, body: bytes = CONTENT, drop_after: int | None = None, honour_range: bool = True):
        self.body, self.drop_after, self.honour_range = body, drop_after, honour_range
        self.ranges: list[str | None] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if not request.url.path.endswith("/content"):
            return httpx.Response(200, json=META)
        rng = request.headers.get("range")
        self.ranges.append(rng)
        headers = {"etag": f'"{SHA}"', "accept-ranges": "bytes"}
        start = 0
        if rng and self.honour_range and request.headers.get("if-range") == f'"{SHA}"':
            start = int(re.match(r"bytes=(\d+)-", rng).group(1))
            headers["content-range"] = f"bytes {start}-{len(self.body) - 1}/{len(self.body)}"
        data = self.body[start:]
        if self.drop_after is not None:
            cut, self.drop_after = self.drop_after, None
            stream = chunks(data[:cut // 2], data[cut // 2:cut], then=httpx.ReadError("connection reset"))
        else:
            stream = chunks(data[:4096], data[4096:])
        return httpx.Response(206 if start else 200, content=stream, headers=headers)


def test_download_writes_the_file_via_a_part_file_and_verifies_it(tmp_path):
    server = ArtifactServer()
    client, rec = sdk(server)
    path = client.artifacts.download("art_1", tmp_path)
    assert path == tmp_path / "student.pt" and path.read_bytes() == CONTENT
    assert not (tmp_path / "student.pt.part").exists()
    assert rec.paths() == ["GET /v1/artifacts/art_1", "GET /v1/artifacts/art_1/content"]
    assert server.ranges == [None]


def test_a_partial_file_on_disk_is_resumed_with_range(tmp_path):
    (tmp_path / "student.pt.part").write_bytes(CONTENT[:5000])
    server = ArtifactServer()
    client, rec = sdk(server)
    path = client.artifacts.download(Artifact.from_dict(META), tmp_path / "student.pt")  # no metadata request
    assert path.read_bytes() == CONTENT
    assert server.ranges == ["bytes=5000-"]
    assert rec.requests[0].headers["if-range"] == f'"{SHA}"'


def test_a_connection_dropped_mid_download_resumes_where_it_stopped(tmp_path):
    server = ArtifactServer(drop_after=7000)
    client, rec = sdk(server)
    assert client.artifacts.download("art_1", tmp_path).read_bytes() == CONTENT
    assert server.ranges == [None, "bytes=7000-"] and len(rec.sleeps) == 1


def test_a_server_that_ignores_the_range_sends_the_whole_file_and_it_is_not_appended(tmp_path):
    (tmp_path / "student.pt.part").write_bytes(CONTENT[:5000])
    client, _ = sdk(ArtifactServer(honour_range=False))
    assert client.artifacts.download("art_1", tmp_path).read_bytes() == CONTENT


def test_bytes_that_do_not_match_the_sha256_raise_and_leave_nothing(tmp_path):
    corrupt = CONTENT[:-1] + b"\x00"
    client, _ = sdk(ArtifactServer(body=corrupt))
    with pytest.raises(ChecksumMismatch) as err:
        client.artifacts.download("art_1", tmp_path)
    assert err.value.expected == SHA and err.value.actual == hashlib.sha256(corrupt).hexdigest()
    assert list(tmp_path.iterdir()) == []


def test_a_stale_partial_of_another_file_is_replaced_by_a_whole_download(tmp_path):
    (tmp_path / "student.pt.part").write_bytes(b"\xff" * 5000)  # same name, other bytes
    server = ArtifactServer()
    client, _ = sdk(server)
    assert client.artifacts.download("art_1", tmp_path).read_bytes() == CONTENT
    assert server.ranges == ["bytes=5000-", None]


def test_a_complete_partial_is_verified_without_downloading(tmp_path):
    (tmp_path / "student.pt.part").write_bytes(CONTENT)
    server = ArtifactServer()
    client, _ = sdk(server)
    assert client.artifacts.download("art_1", tmp_path).read_bytes() == CONTENT
    assert server.ranges == []


def test_a_hostile_file_name_cannot_leave_the_directory(tmp_path):
    meta = {**META, "filename": "../../etc/student.pt"}
    client, _ = sdk(ArtifactServer())
    assert client.artifacts.download(Artifact.from_dict(meta), tmp_path) == tmp_path / "student.pt"


def test_the_async_client_resumes_and_verifies_the_same_way(tmp_path):
    import asyncio

    from tests.client.mock_api import async_sdk

    (tmp_path / "student.pt.part").write_bytes(CONTENT[:5000])
    server = ArtifactServer()

    def whole_bodies(request: httpx.Request) -> httpx.Response:  # an async transport needs bytes, not an iterator
        response = server(request)
        return httpx.Response(response.status_code, headers=response.headers, content=response.read())

    async def scenario():
        client, _ = async_sdk(whole_bodies)
        async with client:
            return await client.artifacts.download("art_1", tmp_path)

    assert asyncio.run(scenario()).read_bytes() == CONTENT
    assert server.ranges == ["bytes=5000-"]
