"""The wire format: entry decoding, key names, event ids, and bad entries skipped end to end."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from tests.servers import Gateway
from tests.sse_client import SSEEvent, read_events
from tokenbridge.exceptions import InvalidEntry, InvalidRequest
from tokenbridge.gateway.frames import format_event_id, parse_entry_id, parse_event_id
from tokenbridge.producer.jobs import GenerationJob, Message
from tokenbridge.producer.producer import Producer, _Writer
from tokenbridge.store.live import AppendCommand
from tokenbridge.wire.events import SCHEMA, Event, decode_entry, event_from_data
from tokenbridge.wire.keys import Keys, new_generation_id, new_session_id, validate_id

TS = 1_700_000_000_123


def as_redis(fields: dict[str, str | int]) -> dict[bytes, bytes]:
    """Fields as redis-py returns them from XRANGE/XREAD: bytes keys and values."""
    return {k.encode(): str(v).encode() for k, v in fields.items()}


EVENTS = [
    Event("start", "g_1", 0, ts=TS, model="demo"),
    Event("start", "g_1", 0, ts=TS, model="demo", cached=True),
    Event("start", "g_1", 0, ts=TS),
    Event("token", "g_1", 1, ts=TS, text="héllo\nwörld 🎉"),
    Event("token", "g_1", 2, ts=TS, text=""),
    Event("end", "g_1", 3, ts=TS, reason="stop", tokens=2),
    Event("end", "g_1", 3, ts=TS, reason="length", tokens=2, usage={"prompt_tokens": 1}),
    Event("end", "g_1", 3, ts=TS, reason="cancelled", tokens=0, usage={}),
    Event("error", "g-2_X", 9, ts=TS, code="provider_error", message="it broke"),
    Event("error", "g-2_X", 9, ts=TS, code="worker_lost"),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: f"{e.kind}")
def test_decode_round_trips_every_kind(event: Event) -> None:
    assert decode_entry(as_redis(event.to_fields())) == event


def token_fields(**changes: bytes | None) -> dict[bytes, bytes]:
    fields = as_redis(Event("token", "g_1", 1, ts=TS, text="hi").to_fields())
    for name, value in changes.items():
        if value is None:
            fields.pop(name.encode(), None)
        else:
            fields[name.encode()] = value
    return fields


def end_fields(**changes: bytes | None) -> dict[bytes, bytes]:
    event = Event("end", "g_1", 3, ts=TS, reason="stop", tokens=2, usage={"prompt_tokens": 1})
    fields = as_redis(event.to_fields())
    for name, value in changes.items():
        if value is None:
            fields.pop(name.encode(), None)
        else:
            fields[name.encode()] = value
    return fields


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param(token_fields(v=None), id="missing-v"),
        pytest.param(token_fields(v=b"2"), id="v-2"),
        pytest.param(token_fields(v=b""), id="v-empty"),
        pytest.param(token_fields(kind=b"chunk"), id="unknown-kind"),
        pytest.param(token_fields(kind=None), id="missing-kind"),
        pytest.param(token_fields(kind=b"\xfftoken"), id="kind-not-utf8"),
        pytest.param(token_fields(gen=None), id="missing-gen"),
        pytest.param(token_fields(seq=None), id="missing-seq"),
        pytest.param(token_fields(ts=None), id="missing-ts"),
        pytest.param(token_fields(seq=b"-1"), id="negative-seq"),
        pytest.param(token_fields(seq=b"one"), id="seq-not-numeric"),
        pytest.param(token_fields(seq=b"1.5"), id="seq-float"),
        pytest.param(token_fields(seq=b""), id="seq-empty"),
        pytest.param(token_fields(seq=b" 1"), id="seq-space"),
        pytest.param(token_fields(seq=b"1" * 20), id="seq-20-digits"),
        pytest.param(token_fields(ts=b"-5"), id="negative-ts"),
        pytest.param(token_fields(gen=b"g 1"), id="gen-with-space"),
        pytest.param(token_fields(gen=b"g" * 65), id="gen-65-chars"),
        pytest.param(token_fields(gen=b""), id="gen-empty"),
        pytest.param(token_fields(gen=b"g_1\n"), id="gen-newline"),
        pytest.param(token_fields(gen=b"{g_1}"), id="gen-braces"),
        pytest.param(token_fields(text=b"\xff\xfe"), id="text-not-utf8"),
        pytest.param(token_fields(text=None), id="token-missing-text"),
        pytest.param(token_fields(text=b"x" * 1_000_001), id="text-too-long"),
        pytest.param(end_fields(usage=b"{"), id="usage-not-json"),
        pytest.param(end_fields(usage=b"\xff"), id="usage-not-utf8"),
        pytest.param(end_fields(usage=b"[1, 2]"), id="usage-list"),
        pytest.param(end_fields(usage=b'{"prompt_tokens": "1"}'), id="usage-str-value"),
        pytest.param(end_fields(usage=b'{"prompt_tokens": 1.5}'), id="usage-float-value"),
        pytest.param(end_fields(usage=b'{"prompt_tokens": true}'), id="usage-bool-value"),
        pytest.param(end_fields(usage=b'{"a": ' + b"9" * 5000 + b"}"), id="usage-huge-int"),
        pytest.param(end_fields(usage=b"[" * 100_000), id="usage-deeply-nested"),
        pytest.param(end_fields(reason=b"done"), id="unknown-end-reason"),
        pytest.param(end_fields(reason=None), id="end-missing-reason"),
        pytest.param(end_fields(tokens=b"two"), id="end-tokens-not-numeric"),
        pytest.param(
            {b"v": b"1", b"kind": b"error", b"gen": b"g_1", b"seq": b"1", b"ts": b"1"},
            id="error-missing-code",
        ),
        pytest.param({}, id="empty"),
        pytest.param({"v": "1", "kind": "token"}, id="str-keys"),
        pytest.param([(b"v", b"1")], id="not-a-dict"),
    ],
)
def test_decode_rejects_with_invalid_entry_only(fields: Any) -> None:
    with pytest.raises(InvalidEntry):
        decode_entry(fields)


def test_decode_ignores_unknown_fields() -> None:
    fields = token_fields(trace=b"abc")
    assert decode_entry(fields) == Event("token", "g_1", 1, ts=TS, text="hi")


# -- Keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize("session_id", ["s_1", new_session_id(), "A-z_9" * 12 + "abcd"])
def test_session_keys_share_one_hash_tag(session_id: str) -> None:
    keys = Keys("tbx")
    names = [keys.events(session_id), keys.meta(session_id), keys.generations(session_id)]
    for name in names:
        assert name.startswith("tbx:")
        assert name.count("{") == 1 and name.count("}") == 1
        assert name[name.index("{") + 1 : name.index("}")] == session_id
    assert len({key_slot(name.encode()) for name in names}) == 1
    assert keys.session_of(keys.events(session_id)) == session_id


@pytest.mark.parametrize(
    "value", ["a", "A-z_0", "x" * 64, new_session_id(), new_generation_id(), "-", "_"]
)
def test_validate_id_accepts(value: str) -> None:
    assert validate_id(value) == value


@pytest.mark.parametrize(
    "value", ["", "x" * 65, "bad$id", "a b", "a\n", "a/b", "é", "a{b}", "a:b", None, 5, b"s_1"]
)
def test_validate_id_rejects(value: object) -> None:
    with pytest.raises(InvalidRequest) as info:
        validate_id(value)
    assert (info.value.code, info.value.status_code) == ("invalid_session_id", 400)
    with pytest.raises(InvalidRequest) as info:
        validate_id(value, "generation_id")
    assert info.value.code == "invalid_generation_id"


# -- event ids ---------------------------------------------------------------------------------


@pytest.mark.parametrize("entry_id", ["0-0", "1700000000000-3", "18446744073709551615-0"])
def test_event_id_round_trip(entry_id: str) -> None:
    event_id = format_event_id("k3f9", entry_id)
    assert event_id == f"k3f9:{entry_id}"
    assert parse_event_id(event_id) == ("k3f9", entry_id)
    ms, _, seq = entry_id.partition("-")
    assert parse_entry_id(entry_id) == (int(ms), int(seq))


@pytest.mark.parametrize(
    "value",
    [
        "",
        "garbage",
        ":1-0",
        "ab:",
        "ab:1",
        "ab:1-",
        "ab:-1",
        "ab:x-1",
        "ab:1-0-0",
        "a b:1-0",
        "ab:1.0-0",
        "ab: 1-0",
        "a" * 65 + ":1-0",
        "ab:" + "1" * 21 + "-0",
        "ab:99999999999999999999-0",
        "ab:18446744073709551616-0",
        "ab:0-18446744073709551616",
        "ab:١٢-0",
        "ab:²-0",
    ],
)
def test_parse_event_id_rejects_garbage(value: str) -> None:
    with pytest.raises(ValueError):
        parse_event_id(value)


# -- end to end: a bad entry between good ones is skipped -------------------------------------


def hand_entry(kind: str, seq: int, **extra: str | int) -> dict[str, str | int]:
    return {"v": 1, "kind": kind, "gen": "g_hand", "seq": seq, "ts": TS, **extra}


async def fanout_invalid(http: httpx.AsyncClient) -> int:
    response = await http.get("/v1/status")
    assert response.status_code == 200
    return int(response.json()["fanout"]["invalid"])


async def test_garbage_entries_are_skipped_by_sse(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    session_id = new_session_id()
    key = Keys(gateway.settings.key_prefix).events(session_id)
    redis = Redis.from_url(gateway.settings.redis_url_value() or "")
    try:
        before = await fanout_invalid(http)
        # History: read by the SSE connection's XRANGE.
        await redis.xadd(key, hand_entry("start", 0, model="hand"))
        await redis.xadd(key, hand_entry("token", 1, text="Hello"))
        await redis.xadd(key, {"v": 1, "kind": "token", "gen": "g hand", "seq": "x"})
        events: list[SSEEvent] = []
        url = f"/v1/sessions/{session_id}/events"
        async with asyncio.timeout(10), contextlib.aclosing(read_events(http, url)) as stream:
            async for ev in stream:
                events.append(ev)
                if ev.event == "token" and ev.data["seq"] == 1:
                    # The history read is done (it sent this event): the rest arrives live.
                    # A plain-XADD producer announces its writes with an empty message on the
                    # session's shard channel (docs/wire-format.md, "Live delivery").
                    await redis.xadd(key, {"garbage": "\xff", "v": 7})
                    await redis.xadd(key, hand_entry("token", 2, text=" world"))
                    await redis.xadd(key, hand_entry("end", 3, reason="stop", tokens=2))
                    live = Keys(gateway.settings.key_prefix).live(session_id)
                    await redis.execute_command("SPUBLISH", live, "")
                if ev.event == "end":
                    break
        assert [(e.event, e.data["seq"]) for e in events] == [
            ("start", 0),
            ("token", 1),
            ("token", 2),
            ("end", 3),
        ]
        assert "".join(e.data.get("text", "") for e in events) == "Hello world"
        assert events[-1].data["reason"] == "stop" and events[-1].data["tokens"] == 2
        assert await fanout_invalid(http) == before + 2
    finally:
        await redis.aclose()


TOOL_CALLS = [
    Event("tool_call", "g_1", 1, ts=TS, index=0, call_id="call_1", name="get", arguments=""),
    Event("tool_call", "g_1", 2, ts=TS, index=0, arguments='{"city":"Paris"}'),
    Event("end", "g_1", 3, ts=TS, reason="tool_calls", tokens=0),
    Event("end", "g_1", 3, ts=TS, reason="abandoned", tokens=4),
]


@pytest.mark.parametrize("event", TOOL_CALLS, ids=lambda e: f"{e.kind}-{e.seq}-{e.reason}")
def test_tool_call_events_round_trip_in_redis_and_pipeline_json(event: Event) -> None:
    assert decode_entry(as_redis(event.to_fields())) == event
    assert event_from_data({"kind": event.kind, **event.to_data()}, "g_1") == event


def test_tool_call_fields_are_declared_once() -> None:
    first = Event("tool_call", "g_1", 1, ts=TS, index=2, call_id="c", name="f", arguments="{")
    assert first.to_fields() == {
        "v": "1", "kind": "tool_call", "gen": "g_1", "seq": "1", "ts": str(TS),
        "index": "2", "call_id": "c", "name": "f", "arguments": "{",
    }  # fmt: skip
    later = Event("tool_call", "g_1", 2, ts=TS, index=2, arguments="}")
    assert later.to_data() == {
        "generation_id": "g_1", "seq": 2, "ts": TS, "index": 2, "arguments": "}"
    }  # fmt: skip
    assert [s.name for s in SCHEMA["tool_call"]] == ["index", "call_id", "name", "arguments"]
    with pytest.raises(InvalidEntry):
        decode_entry(as_redis({**first.to_fields(), "index": "-1"}))


@pytest.mark.parametrize("text", ["plain", "héllo\r\nwörld", ""])
def test_producer_token_template_packs_what_the_general_xadd_packs(text: str) -> None:
    producer = Producer(
        None,  # type: ignore[arg-type]  # packing only: no Redis call
        None,  # type: ignore[arg-type]
        Keys("tb"),
        stream_max_len=10_000,
        retention_s=60,
        max_generation_s=60,
        max_pending=10,
    )
    job = GenerationJob(
        generation_id="g_1", session_id="s_1", model="demo",
        messages=[Message(role="user", content="hi")],
    )  # fmt: skip
    writer = _Writer(producer, job, asyncio.Event())
    event = Event("token", "g_1", 3, ts=TS, text=text)
    fields = [(k.encode(), v.encode()) for k, v in event.to_fields().items()]
    assert writer._event(event) == AppendCommand.event(fields)
