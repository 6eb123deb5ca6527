"""When a failed delivery is tried again: ``DISTILLERY_WEBHOOK_RETRY_SCHEDULE``, seconds after each failed
attempt. The first attempt goes out at once, so a delivery has ``1 + len(schedule)`` attempts; by default
(5 s, 5 min, 30 min, 2 h, 5 h, 10 h, as Standard Webhooks' reference service does) 7 over about 17.6 hours.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta


def max_attempts(schedule: Sequence[float]) -> int:
    return 1 + len(schedule)


def retry_at(now: datetime, attempts_made: int, schedule: Sequence[float]) -> datetime | None:
    """When attempt ``attempts_made + 1`` is due after attempt ``attempts_made`` failed at ``now``; None when
    that was the last one (the delivery has failed)."""
    if attempts_made < 1 or attempts_made > len(schedule):
        return None
    return now + timedelta(seconds=schedule[attempts_made - 1])
