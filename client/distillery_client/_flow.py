"""Operations written once, run by a blocking or an asyncio driver.

Every SDK operation (a request with retries, following an event stream, waiting for a job, a resumable
download) is a generator that *yields effects* and receives their results. It never touches the network
itself, so the same code serves :class:`~distillery_client.Client` and
:class:`~distillery_client.AsyncClient`; only the driver (``_drivers.py``) differs.

The effects:

- :class:`Transmit` — send one HTTP request; the reply is the ``httpx.Response`` (with ``stream=True`` its
  body is still unread, unless the status is an error). A transport failure is *thrown into* the generator.
- :class:`Read` — the next chunk of a streamed body, ``b""`` at its end (failures thrown in, as above).
- :class:`Close` — release a streamed response early (the driver closes any left open when the operation ends).
- :class:`Sleep` — wait before a retry or the next poll.
- :class:`Notify` — call a user callback (an async driver awaits it when it returns an awaitable).
- :class:`Emit` — hand one item to the caller of an iterating operation (``jobs.list()``, ``jobs.events()``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar, Union

import httpx

T = TypeVar("T")
#: An operation: yields effects, is sent their results, returns ``T``.
Flow = Generator[Any, Any, T]

FileSource = Union[str, "os.PathLike[str]", IO[bytes]]


@dataclass(frozen=True)
class HttpRequest:
    """One API request, before it is bound to a client.

    ``files`` maps a form field to ``(filename, source)``; a path source is opened afresh for every attempt
    (and a file object rewound by httpx), so a retried upload sends the whole file again. ``replayable``:
    sending it twice is harmless (reads, deletes, cancel, a create carrying an ``Idempotency-Key``).
    """

    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    data: dict[str, str] | None = None
    files: dict[str, tuple[str, FileSource]] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    stream: bool = False
    replayable: bool = True

    def build(self, http: httpx.Client | httpx.AsyncClient, stack: ExitStack) -> httpx.Request:
        """The httpx request; files opened here are closed by ``stack`` once the attempt is over."""
        files = None
        if self.files:
            files = {name: (filename, stack.enter_context(open(src, "rb")) if isinstance(src, (str, os.PathLike))
                            else src)
                     for name, (filename, src) in self.files.items()}
        params = {k: v for k, v in (self.params or {}).items() if v is not None}
        return http.build_request(self.method, self.path, params=params or None, json=self.json, data=self.data,
                                  files=files, headers=self.headers)


@dataclass(frozen=True)
class Transmit:
    request: HttpRequest


@dataclass(frozen=True)
class Read:
    response: httpx.Response


@dataclass(frozen=True)
class Close:
    response: httpx.Response


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Notify:
    callback: Callable[[Any], Any]
    value: Any


@dataclass(frozen=True)
class Emit:
    value: Any
