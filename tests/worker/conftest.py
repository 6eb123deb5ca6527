"""Fixtures of the worker tests: a queued job (stand-in executors: ``executor`` in tests.support.fixtures)."""

from __future__ import annotations

import pytest

from tests.support.jobs import job_body


@pytest.fixture()
def queued_job(client, make_key, uploaded) -> str:
    h = make_key("runner")
    m, d = uploaded(h)
    return client.post("/v1/jobs", headers=h, json=job_body(m, d)).json()["id"]
