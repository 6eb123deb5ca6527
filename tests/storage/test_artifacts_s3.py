"""Artifact downloads from S3 storage through the API: streamed ranges, or a 307 to a presigned URL."""

from __future__ import annotations

import hashlib
import os

import httpx

from tests.support.api import make_artifact
from tests.support.jobs import job_body


def test_content_streams_from_s3_with_ranges_and_presigned_redirects(client, make_key, uploaded, s3_server,
                                                                     s3_settings, monkeypatch):
    from app.settings import get_settings

    h = make_key("art-s3")
    m, d = uploaded(h)
    job = client.post("/v1/jobs", headers=h, json=job_body(m, d)).json()
    bucket = s3_server.bucket()
    settings = s3_settings(f"s3://{bucket}/blobs")
    content = os.urandom(2 * 1024 * 1024 + 100)
    art = make_artifact(job["id"], content)  # stored the way the worker stores one: through get_storage()
    sha = hashlib.sha256(content).hexdigest()
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == [f"blobs/artifacts/{job['id']}/{art}/student.onnx"]
    assert not (get_settings().blob_dir / "artifacts" / job["id"]).exists()

    full = client.get(f"/v1/artifacts/{art}/content", headers=h)
    assert full.status_code == 200 and full.content == content and full.headers["etag"] == f'"{sha}"'
    part = client.get(f"/v1/artifacts/{art}/content", headers={**h, "Range": "bytes=1048570-1048589"})
    assert part.status_code == 206 and part.content == content[1048570:1048590]
    assert part.headers["content-range"] == f"bytes 1048570-1048589/{len(content)}"

    monkeypatch.setattr(settings, "s3_presigned_downloads", True)
    monkeypatch.setattr(settings, "s3_presigned_seconds", 60)
    r = client.get(f"/v1/artifacts/{art}/content", headers=h, follow_redirects=False)
    assert r.status_code == 307 and r.headers["etag"] == f'"{sha}"'
    location = r.headers["location"]
    assert location.startswith(f"{s3_server.url}/{bucket}/blobs/artifacts/") and "X-Amz-Expires=60" in location
    assert httpx.get(location).content == content  # no API key needed: the URL is the credential
    assert httpx.get(location, headers={"Range": "bytes=10-19"}).content == content[10:20]
    # The API key and the tenant are checked before any URL is handed out.
    assert client.get(f"/v1/artifacts/{art}/content", headers=make_key("art-s3-other"),
                      follow_redirects=False).status_code == 404
    assert client.get(f"/v1/artifacts/{art}/content", follow_redirects=False).status_code == 401
    # If-None-Match still answers 304 here, without a redirect.
    assert client.get(f"/v1/artifacts/{art}/content", headers={**h, "If-None-Match": f'"{sha}"'},
                      follow_redirects=False).status_code == 304
