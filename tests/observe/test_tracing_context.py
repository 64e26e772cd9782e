"""W3C Trace Context parsing, tracestate checks and the sampling decision (no sockets)."""

from __future__ import annotations

import os
import re

import pytest

from piuptime.gateway.headers import traced_request_fields, upstream_request_headers
from piuptime.observe.tracing import (
    TRACESTATE_LIMIT,
    Tracer,
    clean_tracestate,
    parse_traceparent,
    split_host,
)

TID = b"4bf92f3577b34da6a3ce929d0e0e4736"
PID = b"00f067aa0ba902b7"
VALID = b"00-" + TID + b"-" + PID + b"-01"
TRACEPARENT = re.compile(rb"00-([0-9a-f]{32})-([0-9a-f]{16})-(0[01])\Z")


def test_valid_traceparent() -> None:
    assert parse_traceparent(VALID) == (TID, PID, True)
    assert parse_traceparent(VALID[:-2] + b"00") == (TID, PID, False)
    assert parse_traceparent(VALID[:-2] + b"03") == (TID, PID, True)  # other flag bits ignored
    # a future version: longer, fields after a dash, read as version 00
    assert parse_traceparent(b"cc" + VALID[2:] + b"-what-the-future-holds") == (TID, PID, True)
    assert parse_traceparent(b"cc" + VALID[2:]) == (TID, PID, True)


@pytest.mark.parametrize(
    "value",
    [
        b"",
        VALID[:-1],  # short
        VALID + b"-x",  # version 00 must be exactly 55 characters
        VALID + b"0",
        b"ff" + VALID[2:],  # version ff is invalid
        b"cc" + VALID[2:] + b"x",  # longer but no dash after the flags
        VALID.upper(),  # hex is lower-case
        b"00-" + TID.upper() + b"-" + PID + b"-01",
        b"00-" + b"0" * 32 + b"-" + PID + b"-01",  # all-zero trace id
        b"00-" + TID + b"-" + b"0" * 16 + b"-01",  # all-zero parent id
        b"00_" + TID + b"-" + PID + b"-01",
        b"00-" + TID + b"-" + PID + b"-0g",
        b"00-" + TID[:-1] + b"x-" + PID + b"-01",
        b"0-0" + TID + b"-" + PID + b"-01",
    ],
)
def test_invalid_traceparent(value: bytes) -> None:
    assert parse_traceparent(value) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"rojo=00f067aa0ba902b7", b"rojo=00f067aa0ba902b7"),
        (b"rojo=00f067aa0ba902b7,congo=t61rcWkgMzE", b"rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
        (b" a=1 ,  b=2 ", b"a=1 ,  b=2"),  # blanks around members allowed, kept
        (b"a=1,,b=2", b"a=1,,b=2"),  # empty members are allowed
        (b"tenant@vendor=x", b"tenant@vendor=x"),  # multi-tenant key
        (b"a/b*c_d-e=v a l", b"a/b*c_d-e=v a l"),  # spaces inside a value
    ],
)
def test_valid_tracestate_passes_unchanged(value: bytes, expected: bytes) -> None:
    assert clean_tracestate(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        b"A=1",  # upper-case key
        b"1a=1",  # a simple key starts with a letter
        b"a",  # no value
        b"a=",  # empty value
        b"a=1,a=2",  # duplicate key
        b"a=x,y",
        b"a=b=c",  # '=' inside a value
        b"a=1 ,b=x\x01",
        b"a=\xff",
        b",".join(b"k%d=v" % i for i in range(33)),  # more than 32 members
        b"a" * 257 + b"=v",  # key too long
        b"a=" + b"v" * 257,  # value too long
        b"",
        b" , ",
    ],
)
def test_invalid_tracestate_is_dropped(value: bytes) -> None:
    assert clean_tracestate(value) is None


def test_long_tracestate_is_cut_as_the_spec_says() -> None:
    big = b"big=" + b"x" * 200  # over 128 characters: removed first
    small = [b"k%02d=%s" % (i, b"v" * 20) for i in range(30)]
    value = b",".join([small[0], big, *small[1:]])
    cut = clean_tracestate(value)
    assert cut is not None and len(cut) <= TRACESTATE_LIMIT
    members = cut.split(b",")
    assert big not in members
    assert members == small[: len(members)]  # then from the end
    assert clean_tracestate(b",".join(small[:20])) == b",".join(small[:20])


def test_tracer_generates_ids_and_samples_by_ratio() -> None:
    never, always = Tracer(0.0), Tracer(1.0)
    seen = set()
    for _ in range(300):  # more than one pool of random ids
        t = never.start(None, None)
        assert re.fullmatch(rb"[0-9a-f]{32}", t.trace_id) and t.trace_id != b"0" * 32
        assert re.fullmatch(rb"[0-9a-f]{16}", t.span_id)
        assert t.parent_id is None and not t.sampled and t.attempts is None
        seen.add(t.trace_id)
        seen.add(t.span_id)
    assert len(seen) == 600
    assert always.start(None, None).sampled
    half = Tracer(0.5)
    share = sum(half.start(None, None).sampled for _ in range(2000)) / 2000
    assert 0.4 < share < 0.6


def test_incoming_flag_wins_over_the_ratio() -> None:
    t = Tracer(0.0).start(VALID, b"a=1")
    assert (t.trace_id, t.parent_id, t.sampled, t.state) == (TID, PID, True, b"a=1")
    assert t.span_id != PID
    t = Tracer(1.0).start(VALID[:-2] + b"00", None)
    assert not t.sampled and t.state is None
    # invalid traceparent: a new trace, and its tracestate is not passed on
    t = Tracer(0.0).start(VALID.upper(), b"a=1")
    assert t.trace_id != TID and t.parent_id is None and t.state is None


def test_several_traceparent_fields_are_invalid() -> None:
    t = Tracer().from_headers([(b"traceparent", VALID), (b"traceparent", VALID)])
    assert t.trace_id != TID and t.parent_id is None
    t = Tracer().from_headers(
        [(b"traceparent", VALID), (b"tracestate", b"a=1"), (b"tracestate", b"b=2")]
    )
    assert t.trace_id == TID and t.state == b"a=1,b=2"


def test_fields_carry_the_gateways_traceparent() -> None:
    args = {
        "host": b"devices",
        "client_ip": b"10.0.0.9",
        "proto": b"http",
        "original_host": b"gw",
        "via": b"1.1 piuptime",
    }
    client = [(b"accept", b"*/*"), (b"traceparent", VALID), (b"tracestate", b"a=1")]
    raw, trace = traced_request_fields(client, tracer=Tracer(), **args)  # type: ignore[arg-type]
    lines = raw.split(b"\r\n")
    sent = [x.split(b": ", 1)[1] for x in lines if x.startswith(b"traceparent: ")]
    assert sent == [b"00-" + TID + b"-" + trace.span_id + b"-01"]
    assert [x for x in lines if x.startswith(b"tracestate")] == [b"tracestate: a=1"]
    listed = upstream_request_headers(client, trace=trace, **args)  # type: ignore[arg-type]
    assert (b"traceparent", sent[0]) in listed and (b"tracestate", b"a=1") in listed
    # without a trace (a plugin's side request), the client's fields pass unchanged
    plain = upstream_request_headers(client, **args)  # type: ignore[arg-type]
    assert (b"traceparent", VALID) in plain and (b"tracestate", b"a=1") in plain
    raw, trace = traced_request_fields([], tracer=Tracer(), **args)  # type: ignore[arg-type]
    m = [TRACEPARENT.match(x[13:]) for x in raw.split(b"\r\n") if x.startswith(b"traceparent")]
    assert m and m[0] is not None and m[0].group(1) == trace.trace_id


def test_attempt_reparents_the_headers() -> None:
    tracer = Tracer(1.0)
    tracer.sink = _ListSink()
    trace = tracer.start(VALID, None)
    assert trace.attempts == []
    first = trace.span_id
    raw = b"x: 1\r\ntraceparent: 00-%s-%s-01\r\n" % (trace.trace_id, first)
    raw2 = trace.attempt(raw, "http://h:1", b"GET", b"/", 1.0, 2.0, 503, None)
    assert trace.span_id != first and raw2 == raw.replace(first, trace.span_id)
    listed = [(b"traceparent", trace.traceparent())]
    old = trace.span_id
    listed2 = trace.attempt(listed, "http://h:1", b"GET", b"/", 2.0, 3.0, None, OSError("x"))
    assert listed2 == [(b"traceparent", trace.traceparent())] and trace.span_id != old
    assert [a[0] for a in trace.attempts] == [first, old]
    assert trace.attempts[1][6:] == (None, "OSError", "x")


class _ListSink:
    url = "memory"

    def __init__(self) -> None:
        self.records: list[object] = []

    def put(self, record: object) -> None:
        self.records.append(record)

    async def aclose(self) -> None:
        pass


def test_split_host() -> None:
    assert split_host("example.com:8080") == ("example.com", 8080)
    assert split_host("example.com") == ("example.com", None)
    assert split_host("[::1]:80") == ("::1", 80)
    assert split_host("[::1]") == ("::1", None)
    assert split_host("h:x") == ("h", None)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_makes_its_own_ids() -> None:
    tracer = Tracer()
    tracer.start(None, None)  # fills the pool
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.write(w, tracer.start(None, None).trace_id)
        os._exit(0)
    os.close(w)
    child = os.read(r, 64)
    os.close(r)
    os.waitpid(pid, 0)
    assert len(child) == 32 and child != tracer.start(None, None).trace_id
