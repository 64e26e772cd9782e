"""Incremental readers for the two stream framings providers use, and the SSE writer.

``SSEReader`` follows the WHATWG event-stream rules that matter here: lines end in LF, CRLF or
CR; ``event:`` names the event, ``data:`` lines are joined with LF, a blank line dispatches;
comment lines (``:``) and unknown fields are ignored; one leading space after the colon is
dropped. ``NDJSONReader`` (Ollama) gives one item per non-blank line. Both take bytes split
anywhere, even inside a multi-byte character, and keep at most one unfinished line.
"""

from __future__ import annotations

__all__ = ["MAX_LINE", "NDJSONReader", "SSEReader", "StreamTooLarge", "sse_event"]

#: The longest line kept while waiting for its end: a provider that sends more without a line
#: break is broken (or hostile), and the stream ends with a protocol error.
MAX_LINE = 8 * 1024 * 1024


class StreamTooLarge(ValueError):
    """A line grew past ``MAX_LINE`` without ending."""


class SSEReader:
    """``feed(bytes) -> [(event, data)]``; ``event`` is ``""`` when the event named none."""

    __slots__ = ("_buf", "_data", "_event", "_has_data")

    def __init__(self) -> None:
        self._buf = b""
        self._event = ""
        self._data: list[str] = []
        self._has_data = False

    def feed(self, chunk: bytes) -> list[tuple[str, str]]:
        buf = self._buf + chunk if self._buf else chunk
        out: list[tuple[str, str]] = []
        if b"\r" in buf:
            # a CR at the very end may be the first half of CRLF: keep it for the next feed
            tail = b""
            if buf.endswith(b"\r"):
                buf, tail = buf[:-1], b"\r"
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n") + tail
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            self._line(buf[start:end], out)
            start = end + 1
        rest = buf[start:]
        if len(rest) > MAX_LINE:
            raise StreamTooLarge(f"an event-stream line is over {MAX_LINE} bytes")
        self._buf = rest
        return out

    def close(self) -> list[tuple[str, str]]:
        """The body ended: a last line without its line break still counts; an event without
        the blank line that ends it is dropped, as the standard says."""
        out: list[tuple[str, str]] = []
        buf = self._buf
        if buf.endswith(b"\r"):  # a CR-terminated line (a blank one dispatches the event)
            self._line(buf[:-1], out)
        elif buf:
            self._line(buf, out)
        self._buf = b""
        return out

    def _line(self, raw: bytes, out: list[tuple[str, str]]) -> None:
        if not raw:
            if self._has_data:
                out.append((self._event, "\n".join(self._data)))
            self._event = ""
            self._data = []
            self._has_data = False
            return
        line = raw.decode("utf-8", "replace")
        if line[0] == ":":
            return
        name, colon, value = line.partition(":")
        if colon and value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._has_data = True
        elif name == "event":
            self._event = value


class NDJSONReader:
    """``feed(bytes) -> [line]``: complete non-blank lines, without their line break."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self._buf + chunk if self._buf else chunk
        lines = buf.split(b"\n")
        rest = lines.pop()
        if len(rest) > MAX_LINE:
            raise StreamTooLarge(f"a JSON line is over {MAX_LINE} bytes")
        self._buf = rest
        return [line for line in lines if line.strip()]

    def close(self) -> list[bytes]:
        rest, self._buf = self._buf, b""
        return [rest] if rest.strip() else []


def sse_event(data: bytes, event: bytes | None = None) -> bytes:
    """One event on the wire. ``data`` must not contain line breaks (compact JSON never does)."""
    if event is None:
        return b"data: " + data + b"\n\n"
    return b"event: " + event + b"\ndata: " + data + b"\n\n"
