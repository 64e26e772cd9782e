"""SSEReader / NDJSONReader: the event-stream rules, and any split of the bytes giving the same
events as the whole."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from piuptime.llm.sse import MAX_LINE, NDJSONReader, SSEReader, StreamTooLarge, sse_event


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out = []
    start = 0
    for p in points:
        out.append(data[start:p])
        start = p
    out.append(data[start:])
    return out


def sse_all(data: bytes, cuts: list[int] | None = None) -> list[tuple[str, str]]:
    reader = SSEReader()
    out: list[tuple[str, str]] = []
    for piece in pieces(data, cuts or []):
        out += reader.feed(piece)
    return out + reader.close()


def nd_all(data: bytes, cuts: list[int] | None = None) -> list[bytes]:
    reader = NDJSONReader()
    out: list[bytes] = []
    for piece in pieces(data, cuts or []):
        out += reader.feed(piece)
    return out + reader.close()


# an OpenAI stream with the usual suspects: comments, CRLF, a named event, multi-line data
# and a multi-byte character (split mid-character by some cuts)
SSE_SAMPLE = (
    b": keep-alive\n\n"
    b'data: {"choices":[{"delta":{"content":"h\xc3\xa9llo \xe2\x82\xac"}}]}\r\n\r\n'
    b"event: ping\ndata: {}\n\n"
    b"data: line one\ndata: line two\n\n"
    b"id: 7\nretry: 100\ndata:no-space\n\n"
    b"data:  two spaces\r\rdata: [DONE]\n\n"
)
SSE_EXPECTED = [
    ("", '{"choices":[{"delta":{"content":"héllo €"}}]}'),
    ("ping", "{}"),
    ("", "line one\nline two"),
    ("", "no-space"),
    ("", " two spaces"),
    ("", "[DONE]"),
]


def test_sse_events() -> None:
    assert sse_all(SSE_SAMPLE) == SSE_EXPECTED


def test_sse_event_name_resets_after_dispatch() -> None:
    got = sse_all(b"event: a\ndata: 1\n\ndata: 2\n\n")
    assert got == [("a", "1"), ("", "2")]


def test_sse_event_without_data_is_not_dispatched() -> None:
    assert sse_all(b"event: a\n\nretry: 5\n\ndata: x\n\n") == [("", "x")]


def test_sse_empty_data_line_dispatches_empty_string() -> None:
    assert sse_all(b"data:\n\n") == [("", "")]


def test_sse_unterminated_last_event_is_dropped_at_close() -> None:
    reader = SSEReader()
    assert reader.feed(b"data: a\n\ndata: b") == [("", "a")]
    assert reader.close() == []


def test_sse_crlf_split_between_feeds() -> None:
    reader = SSEReader()
    assert reader.feed(b"data: a\r") == []
    assert reader.feed(b"\n\r") == []
    assert reader.feed(b"\n") == [("", "a")]


def test_sse_line_too_long() -> None:
    reader = SSEReader()
    with pytest.raises(StreamTooLarge):
        reader.feed(b"data: " + b"x" * MAX_LINE)


def test_sse_event_writer() -> None:
    assert sse_event(b"{}") == b"data: {}\n\n"
    assert sse_event(b"{}", b"message_start") == b"event: message_start\ndata: {}\n\n"
    assert sse_all(sse_event(b'{"a":1}', b"x") + sse_event(b"[DONE]")) == [
        ("x", '{"a":1}'),
        ("", "[DONE]"),
    ]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=40))
def test_sse_any_split_same_events(cuts: list[int]) -> None:
    assert sse_all(SSE_SAMPLE, cuts) == SSE_EXPECTED


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["", "message_start", "content_block_delta"]),
            st.lists(
                st.text(
                    alphabet=st.characters(
                        blacklist_categories=("Cs",), blacklist_characters="\r\n"
                    )
                ),
                max_size=3,
            ),
        ),
        max_size=8,
    ),
    st.sampled_from([b"\n", b"\r\n", b"\r"]),
    st.lists(st.integers(min_value=0, max_value=10_000), max_size=20),
)
def test_sse_generated_streams(
    events: list[tuple[str, list[str]]], eol: bytes, cuts: list[int]
) -> None:
    wire = b""
    expected = []
    for name, lines in events:
        if name:
            wire += b"event: " + name.encode() + eol
        for line in lines:
            wire += b"data: " + line.encode() + eol
        wire += eol
        if lines:
            expected.append((name, "\n".join(lines)))
    if wire.endswith(b"\r"):
        wire += b"\n"  # a CR as the stream's very last byte: see the xfail test below
    assert sse_all(wire, cuts) == expected


def test_sse_cr_as_last_byte_ends_the_event() -> None:
    assert sse_all(b"data: a\r\r") == [("", "a")]


NDJSON_SAMPLE = (
    b'{"message":{"content":"h\xc3\xa9"},"done":false}\n'
    b"\n"
    b'{"message":{"content":"\xe2\x82\xac"},"done":false}\r\n'
    b'{"done":true,"eval_count":2}'
)


def test_ndjson_lines() -> None:
    assert nd_all(NDJSON_SAMPLE) == [
        b'{"message":{"content":"h\xc3\xa9"},"done":false}',
        b'{"message":{"content":"\xe2\x82\xac"},"done":false}\r',
        b'{"done":true,"eval_count":2}',
    ]


def test_ndjson_blank_tail_at_close() -> None:
    reader = NDJSONReader()
    assert reader.feed(b"{}\n  ") == [b"{}"]
    assert reader.close() == []


def test_ndjson_line_too_long() -> None:
    with pytest.raises(StreamTooLarge):
        NDJSONReader().feed(b"x" * (MAX_LINE + 1))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=40))
def test_ndjson_any_split_same_lines(cuts: list[int]) -> None:
    assert nd_all(NDJSON_SAMPLE, cuts) == nd_all(NDJSON_SAMPLE)
