"""API keys: creation, revocation, and resolving ``Authorization: Bearer`` to a tenant."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.clock import utcnow
from app.db.models import ApiKey, Tenant
from app.errors import NotFound, Unauthorized
from app.ids import new_id

KEY_PREFIX = "dsk_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    key_id: str


def create_key(session: Session, tenant_name: str) -> tuple[ApiKey, str]:
    """Create an API key for ``tenant_name`` (creating the tenant if new). Returns (row, plaintext key)."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(id=new_id("tenant"), name=tenant_name)
        session.add(tenant)
        session.flush()
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(id=new_id("api_key"), tenant_id=tenant.id, key_hash=hash_key(plaintext), prefix=plaintext[:10])
    session.add(row)
    session.flush()
    return row, plaintext


def revoke_key(session: Session, key_id: str) -> None:
    row = session.get(ApiKey, key_id)
    if row is None:
        raise NotFound(f"no API key {key_id}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    with _cache_lock:  # this process forgets it at once; other processes within KEY_CACHE_SECONDS
        for k in [k for k, (p, _) in _cache.items() if p.key_id == key_id]:
            _cache.pop(k, None)


#: Seconds a verified key is trusted without asking the database again; a revoked key stops working within
#: this long. Keeps a polling client from costing one query per request.
KEY_CACHE_SECONDS = 5.0
_KEY_CACHE_MAX = 10_000
_cache: dict[str, tuple[Principal, float]] = {}
_cache_lock = threading.Lock()


def _cached(key_hash: str) -> Principal | None:
    hit = _cache.get(key_hash)
    if hit is not None and hit[1] > time.monotonic():
        return hit[0]
    return None


def _remember(key_hash: str, principal: Principal) -> None:
    with _cache_lock:
        if len(_cache) >= _KEY_CACHE_MAX:  # bounded: forget everything expired, else everything
            now = time.monotonic()
            for k in [k for k, (_, exp) in _cache.items() if exp <= now] or list(_cache):
                _cache.pop(k, None)
        _cache[key_hash] = (principal, time.monotonic() + KEY_CACHE_SECONDS)


def authenticate(session: Session, authorization: str | None) -> Principal:
    if not authorization:
        raise Unauthorized("missing Authorization header; send 'Authorization: Bearer <api key>'")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Authorization must be 'Bearer <api key>'")
    key_hash = hash_key(token.strip())
    if (principal := _cached(key_hash)) is not None:
        return principal
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash))
    if row is None or row.revoked_at is not None:
        raise Unauthorized("invalid or revoked API key")
    principal = Principal(tenant_id=row.tenant_id, key_id=row.id)
    _remember(key_hash, principal)
    return principal
