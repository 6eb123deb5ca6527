"""Request dependencies as type aliases, so routes read like plain signatures."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import Depends, Header, Query, Request
from sqlalchemy.orm import Session

from app.api.uploads import check_text, parse_json
from app.auth import Principal, authenticate, cached_principal
from app.db.session import request_session
from app.errors import Unprocessable
from app.pagination import decode_cursor
from app.settings import Settings, get_settings
from app.storage import Storage, get_storage


async def _db() -> AsyncIterator[Session]:
    """One session per request. Routes commit explicitly once their work is done (before the response is
    built), so a client that reads right after a 201/202 always sees the row; anything uncommitted is rolled
    back when the session closes.

    Async on purpose, with :func:`app.db.session.request_session` behind it: admission against the pool and
    the teardown never take a thread from the pool the routes run on (the deadlock it replaces, and why it
    cannot come back, is in that module's docstring). Scope "function": the session closes, and its admission
    is freed, when the route returns, before the response is sent; an event or download stream (which closes
    its session first) or a slow reader never keeps a place other requests wait for."""
    async with request_session() as session:
        yield session


DbSession = Annotated[Session, Depends(_db, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StorageDep = Annotated[Storage, Depends(get_storage)]


async def _principal(db: DbSession, authorization: Annotated[str | None, Header()] = None) -> Principal:
    """A key verified a moment ago is answered from the cache on the event loop (no query, no thread);
    otherwise one query, in a thread."""
    if (principal := cached_principal(authorization)) is not None:
        return principal
    return await anyio.to_thread.run_sync(authenticate, db, authorization)


CurrentPrincipal = Annotated[Principal, Depends(_principal)]


async def _uploader(authorization: Annotated[str | None, Header()] = None) -> Principal:
    """The principal for routes that open their own session, if any, after it (uploads, once the body is on
    disk; the job read, only when its cache misses): like :data:`CurrentPrincipal`, but a key cache miss
    takes a database session for the one query only. A slow or huge upload never holds one of the sessions
    every other request is admitted against, and a cached read takes none at all. Such routes must not also
    take :data:`DbSession`: holding one admission while waiting for a second could deadlock."""
    if (principal := cached_principal(authorization)) is not None:
        return principal
    async with request_session() as db:
        return await anyio.to_thread.run_sync(authenticate, db, authorization)


SessionlessPrincipal = Annotated[Principal, Depends(_uploader)]


def committed(fn: Any, session: Session, *args: Any, **kwargs: Any) -> Any:
    """``fn(session, ...)`` then commit, in the calling (worker) thread: a commit is I/O, never on the event loop."""
    result = fn(session, *args, **kwargs)
    session.commit()
    return result


def _idempotency_key(
    key: Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=200,
                                      description="Replays the original response for the same key and body")] = None,
) -> str | None:
    if key is not None and any(ord(c) < 0x20 or ord(c) == 0x7F for c in key):
        raise Unprocessable("Idempotency-Key must not contain control characters", code="invalid_idempotency_key")
    return key


IdempotencyKey = Annotated[str | None, Depends(_idempotency_key)]


async def _json_object(request: Request, settings: SettingsDep) -> dict[str, Any]:
    """The raw body parsed with a depth bound (``json.loads`` recursion is never reachable from a client)
    and every string checked; the size was already bounded by the middleware while it streamed in."""
    value = parse_json(await request.body(), settings.max_json_depth)
    if not isinstance(value, dict):
        raise Unprocessable("the body must be a JSON object", code="invalid_json")
    return value


JsonObject = Annotated[dict[str, Any], Depends(_json_object)]


def _cursor(after: Annotated[str | None, Query(max_length=200, description="A next_cursor from an earlier page")]
            = None) -> str | None:
    # The id inside a cursor reaches SQL as a value; a forged one must not carry a NUL byte there.
    if after:
        check_text(decode_cursor(after)[1], ["query", "after"], 200)
    return after


Cursor = Annotated[str | None, Depends(_cursor)]
