"""Every resource: no key / bad key / revoked key → 401; another tenant's resource → 404 like a missing one."""

from __future__ import annotations

import pytest

from tests.support.api import make_artifact
from tests.support.jobs import job_body


@pytest.fixture()
def owned(client, make_key, uploaded):
    owner = make_key("owner")
    m, d = uploaded(owner)
    job = client.post("/v1/jobs", headers=owner, json=job_body(m, d)).json()
    art = make_artifact(job["id"], b"student bytes")
    return {"model": m, "dataset": d, "job": job["id"], "artifact": art}


def _urls(o: dict[str, str]) -> list[tuple[str, str]]:
    return [
        ("GET", "/v1/models"), ("GET", f"/v1/models/{o['model']}"), ("DELETE", f"/v1/models/{o['model']}"),
        ("GET", "/v1/datasets"), ("GET", f"/v1/datasets/{o['dataset']}"), ("DELETE", f"/v1/datasets/{o['dataset']}"),
        ("GET", "/v1/jobs"), ("GET", f"/v1/jobs/{o['job']}"), ("POST", f"/v1/jobs/{o['job']}/cancel"),
        ("GET", f"/v1/jobs/{o['job']}/events"), ("GET", f"/v1/jobs/{o['job']}/metrics"),
        ("GET", f"/v1/jobs/{o['job']}/artifacts"), ("GET", f"/v1/artifacts/{o['artifact']}"),
        ("GET", f"/v1/artifacts/{o['artifact']}/content"),
    ]


def test_missing_or_invalid_key_is_401_everywhere(client, owned, make_key):
    from app.auth import revoke_key
    from app.db.models import ApiKey
    from app.db.session import session_scope

    revoked = make_key("revoked-tenant")
    with session_scope() as s:
        key_id = s.query(ApiKey).order_by(ApiKey.created_at.desc()).first().id
        revoke_key(s, key_id)
    for headers in ({}, {"Authorization": "Bearer dsk_wrong"}, {"Authorization": "Basic abc"}, revoked):
        for method, url in _urls(owned) + [("POST", "/v1/jobs"), ("POST", "/v1/models"), ("POST", "/v1/datasets")]:
            r = client.request(method, url, headers=headers)
            assert r.status_code == 401, (headers, method, url, r.status_code)
            assert r.headers["content-type"].startswith("application/problem+json")
            assert r.json()["code"] == "unauthorized"


def test_other_tenant_sees_404_and_lists_nothing(client, owned, make_key, uploaded):
    intruder = make_key("intruder")
    for method, url in _urls(owned):
        r = client.request(method, url, headers=intruder)
        if url in ("/v1/models", "/v1/datasets", "/v1/jobs"):
            assert r.status_code == 200 and r.json()["data"] == [], url
        else:
            assert r.status_code == 404, (method, url, r.status_code)
            assert r.json()["code"] == "not_found"
    # Nor can it use the owner's inputs in a job of its own.
    r = client.post("/v1/jobs", headers=intruder, json=job_body(owned["model"], owned["dataset"]))
    assert r.status_code == 404
    # The owner still has everything.
    owner_list = client.get("/v1/jobs", headers=make_key("owner")).json()["data"]
    assert owned["job"] in [j["id"] for j in owner_list]


def test_a_key_is_checked_once_per_cache_period_and_revocation_applies(client, make_key, monkeypatch):
    from sqlalchemy import event

    from app import auth
    from app.db.models import ApiKey
    from app.db.session import get_engine, session_scope

    h = make_key("cached-key")
    queries = []

    def count(_conn, _cursor, statement, *_a):
        if "FROM api_keys" in statement:
            queries.append(statement)

    event.listen(get_engine(), "before_cursor_execute", count)
    try:
        for _ in range(5):
            assert client.get("/v1/models", headers=h).status_code == 200
        assert len(queries) == 1  # verified once, then trusted for KEY_CACHE_SECONDS
        with session_scope() as s:
            key_id = s.query(ApiKey.id).filter(ApiKey.key_hash == auth.hash_key(h["Authorization"].split()[1])).scalar()
            auth.revoke_key(s, key_id)
        assert client.get("/v1/models", headers=h).status_code == 401  # revoked here: forgotten at once
    finally:
        event.remove(get_engine(), "before_cursor_execute", count)
    # Revoked by another process: the cache expires it within KEY_CACHE_SECONDS.
    h2 = make_key("cached-key-2")
    assert client.get("/v1/models", headers=h2).status_code == 200
    with session_scope() as s:
        row = s.query(ApiKey).filter(ApiKey.key_hash == auth.hash_key(h2["Authorization"].split()[1])).one()
        row.revoked_at = row.created_at
    for k, (p, _) in list(auth._cache.items()):  # the cache period has passed
        monkeypatch.setitem(auth._cache, k, (p, 0.0))
    assert client.get("/v1/models", headers=h2).status_code == 401
