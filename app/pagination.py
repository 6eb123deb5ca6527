"""Cursor pagination, newest first: ``{"data", "has_more", "next_cursor"}``.

The cursor is the (created_at, id) of the last row served, base64-encoded; it stays valid while
rows are added, unlike offsets.
"""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Any

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import Session

from app.errors import Unprocessable


def encode_cursor(created_at: datetime, id_: str) -> str:
    raw = json.dumps([created_at.isoformat(), id_]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        ts, id_ = json.loads(raw)
        return datetime.fromisoformat(ts), str(id_)
    except Exception as exc:
        raise Unprocessable("'after' is not a cursor this API returned", code="invalid_cursor") from exc


def paginate(session: Session, stmt: Select, model: Any, limit: int, after: str | None) -> tuple[list[Any], bool, str | None]:
    """Run ``stmt`` (already filtered to the tenant) newest first; return (rows, has_more, next_cursor)."""
    if after:
        ts, id_ = decode_cursor(after)
        stmt = stmt.where(or_(model.created_at < ts, and_(model.created_at == ts, model.id < id_)))
    rows = list(session.scalars(stmt.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)))
    has_more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor(rows[-1].created_at, rows[-1].id) if has_more and rows else None
    return rows, has_more, next_cursor
