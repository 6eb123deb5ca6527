"""API keys: creation, revocation, and resolving ``Authorization: Bearer`` to a tenant.

A verified key is cached in-process for ``DISTILLERY_AUTH_CACHE_SECONDS`` (default 5 s, at most
``DISTILLERY_AUTH_CACHE_SIZE`` keys), so a client polling ``GET /v1/jobs/{id}`` does not cost one query per
request for its key. The price is bounded staleness: ``distillery keys revoke`` (another process) takes
effect on a running API within that TTL; a revocation through :func:`revoke_key` in the API process itself
takes effect at once. Set the TTL to 0 to check every request against the database.
"""

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
from app.settings import get_settings

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
    """Revoke a key. This process forgets it at once; other API processes (``distillery keys revoke`` runs in
    its own) stop accepting it within ``DISTILLERY_AUTH_CACHE_SECONDS``, when their cached entry expires."""
    row = session.get(ApiKey, key_id)
    if row is None:
        raise NotFound(f"no API key {key_id}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    with _cache_lock:
        _cache.pop(row.key_hash, None)


# Verified keys: key hash -> (principal, monotonic expiry). A dict keeps insertion order and every entry lives
# the same TTL, so the first entry is always the one to expire first: eviction is O(1) and the size bounded.
# Only hashes are held, never a plaintext key; unknown or revoked keys are never cached, so a new key works
# at once and a flood of bad keys cannot push good ones out.
_cache: dict[str, tuple[Principal, float]] = {}
_cache_lock = threading.Lock()


def bearer_token(authorization: str | None) -> str:
    """The key in ``Authorization: Bearer <key>``; Unauthorized when the header is missing or malformed."""
    if not authorization:
        raise Unauthorized("missing Authorization header; send 'Authorization: Bearer <api key>'")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Authorization must be 'Bearer <api key>'")
    return token.strip()


def cached_principal(authorization: str | None) -> Principal | None:
    """The principal of a key verified less than ``DISTILLERY_AUTH_CACHE_SECONDS`` ago, else None.

    No I/O, so the API calls it on the event loop: a client polling a job costs no query (and no thread hop)
    for its key. Raises Unauthorized for a missing or malformed header."""
    return _lookup(hash_key(bearer_token(authorization)))


def _lookup(key_hash: str) -> Principal | None:
    hit = _cache.get(key_hash)
    if hit is not None and hit[1] > time.monotonic():
        return hit[0]
    return None


def _remember(key_hash: str, principal: Principal) -> None:
    settings = get_settings()
    if settings.auth_cache_seconds <= 0:
        return
    with _cache_lock:
        _cache.pop(key_hash, None)  # re-inserted at the end: the order stays the expiry order
        while len(_cache) >= settings.auth_cache_size:
            del _cache[next(iter(_cache))]
        _cache[key_hash] = (principal, time.monotonic() + settings.auth_cache_seconds)


def authenticate(session: Session, authorization: str | None) -> Principal:
    """Resolve the header to a principal: from the cache when verified a moment ago, else one query."""
    key_hash = hash_key(bearer_token(authorization))
    if (principal := _lookup(key_hash)) is not None:
        return principal
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash))
    if row is None or row.revoked_at is not None:
        raise Unauthorized("invalid or revoked API key")
    principal = Principal(tenant_id=row.tenant_id, key_id=row.id)
    _remember(key_hash, principal)
    return principal
