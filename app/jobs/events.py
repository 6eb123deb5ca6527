"""Append-only job events and metric points (what ``/events`` and ``/metrics`` serve)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.clock import utcnow
from app.db.models import JobEvent, JobMetric


def append_event(session: Session, job_id: str, type: str, message: str, *, level: str = "info",
                 data: dict[str, Any] | None = None) -> None:
    """Add an event with the next ``seq`` for the job. Two writers racing for one seq retry."""
    for _ in range(5):
        nested = session.begin_nested()
        try:
            seq = (session.scalar(select(func.max(JobEvent.seq)).where(JobEvent.job_id == job_id)) or 0) + 1
            session.execute(insert(JobEvent).values(job_id=job_id, seq=seq, created_at=utcnow(), level=level,
                                                    type=type, message=message, data=data))
            nested.commit()
            return
        except IntegrityError:
            nested.rollback()
    raise RuntimeError(f"could not append an event to {job_id} after 5 tries")


def append_metric(session: Session, job_id: str, *, step: int, epoch: int, name: str, value: float) -> None:
    session.execute(insert(JobMetric).values(job_id=job_id, step=step, epoch=epoch, name=name, value=float(value),
                                             created_at=utcnow()))
