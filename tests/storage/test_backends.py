"""The Storage contract, held by both backends: the local directory and S3 (against moto's real S3 endpoint)."""

from __future__ import annotations

import os

import httpx
import pytest


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    from app.storage import LocalStorage, storage_for

    if request.param == "local":
        return LocalStorage(tmp_path / "blobs")
    server = request.getfixturevalue("s3_server")
    return storage_for(server.settings(f"s3://{server.bucket()}/some/prefix"))


def test_put_get_ranges_list_delete(storage, tmp_path):
    import hashlib

    content = os.urandom(3 * 1024 * 1024 + 17)  # more than one read chunk
    src = tmp_path / "src.bin"
    src.write_bytes(content)
    blob = storage.put_file("artifacts/job_a/art_1/student.onnx", src)
    assert (blob.key, blob.size_bytes, blob.sha256) == ("artifacts/job_a/art_1/student.onnx", len(content),
                                                        hashlib.sha256(content).hexdigest())
    assert storage.exists(blob.key) and storage.size(blob.key) == len(content)
    with storage.open(blob.key) as f:
        assert f.read() == content
    assert b"".join(storage.read_range(blob.key, 1_048_570, 20)) == content[1_048_570:1_048_590]  # across a chunk
    assert b"".join(storage.read_range(blob.key, len(content) - 5, 5)) == content[-5:]
    assert all(len(c) <= 1024 * 1024 for c in storage.read_range(blob.key, 0, len(content)))
    storage.get_file(blob.key, tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == content

    small = tmp_path / "small"
    small.write_bytes(b"x")
    storage.put_file("artifacts/job_a/art_2/report.json", small)
    storage.put_file("artifacts/job_ab/art_3/report.json", small)  # a sibling whose name extends the folder's
    listed = {b.key: b.size_bytes for b in storage.list("artifacts/job_a")}
    assert listed == {"artifacts/job_a/art_1/student.onnx": len(content), "artifacts/job_a/art_2/report.json": 1}
    assert list(storage.list("artifacts/nothing")) == []

    storage.put_file("artifacts/job_a/art_2/report.json", src)  # replaced whole
    assert storage.size("artifacts/job_a/art_2/report.json") == len(content)
    storage.delete("artifacts/job_a/art_1/student.onnx")
    storage.delete("artifacts/job_a/art_1/student.onnx")  # twice: no error
    assert not storage.exists("artifacts/job_a/art_1/student.onnx")
    storage.delete_folder("artifacts/job_a")
    assert list(storage.list("artifacts/job_a")) == []
    assert [b.key for b in storage.list("artifacts/job_ab")] == ["artifacts/job_ab/art_3/report.json"]


def test_a_missing_blob_is_file_not_found(storage, tmp_path):
    for read in (lambda: storage.open("models/nope"), lambda: storage.read_range("models/nope", 0, 10),
                 lambda: storage.size("models/nope"), lambda: storage.get_file("models/nope", tmp_path / "x")):
        with pytest.raises(FileNotFoundError):
            read()
    assert not storage.exists("models/nope")


@pytest.mark.parametrize("key", ["../escape", "models/../../x", "/abs", "models//x", "a\\b", "models/x\x00"])
def test_keys_cannot_escape(storage, key, tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(ValueError):
        storage.put_file(key, tmp_path / "f")


def test_s3_multipart_upload_above_the_threshold(s3_server, tmp_path):
    from app.storage import storage_for

    bucket = s3_server.bucket()
    mib = 1024 * 1024
    storage = storage_for(s3_server.settings(f"s3://{bucket}", s3_multipart_threshold_bytes=5 * mib,
                                             s3_multipart_chunk_bytes=5 * mib, s3_max_concurrency=2))
    content = os.urandom(11 * mib)
    (tmp_path / "big").write_bytes(content)
    storage.put_file("models/mdl_big", tmp_path / "big")
    head = s3_server.client().head_object(Bucket=bucket, Key="models/mdl_big")
    assert head["ETag"].strip('"').endswith("-3"), head["ETag"]  # three parts: 5 + 5 + 1 MiB
    assert head["Metadata"]["sha256"] == __import__("hashlib").sha256(content).hexdigest()
    storage.get_file("models/mdl_big", tmp_path / "back")  # ranged parallel GETs above the threshold
    assert (tmp_path / "back").read_bytes() == content
    assert b"".join(storage.read_range("models/mdl_big", 5 * mib - 3, 6)) == content[5 * mib - 3:5 * mib + 3]
    (tmp_path / "small").write_bytes(b"small")
    storage.put_file("models/mdl_small", tmp_path / "small")
    assert "-" not in s3_server.client().head_object(Bucket=bucket, Key="models/mdl_small")["ETag"]


def test_s3_presigned_url_serves_the_blob_with_ranges(s3_server, tmp_path):
    from app.storage import storage_for

    storage = storage_for(s3_server.settings(f"s3://{s3_server.bucket()}/p"))
    (tmp_path / "f").write_bytes(b"0123456789")
    storage.put_file("artifacts/j/a/student.onnx", tmp_path / "f")
    url = storage.presigned_url("artifacts/j/a/student.onnx", expires_seconds=60, filename="student.onnx",
                                media_type="application/octet-stream")
    r = httpx.get(url)
    assert r.status_code == 200 and r.content == b"0123456789"
    assert r.headers["content-disposition"] == 'attachment; filename="student.onnx"'
    assert httpx.get(url, headers={"Range": "bytes=2-4"}).content == b"234"
    assert "X-Amz-Expires=60" in url and "X-Amz-Signature=" in url  # (moto does not check signatures)


def test_s3_unreachable_is_storage_unavailable(s3_server, tmp_path):
    from app.storage import StorageUnavailable
    from app.storage.s3 import S3Options, S3Storage

    from tests.storage.conftest import free_port

    storage = S3Storage("s3://nowhere", S3Options(endpoint_url=f"http://127.0.0.1:{free_port()}", connect_timeout=1))
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(StorageUnavailable) as exc:
        storage.put_file("models/m", tmp_path / "f")
    assert exc.value.status == 503 and exc.value.code == "storage_unavailable"


def test_storage_url_setting_is_checked():
    from pydantic import ValidationError

    from app.settings import Settings

    assert Settings(storage_url="s3://bucket/pre/fix").resolved_storage_url == "s3://bucket/pre/fix"
    assert Settings().resolved_storage_url == Settings().blob_dir.as_uri()  # the default: <data_dir>/blobs
    for bad in ("s3://", "file://relative/dir", "ftp://host/x", "s3://bucket/../x"):
        with pytest.raises(ValidationError):
            Settings(storage_url=bad)
