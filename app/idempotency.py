"""``Idempotency-Key`` for creating POSTs: same key + same body replays; a different body is 409."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import IdempotencyRecord
from app.errors import Conflict, Unprocessable


def request_hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def check_key(key: str | None) -> str | None:
    if key is not None and not (1 <= len(key) <= 200):
        raise Unprocessable("Idempotency-Key must be 1 to 200 characters", code="invalid_idempotency_key")
    return key


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
