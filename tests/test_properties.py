"""Property-based tests: no input makes the decoders raise anything but their documented error."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenbridge.exceptions import InvalidEntry, InvalidRequest
from tokenbridge.gateway.encodings.native_sse import NativeSSE, sse_message
from tokenbridge.gateway.encodings.websocket import WebSocketJSON
from tokenbridge.gateway.frames import Frame, parse_entry_id, parse_event_id
from tokenbridge.gateway.resume import parse_last_event_id
from tokenbridge.wire.events import Event, decode_entry
from tokenbridge.wire.keys import validate_id

FIELD_NAMES = [b"v", b"kind", b"gen", b"seq", b"ts", b"text", b"model", b"reason", b"tokens",
               b"usage", b"code", b"message", b"cached", b"other"]  # fmt: skip
VALUES = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"1", b"token", b"start", b"end", b"error", b"stop", b"g_1", b"0", b"-1",
                     b"{}", b'{"a":1}', b"[]", b"\xff", b"99999999999999999999"]),
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELD_NAMES) | st.binary(max_size=8), VALUES, max_size=10))
def test_decode_entry_raises_only_invalid_entry(fields: dict[bytes, bytes]) -> None:
    try:
        event = decode_entry(fields)
    except InvalidEntry:
        return
    assert isinstance(event, Event)


@settings(max_examples=200, deadline=None)
@given(
    st.builds(
        Event,
        kind=st.sampled_from(["start", "token", "end", "error"]),
        generation_id=st.from_regex(r"\A[A-Za-z0-9_-]{1,64}\Z"),
        seq=st.integers(0, 2**40),
        ts=st.integers(0, 2**45),
        text=st.text(max_size=50),
        model=st.text(max_size=20),
        reason=st.sampled_from(["stop", "length", "cancelled"]),
        tokens=st.integers(0, 10**6),
        code=st.text(min_size=0, max_size=20),
        message=st.text(max_size=30),
    )
)
def test_every_event_round_trips(event: Event) -> None:
    raw = {
        k.encode(): str(v).encode("utf-8", "surrogatepass") for k, v in event.to_fields().items()
    }
    try:
        decoded = decode_entry(raw)
    except InvalidEntry:
        # Only text with lone surrogates cannot be UTF-8: Redis would not store it either.
        assert any("\ud800" <= c <= "\udfff" for c in event.text + event.model + event.message +
                   event.code)  # fmt: skip
        return
    assert decoded.to_fields() == event.to_fields()


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=80), st.integers(), st.none(), st.binary(max_size=10)))
def test_validate_id_raises_only_invalid_request(value: object) -> None:
    try:
        assert validate_id(value) == value
    except InvalidRequest as exc:
        assert exc.code == "invalid_session_id"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_event_id_parsers_raise_only_their_errors(value: str) -> None:
    try:
        _epoch, entry_id = parse_event_id(value)
        assert parse_entry_id(entry_id) < (2**64, 0)
    except ValueError:
        pass
    try:
        parse_last_event_id(value)
    except InvalidRequest as exc:
        assert exc.code == "invalid_last_event_id"


@pytest.mark.parametrize("value", ["a:1-1", "ab_cd-9:0-0", "x:18446744073709551615-0"])
def test_event_ids_we_accept(value: str) -> None:
    assert parse_last_event_id(value) is not None


EVENTS = st.builds(
    Event,
    kind=st.sampled_from(["start", "token", "tool_call", "end", "error"]),
    generation_id=st.one_of(st.from_regex(r"\A[A-Za-z0-9_-]{1,64}\Z"), st.text(max_size=8)),
    seq=st.integers(0, 2**40),
    ts=st.integers(0, 2**45),
    text=st.one_of(st.text(max_size=50), st.sampled_from(['a"b', "a\\b", "\x7f", "\n", "é"])),
    model=st.text(max_size=20),
    reason=st.sampled_from(["stop", "length", "cancelled"]),
    code=st.text(max_size=20),
    message=st.text(max_size=30),
)


@settings(max_examples=400, deadline=None)
@given(EVENTS, st.one_of(st.just("3fa9c2d1"), st.text(max_size=10)))
def test_event_json_is_what_json_dumps_writes(event: Event, epoch: str) -> None:
    """The per-token formatting (SSE ``data:``, WebSocket messages) writes byte for byte what
    ``json.dumps`` of the same objects writes, whatever the text (quotes, controls, non-ASCII)."""
    assert event.data_json() == json.dumps(event.to_data(), separators=(",", ":"))
    frame = Frame("1700000000000-7", epoch, event)
    message = {"id": frame.event_id, "event": event.kind, "data": event.to_data()}
    assert WebSocketJSON().frame(frame) == json.dumps(message, separators=(",", ":"))
    assert NativeSSE().frame(frame) == sse_message(event.kind, event.to_data(), frame.event_id)
