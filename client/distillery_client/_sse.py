"""An incremental server-sent-events decoder (the WHATWG event-stream format).

Bytes in, whole events out: a chunk may end anywhere (inside a line, inside a UTF-8 character). Lines end
in LF, CRLF or CR; ``data`` lines of one event are joined with LF; a line starting with ``:`` is a comment
(the server's keep-alive); a blank line ends an event.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSentEvent:
    event: str
    data: str
    id: str | None


class SSEDecoder:
    def __init__(self) -> None:
        self._text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self._event, self._data, self._id = "", [], None
        self.last_id: str | None = None

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """The events completed by ``chunk``."""
        self._pending += self._text.decode(chunk)
        out = []
        while True:
            cut = _line_end(self._pending)
            if cut is None:
                return out
            end, after = cut
            line, self._pending = self._pending[:end], self._pending[after:]
            if (event := self._line(line)) is not None:
                out.append(event)

    def _line(self, line: str) -> ServerSentEvent | None:
        if not line:
            if not self._data and not self._event:
                return None
            event = ServerSentEvent(self._event or "message", "\n".join(self._data), self._id)
            self._event, self._data = "", []
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\x00" not in value:
            self._id = self.last_id = value
        return None


def _line_end(text: str) -> tuple[int, int] | None:
    """(end of the first line, start of the next) in ``text``, or None when no line is complete yet.

    A CR at the very end may be the first half of a CRLF split across chunks: wait for the next chunk."""
    lf, cr = text.find("\n"), text.find("\r")
    if cr == -1 or (lf != -1 and lf < cr):
        return None if lf == -1 else (lf, lf + 1)
    if cr + 1 == len(text):
        return None
    return (cr, cr + 2) if text[cr + 1] == "\n" else (cr, cr + 1)
