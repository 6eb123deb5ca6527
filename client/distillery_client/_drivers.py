"""The two drivers that run operations (``_flow.py``): one blocking (httpx.Client), one asyncio (httpx.AsyncClient).

Each driver performs the effects an operation yields and sends back their results; a failure of an effect
is thrown into the operation, which decides whether to retry. A driver closes every stream an operation left
open, also when the caller stops iterating early.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack
from typing import Any

import httpx

from distillery_client._flow import Close, Emit, Flow, Notify, Read, Sleep, T, Transmit

_DONE = object()


class _Steps:
    """One running operation: the next effect it wants, and the streams it has open."""

    def __init__(self, flow: Flow[Any]):
        self.flow = flow
        self.result: Any = None
        self.streams: list[httpx.Response] = []
        self.chunks: dict[int, Any] = {}  # id(response) -> its body iterator
        self._reply: Any = None
        self._error: BaseException | None = None

    def next(self) -> Any:
        """The next effect, or ``_DONE`` once the operation has returned (its value in ``result``)."""
        reply, error, self._reply, self._error = self._reply, self._error, None, None
        try:
            return self.flow.send(reply) if error is None else self.flow.throw(error)
        except StopIteration as done:
            self.result = done.value
            return _DONE

    def reply(self, value: Any) -> None:
        self._reply = value

    def fail(self, error: BaseException) -> None:
        self._error = error

    def opened(self, response: httpx.Response) -> httpx.Response:
        self.streams.append(response)
        return response

    def forget(self, response: httpx.Response) -> None:
        self.chunks.pop(id(response), None)
        if response in self.streams:
            self.streams.remove(response)


class SyncDriver:
    """Runs operations with a blocking ``httpx.Client``."""

    def __init__(self, http: httpx.Client, sleep: Callable[[float], None] | None = None):
        self.http = http
        self.sleep = sleep or time.sleep

    def run(self, flow: Flow[T]) -> T:
        """Run an operation that returns a value (it emits nothing)."""
        drive = self._drive(flow)
        try:
            next(drive)
        except StopIteration as done:
            return done.value
        drive.close()
        raise RuntimeError("an operation that returns a value emitted an item")

    def iterate(self, flow: Flow[Any]) -> Iterator[Any]:
        """The items an iterating operation emits, lazily."""
        return self._drive(flow)

    def _drive(self, flow: Flow[Any]) -> Any:
        steps = _Steps(flow)
        try:
            while (effect := steps.next()) is not _DONE:
                if isinstance(effect, Emit):
                    yield effect.value
                    continue
                try:
                    steps.reply(self._perform(effect, steps))
                except Exception as exc:  # noqa: BLE001 - the operation decides (retry, or raise it)
                    steps.fail(exc)
            return steps.result
        finally:
            flow.close()
            for response in steps.streams:
                response.close()

    def _perform(self, effect: Any, steps: _Steps) -> Any:
        if isinstance(effect, Transmit):
            req = effect.request
            with ExitStack() as files:
                response = self.http.send(req.build(self.http, files), stream=req.stream)
            if req.stream:
                steps.opened(response)
                if response.is_error:
                    response.read()  # a problem body is small; the operation reads it to raise the right error
            return response
        if isinstance(effect, Read):
            chunks = steps.chunks.setdefault(id(effect.response), effect.response.iter_bytes())
            return next(chunks, b"")
        if isinstance(effect, Close):
            steps.forget(effect.response)
            effect.response.close()
            return None
        if isinstance(effect, Sleep):
            return self.sleep(effect.seconds)
        if isinstance(effect, Notify):
            return effect.callback(effect.value)
        raise TypeError(f"unknown effect {effect!r}")


class AsyncDriver:
    """Runs operations with an ``httpx.AsyncClient``; callbacks may be plain functions or coroutines."""

    def __init__(self, http: httpx.AsyncClient, sleep: Callable[[float], Awaitable[Any]] | None = None):
        self.http = http
        self.sleep = sleep or asyncio.sleep

    async def run(self, flow: Flow[T]) -> T:
        steps = _Steps(flow)
        async for _ in self._drive(steps):
            raise RuntimeError("an operation that returns a value emitted an item")
        return steps.result

    def iterate(self, flow: Flow[Any]) -> AsyncIterator[Any]:
        return self._drive(_Steps(flow))

    async def _drive(self, steps: _Steps) -> AsyncIterator[Any]:
        try:
            while (effect := steps.next()) is not _DONE:
                if isinstance(effect, Emit):
                    yield effect.value
                    continue
                try:
                    steps.reply(await self._perform(effect, steps))
                except Exception as exc:  # noqa: BLE001 - the operation decides (retry, or raise it)
                    steps.fail(exc)
        finally:
            steps.flow.close()
            for response in steps.streams:
                await response.aclose()

    async def _perform(self, effect: Any, steps: _Steps) -> Any:
        if isinstance(effect, Transmit):
            req = effect.request
            with ExitStack() as files:
                response = await self.http.send(req.build(self.http, files), stream=req.stream)
            if req.stream:
                steps.opened(response)
                if response.is_error:
                    await response.aread()
            return response
        if isinstance(effect, Read):
            chunks = steps.chunks.setdefault(id(effect.response), effect.response.aiter_bytes())
            return await anext(chunks, b"")
        if isinstance(effect, Close):
            steps.forget(effect.response)
            await effect.response.aclose()
            return None
        if isinstance(effect, Sleep):
            return await self.sleep(effect.seconds)
        if isinstance(effect, Notify):
            result = effect.callback(effect.value)
            return await result if inspect.isawaitable(result) else result
        raise TypeError(f"unknown effect {effect!r}")
