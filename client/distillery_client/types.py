"""Typed response objects: plain dataclasses built from the API's JSON.

Tolerant by design: a field the server adds later is ignored (it stays in ``raw``), a field it omits takes
its default. ``raw`` is the JSON object exactly as received (``to_dict()`` returns it). Timestamps are the
API's RFC 3339 strings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

Obj = TypeVar("Obj", bound="APIObject")

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True, kw_only=True)
class APIObject:
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    #: field name -> the APIObject class of its value (a dict), or of each item of its value (a list)
    _nested: ClassVar[dict[str, type[APIObject]]] = {}

    @classmethod
    def from_dict(cls: type[Obj], data: dict[str, Any]) -> Obj:
        known = {f.name for f in dataclasses.fields(cls)} - {"raw"}
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                continue
            nested = cls._nested.get(key)
            if nested is not None and isinstance(value, dict):
                value = nested.from_dict(value)
            elif nested is not None and isinstance(value, list):
                value = [nested.from_dict(v) if isinstance(v, dict) else v for v in value]
            values[key] = value
        return cls(raw=data, **values)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object the server sent."""
        return self.raw


@dataclass(frozen=True, kw_only=True)
class Model(APIObject):
    """An uploaded checkpoint (a teacher, or a student to train)."""

    id: str = ""
    name: str = ""
    format: str = ""
    task: str = ""
    size_bytes: int = 0
    sha256: str = ""
    num_parameters: int = 0
    architecture: dict[str, Any] | None = None
    io_schema: dict[str, Any] | None = None
    created_at: str = ""


@dataclass(frozen=True, kw_only=True)
class Dataset(APIObject):
    id: str = ""
    name: str = ""
    format: str = ""
    num_rows: int = 0
    size_bytes: int = 0
    sha256: str = ""
    has_labels: bool = False
    schema: dict[str, Any] | None = None
    created_at: str = ""


@dataclass(frozen=True, kw_only=True)
class JobError(APIObject):
    """Why a job failed: a stable ``code`` (docs/errors.md) and a sentence naming what to change."""

    code: str = ""
    message: str = ""


@dataclass(frozen=True, kw_only=True)
class Progress(APIObject):
    """Where a running job is: step ``step_index`` (0-based) of kind ``step_kind``, ``epoch`` of ``epochs``;
    ``fraction`` of the whole job done (0..1) and the estimated seconds left."""

    step_index: int | None = None
    step_kind: str | None = None
    epoch: int | None = None
    epochs: int | None = None
    fraction: float | None = None
    eta_seconds: float | None = None


@dataclass(frozen=True, kw_only=True)
class Job(APIObject):
    id: str = ""
    status: str = ""
    created_at: str = ""
    started_at: str | None = None
    finished_at: str | None = None
    spec: dict[str, Any] = field(default_factory=dict)
    progress: Progress | None = None
    metrics: dict[str, Any] | None = None
    error: JobError | None = None
    attempts: int = 0
    _nested: ClassVar[dict[str, type[APIObject]]] = {"progress": Progress, "error": JobError}

    @property
    def done(self) -> bool:
        """The job has ended (succeeded, failed or cancelled)."""
        return self.status in TERMINAL_STATUSES


@dataclass(frozen=True, kw_only=True)
class Event(APIObject):
    """One entry of a job's log; ``seq`` orders them (``events(after=seq)`` continues after it)."""

    seq: int = 0
    created_at: str = ""
    level: str = "info"
    type: str = ""
    message: str = ""
    data: dict[str, Any] | None = None


@dataclass(frozen=True, kw_only=True)
class MetricPoint(APIObject):
    """One value of a job's time series (e.g. ``train_loss`` at step 0, epoch 3)."""

    step: int = 0
    epoch: int = 0
    name: str = ""
    value: float = 0.0


@dataclass(frozen=True, kw_only=True)
class Artifact(APIObject):
    """A file a job produced: ``kind`` student | report | checkpoint | ...; ``sha256`` is also its ETag."""

    id: str = ""
    job_id: str = ""
    kind: str = ""
    format: str = ""
    step_index: int | None = None
    filename: str = ""
    size_bytes: int = 0
    sha256: str = ""
    created_at: str = ""


@dataclass(frozen=True, kw_only=True)
class Webhook(APIObject):
    """An endpoint that receives job events. ``secret`` (``whsec_…``) is present only in the answer to
    ``webhooks.create``: keep it to verify the signatures."""

    id: str = ""
    url: str = ""
    events: list[str] = field(default_factory=list)
    description: str | None = None
    enabled: bool = True
    secret: str | None = None
    created_at: str = ""
    disabled_reason: str | None = None


@dataclass(frozen=True, kw_only=True)
class WebhookDelivery(APIObject):
    """One event sent (or to be sent) to a webhook: ``status`` pending | succeeded | failed."""

    id: str = ""
    event_type: str = ""
    message_id: str = ""
    status: str = ""
    attempt: int = 0
    response_status: int | None = None
    latency_ms: float | None = None
    next_attempt_at: str | None = None
    last_error: str | None = None
    created_at: str = ""


@dataclass(frozen=True, kw_only=True)
class WebhookTest(APIObject):
    """The answer to ``webhooks.test``: the delivery of the ``webhook.test`` event it queued."""

    delivery_id: str = ""
