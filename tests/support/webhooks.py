"""A real webhook receiver for the tests: an HTTP server on 127.0.0.1 that records every request and answers
as scripted, and helpers to make jobs whose transitions produce webhook events."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.support.wait import wait_until

#: An answer that never comes: the handler holds the request until :meth:`Receiver.release` (or 30 s).
HANG = "hang"


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    answered: int | None  # the status sent back; None when the request was held (HANG)


class Receiver:
    """``answers``: what the next requests get, in order — a status, :data:`HANG`, or
    ``{"status", "body", "headers"}``; after them, ``default``."""

    def __init__(self, default: int = 200):
        self.default, self.answers = default, []
        self.requests: list[Received] = []
        self.connections = 0
        self._lock, self._released = threading.Lock(), threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                with receiver._lock:
                    receiver.connections += 1

            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver._lock:
                    answer = receiver.answers.pop(0) if receiver.answers else receiver.default
                    receiver.requests.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()},
                                                      body, None if answer == HANG else
                                                      answer["status"] if isinstance(answer, dict) else answer))
                if answer == HANG:
                    receiver._released.wait(30)
                    self.close_connection = True
                    return
                status, reply, headers = (answer["status"], answer.get("body", b""), answer.get("headers", {})) \
                    if isinstance(answer, dict) else (answer, b"receiver says no" if answer >= 400 else b"ok", {})
                self.send_response(status)
                for name, value in {"content-length": str(len(reply)), **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                try:
                    self.wfile.write(reply)
                except OSError:  # the sender stopped reading (it reads a bounded amount)
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/distillery"
        # A short poll interval: shutdown() waits for the loop to look (0.5 s by default, on every test).
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._released.set()

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()

    def of_type(self, event_type: str) -> list[Received]:
        import json

        return [r for r in list(self.requests) if json.loads(r.body).get("type") == event_type]


def verify(secret: str, request: Received) -> dict:
    """The event, verified with the ``standardwebhooks`` library the way a receiver does it."""
    from standardwebhooks import Webhook

    return Webhook(secret).verify(request.body, request.headers)


def insert_job(headers: dict[str, str], status: str = "queued") -> str:
    """A job row of the key's tenant (no upload, no worker): enough for its transitions to send events."""
    from app.auth import authenticate
    from app.db.models import Job
    from app.db.session import session_scope
    from app.ids import new_id

    job_id = new_id("job")
    with session_scope() as s:
        tenant_id = authenticate(s, headers["Authorization"]).tenant_id
        s.add(Job(id=job_id, tenant_id=tenant_id, status=status, kind="distill", spec={"steps": [{"kind": "distill"}]},
                  queue="parked", attempts=0, max_attempts=3,
                  progress={"step_index": 0, "step_kind": "distill", "fraction": 0.0}))
    return job_id


def move(job_id: str, to: str, **values) -> None:
    """``job_id`` to status ``to`` through the one guarded transition, committed."""
    from app.db.session import session_scope
    from app.jobs import state

    with session_scope() as s:
        state.transition(s, job_id, to, **values)


def deliveries(client, h, webhook_id) -> list[dict]:
    return client.get(f"/v1/webhooks/{webhook_id}/deliveries", headers=h, params={"limit": 100}).json()["data"]


def drain(settings, until, what: str) -> None:
    """Run delivery passes until ``until()`` holds (each pass sends whatever is due)."""
    from app.webhooks.delivery import deliver_due

    wait_until(lambda: deliver_due(settings) >= 0 and until(), 20, what)
