"""The job cache (app/api/job_cache.py): a poll is answered without a query, and every change of the row —
by whichever process — is seen by the next read once PostgreSQL's notification arrives."""

from __future__ import annotations

import logging

import pytest
from sqlalchemy import text, update

from app.api.job_cache import JobCache, get_cache
from app.db.models import Job
from app.db.session import session_scope
from tests.support.jobs import job_body
from tests.support.wait import wait_until as poll_until

pytestmark = pytest.mark.postgres  # the cache follows the row through PostgreSQL's LISTEN/NOTIFY


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> float:
    """Poll ``predicate`` every 2 ms until true (the lag measured is milliseconds); returns the seconds it took."""
    return poll_until(predicate, timeout, what, every=0.002)


def test_a_read_that_predates_an_invalidation_is_not_stored():
    cache = JobCache(size=2)
    cache.reset(enabled=True)
    epoch = cache.epoch
    cache.invalidate("job_a")  # the row changed while the read was in flight
    cache.put(epoch, "t1", "job_a", b"old")
    assert cache.get("t1", "job_a") is None
    cache.put(cache.epoch, "t1", "job_a", b"new")
    assert cache.get("t1", "job_a") == b"new"
    assert cache.get("t2", "job_a") is None, "another tenant never reads a cached body"


def test_bounded_and_off_until_enabled():
    cache = JobCache(size=2)
    cache.put(cache.epoch, "t", "job_a", b"a")
    assert cache.get("t", "job_a") is None, "a cache whose listener is not connected answers nothing"
    cache.reset(enabled=True)
    for name in ("job_a", "job_b", "job_c"):
        cache.put(cache.epoch, "t", name, name.encode())
    assert cache.get("t", "job_a") is None and cache.get("t", "job_c") == b"job_c"
    cache.reset(enabled=False)
    assert cache.get("t", "job_c") is None
    off = JobCache(size=0)
    off.reset(enabled=True)
    assert not off.enabled


def _queued_job(client, make_key, uploaded, tenant: str) -> tuple[dict, str]:
    h = make_key(tenant)
    m, d = uploaded(h)
    r = client.post("/v1/jobs", headers=h, json=job_body(m, d))
    assert r.status_code == 202, r.text
    wait_until(lambda: get_cache().enabled, what="the listener to connect")
    return h, r.json()["id"]


def _set_progress(job_id: str, epoch: int) -> None:
    """What a worker does: update the row from a connection of its own."""
    with session_scope() as s:
        s.execute(update(Job).where(Job.id == job_id).values(progress={"epoch": epoch, "fraction": epoch / 10}))


def test_polls_hit_and_another_process_change_is_seen(client, make_key, uploaded):
    h, job_id = _queued_job(client, make_key, uploaded, "cache-a")
    cache = get_cache()
    first = client.get(f"/v1/jobs/{job_id}", headers=h)
    hits = cache.hits
    second = client.get(f"/v1/jobs/{job_id}", headers=h)
    assert second.status_code == 200 and second.json() == first.json()
    assert second.headers["content-type"] == "application/json"
    assert cache.hits == hits + 1, "the second poll is answered from the cache"
    assert client.get(f"/v1/jobs/{job_id}", headers=make_key("cache-other")).status_code == 404
    # A cached job answers nothing to a request the route would refuse.
    assert client.get(f"/v1/jobs/{job_id}", headers={"Authorization": "Basic x"}).status_code == 401
    assert client.get(f"/v1/jobs/{job_id}").status_code == 401
    assert client.get(f"/v1/jobs/{job_id}", headers={"Authorization": "Bearer dsk_unknown"}).status_code == 401
    assert client.get(f"/v1/jobs/{job_id}/events", headers=h).json()["data"][0]["type"] == "queued"
    assert client.request("HEAD", f"/v1/jobs/{job_id}", headers=h).status_code in (200, 405)

    _set_progress(job_id, 7)
    lag = wait_until(lambda: client.get(f"/v1/jobs/{job_id}", headers=h).json()["progress"].get("epoch") == 7,
                     timeout=2, what="the change to show")
    print(f"CACHE a change committed by another connection was read back {lag * 1000:.1f} ms later")
    assert client.get(f"/v1/jobs/{job_id}", headers=h).json()["progress"]["epoch"] == 7


def test_own_cancel_is_read_back_at_once(client, make_key, uploaded):
    h, job_id = _queued_job(client, make_key, uploaded, "cache-b")
    client.get(f"/v1/jobs/{job_id}", headers=h)
    client.get(f"/v1/jobs/{job_id}", headers=h)  # cached "queued"
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=h).status_code == 202
    assert client.get(f"/v1/jobs/{job_id}", headers=h).json()["status"] == "cancelled"


def test_a_lost_listener_disables_the_cache_until_it_is_back(client, make_key, uploaded, caplog):
    h, job_id = _queued_job(client, make_key, uploaded, "cache-c")
    listener = client.app.state.job_cache_listener
    client.get(f"/v1/jobs/{job_id}", headers=h)
    connects = listener.connects
    with caplog.at_level(logging.WARNING, logger="distillery.job_cache"):
        with session_scope() as s:
            killed = s.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                    "WHERE application_name = 'distillery-job-cache' AND pid <> pg_backend_pid()"))
            assert any(row[0] for row in killed)
        wait_until(lambda: listener.connects > connects, what="the listener to reconnect")
    assert "lost its connection" in caplog.text
    # Changed while it was away or just after: the reconnect emptied the cache, so nothing stale is served.
    _set_progress(job_id, 3)
    wait_until(lambda: client.get(f"/v1/jobs/{job_id}", headers=h).json()["progress"].get("epoch") == 3,
               timeout=2, what="the change to show after the reconnect")
    hits = get_cache().hits
    client.get(f"/v1/jobs/{job_id}", headers=h)
    client.get(f"/v1/jobs/{job_id}", headers=h)
    assert get_cache().hits > hits, "the cache answers again once the listener is back"
