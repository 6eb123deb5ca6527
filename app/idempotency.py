"""``Idempotency-Key`` for creating POSTs: same key + same body replays; a different body is 409.

Concurrent requests with one key are settled by the table's primary key, never by the earlier read:
each creator *claims* the key (inserts its record, in the transaction that creates the resource) before
any side effect outside the database, such as writing a blob. Exactly one claim can commit; a loser's
insert fails with ``IntegrityError`` once the winner commits, and the loser rolls back and replays the
winner's resource. A loser kept waiting too long on a winner still in flight gets 409
``idempotency_in_flight`` with ``Retry-After`` instead of holding its connection.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from app.db.models import IdempotencyRecord
from app.errors import Conflict, IdempotencyInFlight

# How long a claim waits for another transaction holding the same key (PostgreSQL) before answering 409.
IN_FLIGHT_WAIT_SECONDS = 10
_LOCK_NOT_AVAILABLE = "55P03"


def request_hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def lookup(session: Session, tenant_id: str, endpoint: str, key: str | None, req_hash: str) -> str | None:
    """The resource id an earlier identical request created, or None. 409 when the body differs."""
    if key is None:
        return None
    rec = session.scalar(select(IdempotencyRecord).where(
        IdempotencyRecord.tenant_id == tenant_id, IdempotencyRecord.endpoint == endpoint, IdempotencyRecord.key == key))
    if rec is None:
        return None
    if rec.request_hash != req_hash:
        raise Conflict(f"Idempotency-Key {key!r} was already used with a different request body",
                       code="idempotency_key_reused")
    return rec.resource_id


def remember(session: Session, tenant_id: str, endpoint: str, key: str | None, req_hash: str, resource_id: str) -> None:
    if key is not None:
        session.add(IdempotencyRecord(tenant_id=tenant_id, endpoint=endpoint, key=key, request_hash=req_hash,
                                      resource_id=resource_id))


@contextmanager
def _bounded_wait(session: Session) -> Iterator[None]:
    """On PostgreSQL, wait at most IN_FLIGHT_WAIT_SECONDS for a concurrent holder of the key, then give up."""
    postgres = session.get_bind().dialect.name == "postgresql"
    if postgres:
        session.execute(text(f"SET LOCAL lock_timeout = '{int(IN_FLIGHT_WAIT_SECONDS * 1000)}ms'"))
    yield
    if postgres:
        session.execute(text("SET LOCAL lock_timeout TO DEFAULT"))


def claim(session: Session, tenant_id: str, endpoint: str, key: str | None, req_hash: str,
          resource_id: str) -> str | None:
    """Claim ``key`` for ``resource_id`` (flushed now). None: ours, go on creating. Otherwise the id a
    concurrent identical request created first; this session was rolled back and must only replay it.
    409 ``idempotency_key_reused`` when that request had another body."""
    if key is None:
        return None
    try:
        with _bounded_wait(session):
            # Added only now: the SET above would otherwise autoflush the insert before the bound applied.
            remember(session, tenant_id, endpoint, key, req_hash, resource_id)
            session.flush()
    except IntegrityError as exc:
        session.rollback()
        prior = lookup(session, tenant_id, endpoint, key, req_hash)
        if prior is None:  # not our key that clashed: something this request referenced changed meanwhile
            raise Conflict("a resource this request refers to changed while it was processed; retry",
                           code="concurrent_change") from exc
        return prior
    except OperationalError as exc:
        if getattr(exc.orig, "sqlstate", None) != _LOCK_NOT_AVAILABLE:
            raise
        session.rollback()
        raise IdempotencyInFlight(f"a request with Idempotency-Key {key!r} is still in flight; retry shortly "
                                  f"to get its response") from exc
    return None
