"""Datasets registered by s3:// and https:// URIs: allow-lists, redirects re-checked per hop, sha256, limits.

The fetched bytes go through the same sandboxed inspection as an upload (a 201 carries num_rows and sha256)."""

from __future__ import annotations

import hashlib

import pytest


@pytest.fixture()
def uris(client, s3_server, s3_settings, file_server, digits_npz):
    """Allow-lists on: one bucket holding digits.npz, and the local file server's 127.0.0.1 (plain http)."""
    bucket = s3_server.bucket()
    s3_server.client().put_object(Bucket=bucket, Key="sets/digits.npz", Body=digits_npz)
    file_server.files["/digits.npz"] = digits_npz
    settings = s3_settings(allowed_s3_buckets=[bucket], allowed_http_hosts=["127.0.0.1"], dataset_allow_http=True)
    return {"bucket": bucket, "settings": settings, "sha256": hashlib.sha256(digits_npz).hexdigest()}


def _register(client, h, uri: str, **extra):
    return client.post("/v1/datasets", headers=h, json={"name": "by-uri", "uri": uri, "format": "npz", **extra})


def _no_temp_files_left():
    from app.settings import get_settings

    tmp = get_settings().data_dir / "tmp"
    return not tmp.exists() or not [p for p in tmp.iterdir() if p.name.startswith("upload-")]


def test_an_s3_uri_in_an_allowed_bucket_registers_like_an_upload(client, make_key, uris):
    h = make_key("uri-s3")
    r = _register(client, h, f"s3://{uris['bucket']}/sets/digits.npz", sha256=uris["sha256"])
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["sha256"] == uris["sha256"] and body["num_rows"] > 0 and body["has_labels"] is True
    assert client.get(f"/v1/datasets/{body['id']}", headers=h).json()["num_rows"] == body["num_rows"]


def test_an_https_uri_through_an_allowed_redirect_registers(client, make_key, uris, file_server):
    file_server.redirects["/latest"] = "/digits.npz"  # relative, same allowed host
    r = _register(client, make_key("uri-https"), file_server.url("/latest"))
    assert r.status_code == 201, r.text
    assert r.json()["sha256"] == uris["sha256"] and r.json()["num_rows"] > 0


@pytest.mark.parametrize("uri,code,words", [
    ("s3://other-bucket/sets/digits.npz", "uri_not_allowed", "DISTILLERY_ALLOWED_S3_BUCKETS"),
    ("http://localhost:{port}/digits.npz", "uri_not_allowed", "DISTILLERY_ALLOWED_HTTP_HOSTS"),
    ("https://example.org/digits.npz", "uri_not_allowed", "example.org:443"),
    ("http://user:secret@127.0.0.1:{port}/digits.npz", "invalid_uri", "credentials"),
    ("s3://{bucket}", "invalid_uri", "object key"),
    ("ftp://127.0.0.1/digits.npz", "invalid_uri", "file://, s3:// or https://"),
])
def test_uris_off_the_allow_lists_are_refused_before_any_connection(client, make_key, uris, file_server, uri, code,
                                                                    words):
    hits = len(file_server.hits)
    r = _register(client, make_key("uri-refused"), uri.format(port=file_server.port, bucket=uris["bucket"]))
    assert r.status_code == 422 and r.json()["code"] == code, r.text
    assert words in r.json()["detail"]
    assert len(file_server.hits) == hits  # nothing was fetched


def test_plain_http_needs_its_setting(client, make_key, uris, file_server):
    uris["settings"].dataset_allow_http = False
    r = _register(client, make_key("uri-http"), file_server.url("/digits.npz"))
    assert r.status_code == 422 and r.json()["code"] == "uri_not_allowed" and "https" in r.json()["detail"]


def test_empty_allow_lists_mean_the_scheme_is_off(client, make_key, uris, file_server):
    uris["settings"].allowed_s3_buckets, uris["settings"].allowed_http_hosts = [], []
    h = make_key("uri-off")
    for uri in (f"s3://{uris['bucket']}/sets/digits.npz", file_server.url("/digits.npz")):
        r = _register(client, h, uri)
        assert r.status_code == 422 and r.json()["code"] == "uri_not_enabled", r.text


def test_a_redirect_to_a_host_off_the_list_is_refused(client, make_key, uris, file_server):
    file_server.files["/secret"] = b"must not be read"
    file_server.redirects["/hop"] = file_server.url("/secret", host="localhost")  # same server, unlisted name
    hits = len(file_server.hits)
    r = _register(client, make_key("uri-redirect"), file_server.url("/hop"))
    assert r.status_code == 422 and r.json()["code"] == "uri_not_allowed", r.text
    assert "redirects to http://localhost" in r.json()["detail"]
    assert file_server.hits[hits:] == ["/hop"]  # the second hop was never requested
    file_server.redirects["/loop"] = "/loop"
    r = _register(client, make_key("uri-redirect"), file_server.url("/loop"))
    assert r.status_code == 422 and r.json()["code"] == "uri_fetch_failed" and "redirects" in r.json()["detail"]


def test_sha256_mismatch_missing_files_and_the_size_limit(client, make_key, uris, file_server, monkeypatch):
    h = make_key("uri-checks")
    wrong = "0" * 64
    for uri in (f"s3://{uris['bucket']}/sets/digits.npz", file_server.url("/digits.npz")):
        r = _register(client, h, uri, sha256=wrong)
        assert r.status_code == 422 and r.json()["code"] == "sha256_mismatch", r.text
        assert uris["sha256"] in r.json()["detail"] and wrong in r.json()["detail"]
    r = _register(client, h, f"s3://{uris['bucket']}/sets/missing.npz")
    assert r.status_code == 422 and r.json()["code"] == "uri_not_found"
    r = _register(client, h, file_server.url("/missing.npz"))
    assert r.status_code == 422 and r.json()["code"] == "uri_not_found"
    r = _register(client, h, "http://127.0.0.1:9/digits.npz")  # allowed host, nothing listening (discard port)
    assert r.status_code == 422 and r.json()["code"] == "uri_fetch_failed"
    monkeypatch.setattr(uris["settings"], "max_upload_bytes", 1000)
    for uri in (f"s3://{uris['bucket']}/sets/digits.npz", file_server.url("/digits.npz")):
        r = _register(client, h, uri)
        assert r.status_code == 413 and "DISTILLERY_MAX_UPLOAD_BYTES" in r.json()["detail"], r.text
    r = _register(client, h, file_server.url("/digits.npz"), sha256="not-a-digest")
    assert r.status_code == 422 and r.json()["errors"][0]["loc"][-1] == "sha256"
    assert _no_temp_files_left()


def test_distillerys_own_storage_cannot_be_read_by_uri(client, make_key, uris, s3_server):
    settings = uris["settings"]
    settings.storage_url = f"s3://{uris['bucket']}/sets"  # the bucket holding the blobs is also allow-listed
    r = _register(client, make_key("uri-own"), f"s3://{uris['bucket']}/sets/digits.npz")
    assert r.status_code == 422 and r.json()["code"] == "uri_not_allowed" and "own blob storage" in r.json()["detail"]
