"""Request dependencies as type aliases, so routes read like plain signatures."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header
from sqlalchemy.orm import Session

from app.auth import Principal, authenticate
from app.db.session import get_sessionmaker
from app.settings import Settings, get_settings
from app.storage import Storage, get_storage


def _db() -> Iterator[Session]:
    # Routes commit explicitly once their work is done (before the response is built), so a
    # client that reads right after a 201/202 always sees the row. Anything uncommitted is rolled back.
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        session.rollback()
        session.close()


DbSession = Annotated[Session, Depends(_db)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StorageDep = Annotated[Storage, Depends(get_storage)]


def _principal(db: DbSession, authorization: Annotated[str | None, Header()] = None) -> Principal:
    return authenticate(db, authorization)


CurrentPrincipal = Annotated[Principal, Depends(_principal)]


def _idempotency_key(
    key: Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=200,
                                      description="Replays the original response for the same key and body")] = None,
) -> str | None:
    return key


IdempotencyKey = Annotated[str | None, Depends(_idempotency_key)]
