"""Webhook deliveries on PostgreSQL, in a database of this module's own: the session's PostgreSQL database may be
shared with a real worker process (an earlier end-to-end test on this xdist worker), whose leader sends due
deliveries with its own settings and would race this test's passes."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.support import backends
from tests.support.backends import Backend
from tests.support.webhooks import deliveries, drain, insert_job, move, verify


@pytest.fixture()
def backend(tmp_path) -> Iterator[Backend]:
    """A migrated PostgreSQL database no other process uses (overrides the session's for this module)."""
    own = backends.create_postgres(tmp_path)
    backends.migrate(own)
    backends.activate(own)
    try:
        yield own
    finally:
        backends.drop(own)


@pytest.mark.postgres
def test_on_postgresql_the_same_and_the_body_keeps_its_key_order(client, endpoint, hook_settings, receiver):
    """JSONB would reorder the payload's keys; the outbox column is plain JSON, so the body reads as written."""
    h, created = endpoint("dlv-postgres")
    receiver.answers = [500]
    job = insert_job(h)
    move(job, "running")
    move(job, "cancelled", error_code="cancelled", error_message="cancelled by the client")
    def delivered() -> bool:
        rows = deliveries(client, h, created["id"])
        return len(rows) == 2 and {d["status"] for d in rows} == {"succeeded"}

    # Until both deliveries succeeded (not a request count: on a loaded machine a starved receiver may let one
    # attempt time out, and that attempt is sent again).
    drain(hook_settings, delivered, "two events delivered, one after a 500")
    answered = [r.answered for r in receiver.requests]
    assert answered.count(500) == 1 and answered.count(200) >= 2
    bodies = [json.loads(r.body) for r in receiver.requests]
    assert all(list(b) == ["type", "timestamp", "data"] for b in bodies)
    # Events are not ordered (Standard Webhooks): both were due at once, so either met the one 500; that one came
    # again and was answered.
    types = [verify(created["secret"], r)["type"] for r in receiver.requests]
    retried = types[answered.index(500)]
    assert set(types) == {"job.cancelled", "job.running"}
    assert any(t == retried and a == 200 for t, a in zip(types, answered))
