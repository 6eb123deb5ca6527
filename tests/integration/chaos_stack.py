"""The chaos suite's shared stack: a Redis of its own, a database of its own on the shared PostgreSQL, one API and
two workers as real processes (``distillery serve`` / ``distillery worker``), and the tiny and long jobs the
fault tests submit. Each test module gets its own stack (module-scoped fixture ``chaos_stack``), so modules
run side by side without sharing a server a test breaks."""

from __future__ import annotations

import httpx
import pytest

from tests.support.chaos import stack_on_shared_postgres, throwaway_redis, upload_inputs
from tests.support.jobs import job_body

LEASE = 8  # seconds: short, so a frozen worker's job is requeued quickly


def tiny(m: str, d: str) -> dict:
    return job_body(m, d, steps=[{"kind": "distill", "epochs": 1}], exports=[])


def long(m: str, d: str, epochs: int = 400) -> dict:
    return job_body(m, d, steps=[{"kind": "distill", "epochs": epochs, "batch_size": 16}], exports=[])


@pytest.fixture(scope="module")
def chaos_stack(tmp_path_factory, teacher_files, digits_npz):
    """Redis of our own, a database of our own, one API and two workers; ``stack.inputs`` = (model, dataset)."""
    root = tmp_path_factory.mktemp("faults")
    with throwaway_redis(root) as redis, stack_on_shared_postgres(
            root, redis.url, DISTILLERY_LEASE_SECONDS=str(LEASE), DISTILLERY_CHECKPOINT_SECONDS="0",
            DISTILLERY_SHUTDOWN_GRACE_SECONDS="15") as st:
        st.redis = redis
        st.headers = st.key("faults")
        st.http = st.api()
        st.workers = [st.worker("w1", wait=False), st.worker("w2", wait=False)]
        st.inputs = upload_inputs(st.http, st.headers, teacher_files["torchscript"], digits_npz)
        for name, proc in zip(("w1", "w2"), st.workers, strict=True):
            st.wait_ready(proc, name)
        yield st


def client_of(st) -> httpx.Client:
    return httpx.Client(base_url=st.http.url, headers=st.headers, timeout=30)


def first_sent(st, ids: list[str], after=None) -> dict[str, object]:
    rows = st._rows("SELECT job_id, min(sent_at) AS sent FROM dispatches WHERE job_id = ANY(:ids) AND sent_at IS NOT NULL "
                    + ("AND created_at > :after " if after is not None else "") + "GROUP BY job_id",
                    ids=list(ids), **({"after": after} if after is not None else {}))
    return {r.job_id: r.sent for r in rows}


def db_now(st):
    return st._rows("SELECT now() AS now")[0].now


