"""The OpenAI encodings as pure functions of a generation's events."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tokenbridge.gateway.encodings.base import GenerationInfo
from tokenbridge.gateway.encodings.openai_chat import ChatChunkEncoder, ChatOptions
from tokenbridge.gateway.encodings.openai_responses import (
    ResponsesEncoder,
    ResponsesOptions,
    events_of_final,
)
from tokenbridge.gateway.frames import Batch, Frame
from tokenbridge.wire.events import Event

GEN = "g_1"


def _frames(events: list[Event]) -> list[Batch]:
    return [Batch([Frame(f"1-{i}", "ep", e) for i, e in enumerate(events)])]


def _answer(reason: str = "stop", calls: bool = False) -> list[Event]:
    events = [Event("start", GEN, 0, model="demo"), Event("token", GEN, 1, text="Hi")]
    if calls:
        events.append(Event("tool_call", GEN, 2, index=0, call_id="c1", name="f", arguments="{}"))
    usage = {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
    return [*events, Event("end", GEN, len(events), reason=reason, tokens=1, usage=usage)]


def _run(events: list[Event]) -> tuple[ResponsesEncoder, str]:
    """The encoder after ``events``, and the type of the last event it wrote."""
    base = {"id": "resp_s_1", "object": "response", "model": "demo", "created_at": 1}
    encoder = ResponsesEncoder(ResponsesOptions(base, GEN))
    encoder.initial()
    body = (encoder.encode(_frames(events)) or b"").decode()
    return encoder, body.rsplit("event: ", 1)[-1].split("\n")[0]


def _responses(events: list[Event]) -> ResponsesEncoder:
    return _run(events)[0]


@pytest.mark.parametrize(
    ("reason", "status", "last"),
    [
        ("stop", "completed", "response.completed"),
        ("tool_calls", "completed", "response.completed"),
        ("length", "incomplete", "response.incomplete"),
        ("content_filter", "incomplete", "response.incomplete"),
        ("cancelled", "cancelled", "response.incomplete"),
        ("abandoned", "cancelled", "response.incomplete"),
    ],
)
def test_responses_end_reasons(reason: str, status: str, last: str) -> None:
    encoder, last_type = _run(_answer(reason))
    assert encoder.finished and encoder.status == status
    assert encoder.seq == 9  # created, in_progress, item, part, delta, 3 done, terminal
    assert last_type == last
    body = encoder.encode(_frames([Event("token", GEN, 9, text="late")]))
    assert body is None  # nothing after the terminal event


def test_responses_error_fails() -> None:
    events = [Event("start", GEN, 0), Event("token", GEN, 1, text="a")]
    encoder = _responses([*events, Event("error", GEN, 2, code="provider_error", message="boom")])
    snapshot = encoder.snapshot()
    assert snapshot["status"] == "failed" and snapshot["error"]["message"] == "boom"
    assert snapshot["output"][0]["status"] == "incomplete"


@pytest.mark.parametrize("reason", ["stop", "length", "cancelled", "content_filter"])
@pytest.mark.parametrize("calls", [False, True])
def test_final_object_rebuilds_the_same_response(reason: str, calls: bool) -> None:
    first = _responses(_answer(reason, calls)).snapshot()
    again = _responses(events_of_final(first, GEN)).snapshot()
    assert again == first


def test_starting_after_leaves_out_earlier_events() -> None:
    base = {"id": "resp_s_1"}
    encoder = ResponsesEncoder(ResponsesOptions(base, GEN, True, starting_after=2))
    head = encoder.preamble()
    assert head is None  # created (0) and queued (1) are not after 2
    body = (encoder.encode(_frames(_answer())) or b"").decode()
    numbers = [
        json.loads(line[6:])["sequence_number"]
        for line in body.split("\n")
        if line.startswith("data: ")
    ]
    assert numbers == list(range(3, 10))


def test_chat_chunks_and_ids() -> None:
    info = GenerationInfo(GEN, "demo", 1700000000)
    encoder = ChatChunkEncoder(ChatOptions("chatcmpl-s_1", include_usage=True), info, 900)
    body = (encoder.encode(_frames(_answer("tool_calls", calls=True))) or b"").decode()
    blocks = [b for b in body.split("\n\n") if b]
    ids = [b.split("\n")[0] for b in blocks]
    assert ids == [
        "id: ep:1-0",
        "id: ep:1-1",
        "id: ep:1-2",
        "id: ep:1-3",
        "id: ep:1-3.1",
        "id: ep:1-3.2",
    ]
    assert blocks[0].split("\n")[1] == "retry: 900"  # in a data block, once
    datas: list[Any] = [b.split("data: ", 1)[1] for b in blocks]
    assert datas[-1] == "[DONE]" and encoder.finished
    chunks = [json.loads(d) for d in datas[:-1]]
    assert chunks[2]["choices"][0]["delta"]["tool_calls"][0]["id"] == "c1"
    assert chunks[3]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[4]["choices"] == [] and chunks[4]["usage"]["total_tokens"] == 3
    assert encoder.keepalive() == b": ping\n" and encoder.closing("shutdown") is None
