"""Fixtures of the worker tests: a queued job and stand-in executors."""

from __future__ import annotations

import sys
import textwrap

import pytest

from tests.support.jobs import job_body


@pytest.fixture()
def queued_job(client, make_key, uploaded) -> str:
    h = make_key("runner")
    m, d = uploaded(h)
    return client.post("/v1/jobs", headers=h, json=job_body(m, d)).json()["id"]


@pytest.fixture()
def executor(monkeypatch):
    """``executor(code)``: the next job's executor runs ``code`` (cwd: its scratch; ``job.json`` there)."""
    from worker import supervisor

    def use(code: str) -> None:
        program = "import json, os, sys\ndef send(m): print(json.dumps(m), flush=True)\n" + textwrap.dedent(code)
        monkeypatch.setattr(supervisor, "executor_argv", lambda job_file: [sys.executable, "-c", program])

    return use

