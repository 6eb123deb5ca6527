"""Job events: the SSE decoder, following the live stream (and reconnecting after a drop), JSON pages."""

from __future__ import annotations

import json

import httpx
import pytest

from distillery_client import APIConnectionError
from distillery_client._sse import SSEDecoder
from tests.client.mock_api import chunks, replies, sdk


def event(seq: int, type: str = "epoch") -> dict:
    return {"seq": seq, "created_at": "2025-01-01T00:00:00Z", "level": "info", "type": type,
            "message": f"event {seq}", "data": {"n": seq}}


def sse(e: dict) -> bytes:
    """An event as the server writes it (app/api/routes/jobs.py _follow)."""
    return f"id: {e['seq']}\nevent: {e['type']}\ndata: {json.dumps(e)}\n\n".encode()


END = b"event: end\ndata: {}\n\n"
KEEP_ALIVE = b": keep-alive\n\n"


def test_the_decoder_reassembles_events_split_anywhere():
    stream = ("id: 7\r\nevent: started\r\ndata: {\"a\": \"\u00e9\"}\r\n\r\n: keep-alive\n\n"
              "data: one\ndata: two\r\r\n").encode()
    for cut in range(1, len(stream)):
        decoder = SSEDecoder()
        out = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert [(e.event, e.data, e.id) for e in out] == [("started", '{"a": "\u00e9"}', "7"),
                                                          ("message", "one\ntwo", "7")], cut
        assert decoder.last_id == "7"


def test_follow_reads_the_stream_until_end_and_asks_for_sse():
    body = sse(event(1, "started")) + KEEP_ALIVE + sse(event(2)) + END
    client, rec = sdk(replies(httpx.Response(200, content=chunks(body[:15], body[15:40], body[40:]),
                                             headers={"content-type": "text/event-stream"})))
    got = list(client.jobs.events("job_1", follow=True))
    assert [(e.seq, e.type, e.data) for e in got] == [(1, "started", {"n": 1}), (2, "epoch", {"n": 2})]
    assert rec.requests[0].headers["accept"] == "text/event-stream"
    assert rec.requests[0].url.params["after"] == "0"


def test_a_dropped_stream_is_reopened_after_the_last_seq_seen():
    dropped = httpx.Response(200, content=chunks(sse(event(1)), sse(event(2))[:10],
                                                 then=httpx.RemoteProtocolError("peer closed")))
    ended_early = httpx.Response(200, content=chunks(sse(event(3))))  # closed without 'end': reconnect too
    rest = httpx.Response(200, content=chunks(sse(event(4)), END))
    client, rec = sdk(replies(dropped, ended_early, rest))
    assert [e.seq for e in client.jobs.events("job_1", follow=True)] == [1, 3, 4]
    assert [r.url.params["after"] for r in rec.requests] == ["0", "1", "3"]
    assert len(rec.sleeps) == 2  # a backoff before each reconnect


def test_a_stream_that_keeps_dropping_without_events_gives_up():
    client, rec = sdk(replies(*[httpx.Response(200, content=chunks(KEEP_ALIVE, then=httpx.ReadError("reset")))
                                for _ in range(3)]), max_retries=2)
    with pytest.raises(APIConnectionError, match="dropped 3 times"):
        list(client.jobs.events("job_1", follow=True))
    assert len(rec.requests) == 3


def test_stopping_early_closes_the_stream():
    closed = []

    class Body(httpx.SyncByteStream):
        def __iter__(self):
            yield sse(event(1)) + sse(event(2))
            yield KEEP_ALIVE

        def close(self):
            closed.append(True)

    client, _ = sdk(replies(httpx.Response(200, stream=Body())))
    stream = client.jobs.events("job_1", follow=True)
    assert next(stream).seq == 1
    assert closed == []
    stream.close()  # what leaving a for loop early does once the iterator is dropped
    assert closed == [True]


def test_without_follow_events_come_in_json_pages():
    from distillery_client.resources.jobs import EVENTS_PAGE

    first = {"data": [event(i) for i in range(1, EVENTS_PAGE + 1)]}
    client, rec = sdk(replies(httpx.Response(200, json=first), httpx.Response(200, json={"data": [event(EVENTS_PAGE + 1)]})))
    assert len(list(client.jobs.events("job_1", after=0))) == EVENTS_PAGE + 1
    assert [r.url.params["after"] for r in rec.requests] == ["0", str(EVENTS_PAGE)]
    assert "accept" not in rec.requests[0].headers or rec.requests[0].headers["accept"] == "application/json"
