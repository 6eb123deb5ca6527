"""Artifact downloads: streamed, ETag = sha256, Range, If-None-Match."""

from __future__ import annotations

import hashlib

from tests.support.api import make_artifact
from tests.support.jobs import job_body


def test_content_etag_and_ranges(client, make_key, uploaded):
    h = make_key("art-a")
    m, d = uploaded(h)
    job = client.post("/v1/jobs", headers=h, json=job_body(m, d)).json()
    content = bytes(range(256)) * 40
    art = make_artifact(job["id"], content)
    sha = hashlib.sha256(content).hexdigest()

    meta = client.get(f"/v1/artifacts/{art}", headers=h).json()
    assert meta["sha256"] == sha and meta["size_bytes"] == len(content) and meta["kind"] == "student"
    listed = client.get(f"/v1/jobs/{job['id']}/artifacts", headers=h).json()["data"]
    assert [a["id"] for a in listed] == [art]

    full = client.get(f"/v1/artifacts/{art}/content", headers=h)
    assert full.status_code == 200 and full.content == content and full.headers["etag"] == f'"{sha}"'
    assert full.headers["accept-ranges"] == "bytes"

    part = client.get(f"/v1/artifacts/{art}/content", headers={**h, "Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == content[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(content)}"
    tail = client.get(f"/v1/artifacts/{art}/content", headers={**h, "Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == content[-10:]
    open_end = client.get(f"/v1/artifacts/{art}/content", headers={**h, "Range": f"bytes={len(content) - 5}-"})
    assert open_end.content == content[-5:]
    bad = client.get(f"/v1/artifacts/{art}/content", headers={**h, "Range": f"bytes={len(content)}-"})
    assert bad.status_code == 416 and bad.json()["code"] == "range_not_satisfiable"
    cached = client.get(f"/v1/artifacts/{art}/content", headers={**h, "If-None-Match": f'"{sha}"'})
    assert cached.status_code == 304 and cached.content == b""
    stale = client.get(f"/v1/artifacts/{art}/content", headers={**h, "Range": "bytes=0-9", "If-Range": '"other"'})
    assert stale.status_code == 200 and stale.content == content  # If-Range mismatch: whole file
