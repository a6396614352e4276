"""Function calling: tools reach each provider in its own form, and the calls it streams back
come out as ``tool_call`` events with end reason ``tool_calls``, adapters and end to end."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from typing import Any

import httpx
import pytest

from tests.anthropic_server import AnthropicServer
from tests.model_server import Answer, ModelServer, ToolCall
from tests.servers import Gateway
from tests.test_token_path import collect_until_end, start
from tokenbridge.exceptions import InvalidEntry, ProviderError
from tokenbridge.producer.jobs import Message
from tokenbridge.producer.models import (
    AnthropicChatModel,
    ChatModel,
    ChatRequest,
    Delta,
    DemoModel,
    Finish,
    GenerationParams,
    OpenAIChatModel,
    ToolCallDelta,
)
from tokenbridge.wire.events import Event, decode_entry

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "default": None}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
TWO_CALLS = (
    ToolCall("get_weather", ('{"ci', 'ty": "Pa', 'ris"}'), "call_a"),
    ToolCall("get_time", ("{}",), "call_b"),
)

# A conversation that already went through one round of tool use.
HISTORY: list[dict[str, Any]] = [
    {"role": "developer", "content": "use the tools"},
    {"role": "user", "content": "weather and time in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_a",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": ""}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
    {"role": "tool", "tool_call_id": "call_b", "content": "noon"},
    {"role": "user", "content": "thanks; and tomorrow?"},
]


def tools_request(**params: Any) -> ChatRequest:
    messages = [Message.model_validate(m).model_dump() for m in HISTORY]
    options: dict[str, Any] = {"tools": [WEATHER, TIME], **params}
    return ChatRequest(messages=messages, params=GenerationParams.model_validate(options))


async def collect_all(model: ChatModel, request: ChatRequest) -> list[Any]:
    async with asyncio.timeout(10), aclosing(model.stream(request)) as items:
        return [item async for item in items]


def joined_calls(items: list[Any]) -> dict[int, dict[str, str]]:
    """Calls by index: the id and name of the first fragment, the arguments concatenated."""
    calls: dict[int, dict[str, str]] = {}
    for item in items:
        if isinstance(item, ToolCallDelta):
            call = calls.setdefault(item.index, {"id": "", "name": "", "arguments": ""})
            if item.call_id:
                assert not call["id"], "call_id only on the first fragment"
                call["id"], call["name"] = item.call_id, item.name
            call["arguments"] += item.arguments
    return calls


@pytest.fixture
def openai_server() -> Iterator[ModelServer]:
    with ModelServer() as srv:
        yield srv


@pytest.fixture
def anthropic_server() -> Iterator[AnthropicServer]:
    with AnthropicServer() as srv:
        yield srv


@pytest.fixture
async def openai_model(openai_server: ModelServer) -> AsyncIterator[OpenAIChatModel]:
    model = OpenAIChatModel("gpt-test", openai_server.model_config())
    yield model
    await model.aclose()


@pytest.fixture
async def anthropic_model(anthropic_server: AnthropicServer) -> AsyncIterator[AnthropicChatModel]:
    model = AnthropicChatModel("claude", anthropic_server.model_config())
    yield model
    await model.aclose()


# -- OpenAI-compatible adapter -------------------------------------------------------------


async def test_openai_forwards_tools_and_params(
    openai_server: ModelServer, openai_model: OpenAIChatModel
) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    request = tools_request(
        tool_choice=choice,
        parallel_tool_calls=False,
        user="u-42",
        response_format={"type": "json_object"},
        rate=3.0,
        cache=False,
    )
    await collect_all(openai_model, request)
    [body] = openai_server.requests
    assert body["tools"] == [WEATHER, TIME]  # the schema's null default kept
    assert body["tool_choice"] == choice
    assert body["parallel_tool_calls"] is False
    assert body["user"] == "u-42"
    assert body["response_format"] == {"type": "json_object"}
    assert "rate" not in body and "cache" not in body
    expected = [Message.model_validate(m).model_dump() for m in HISTORY]
    expected[0]["role"] = "system"  # developer: what every compatible server knows
    assert body["messages"] == expected
    assert body["messages"][2] == {"role": "assistant", "tool_calls": HISTORY[2]["tool_calls"]}


async def test_openai_streams_tool_call_fragments(
    openai_server: ModelServer, openai_model: OpenAIChatModel
) -> None:
    openai_server.reply = Answer(tokens=("Let", " me"), finish_reason="tool_calls",
                                 tool_calls=TWO_CALLS)  # fmt: skip
    items = await collect_all(openai_model, tools_request(tool_choice="required"))
    assert [i.text for i in items if isinstance(i, Delta)] == ["Let", " me"]
    assert joined_calls(items) == {
        0: {"id": "call_a", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        1: {"id": "call_b", "name": "get_time", "arguments": "{}"},
    }
    # id and name first, then one fragment per piece the provider sent, in order
    assert [i.arguments for i in items if isinstance(i, ToolCallDelta)] == [
        "",
        '{"ci',
        'ty": "Pa',
        'ris"}',
        "",
        "{}",
    ]
    finish = items[-1]
    assert isinstance(finish, Finish) and finish.reason == "tool_calls"
    assert openai_server.requests[0]["tool_choice"] == "required"


async def test_openai_tool_calls_without_index(
    openai_server: ModelServer, openai_model: OpenAIChatModel
) -> None:
    """Servers that omit ``index``: the id starts a call, id-less fragments continue it."""
    openai_server.reply = Answer(tokens=(), finish_reason="tool_calls", tool_calls=TWO_CALLS,
                                 tool_call_index=False)  # fmt: skip
    items = await collect_all(openai_model, tools_request())
    assert joined_calls(items) == {
        0: {"id": "call_a", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        1: {"id": "call_b", "name": "get_time", "arguments": "{}"},
    }


@pytest.mark.parametrize(
    ("given", "expected"),
    [("content_filter", "content_filter"), ("function_call", "tool_calls"), ("odd", "stop")],
)
async def test_openai_finish_reasons(
    openai_server: ModelServer, openai_model: OpenAIChatModel, given: str, expected: str
) -> None:
    openai_server.reply = Answer(finish_reason=given)
    items = await collect_all(openai_model, tools_request())
    assert items[-1].reason == expected


# -- Anthropic adapter ---------------------------------------------------------------------


async def test_anthropic_maps_tools_and_messages(
    anthropic_server: AnthropicServer, anthropic_model: AnthropicChatModel
) -> None:
    await collect_all(anthropic_model, tools_request(parallel_tool_calls=False, user="u-42"))
    [body] = anthropic_server.requests
    assert body["system"] == "use the tools"
    assert body["tools"] == [
        {"name": "get_weather", "description": "The weather in a city",
         "input_schema": WEATHER["function"]["parameters"]},  # type: ignore[index]
        {"name": "get_time", "input_schema": {"type": "object", "properties": {}}},
    ]  # fmt: skip
    assert body["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    assert body["metadata"] == {"user_id": "u-42"}
    assert body["messages"] == [
        {"role": "user", "content": "weather and time in Paris?"},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "call_a", "name": "get_weather",
             "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_b", "name": "get_time", "input": {}},
        ]},
        # both results, then the next question, in the one user turn after the calls
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_a", "content": "sunny"},
            {"type": "tool_result", "tool_use_id": "call_b", "content": "noon"},
            {"type": "text", "text": "thanks; and tomorrow?"},
        ]},
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", {"type": "auto"}),
        ("none", {"type": "none"}),
        ("required", {"type": "any"}),
        (
            {"type": "function", "function": {"name": "get_time"}},
            {"type": "tool", "name": "get_time"},
        ),
    ],
)
async def test_anthropic_tool_choice(
    anthropic_server: AnthropicServer,
    anthropic_model: AnthropicChatModel,
    choice: Any,
    expected: dict[str, Any],
) -> None:
    await collect_all(anthropic_model, tools_request(tool_choice=choice))
    assert anthropic_server.requests[0]["tool_choice"] == expected


async def test_anthropic_streams_tool_use_blocks(
    anthropic_server: AnthropicServer, anthropic_model: AnthropicChatModel
) -> None:
    anthropic_server.reply = Answer(tokens=("Let", " me"), finish_reason="tool_calls",
                                    tool_calls=TWO_CALLS)  # fmt: skip
    items = await collect_all(anthropic_model, tools_request())
    assert [i.text for i in items if isinstance(i, Delta)] == ["Let", " me"]
    assert joined_calls(items) == {
        0: {"id": "call_a", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        1: {"id": "call_b", "name": "get_time", "arguments": "{}"},
    }
    finish = items[-1]
    assert isinstance(finish, Finish) and finish.reason == "tool_calls"


async def test_anthropic_call_without_arguments_gets_an_empty_object(
    anthropic_server: AnthropicServer, anthropic_model: AnthropicChatModel
) -> None:
    """No input_json_delta at all: the call's arguments still concatenate to JSON."""
    anthropic_server.reply = Answer(tokens=(), finish_reason="tool_calls",
                                    tool_calls=(ToolCall("get_time", (), "call_t"),))  # fmt: skip
    items = await collect_all(anthropic_model, tools_request())
    assert joined_calls(items) == {0: {"id": "call_t", "name": "get_time", "arguments": "{}"}}


async def test_anthropic_refuses_arguments_that_are_not_an_object(
    anthropic_server: AnthropicServer, anthropic_model: AnthropicChatModel
) -> None:
    history = [dict(m) for m in tools_request().messages]
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}
    history[2] = {"role": "assistant", "tool_calls": [call]}
    with pytest.raises(ProviderError) as info:
        await collect_all(anthropic_model, ChatRequest(history, GenerationParams()))
    assert info.value.code == "invalid_tool_arguments"
    assert anthropic_server.requests == []


# -- End to end: POST /v1/generations, worker, Redis, native SSE ---------------------------


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_tool_calls_end_to_end(settings_factory: Any, provider: str) -> None:
    server_type = ModelServer if provider == "openai" else AnthropicServer
    reply = Answer(tokens=("ok",), finish_reason="tool_calls", tool_calls=TWO_CALLS)
    with server_type(reply) as srv:
        settings = settings_factory(models={"m": srv.model_config()})
        async with Gateway(settings) as gw, httpx.AsyncClient(base_url=gw.url) as http:
            started = await start(
                http, model="m", prompt=None, messages=HISTORY,
                params={"tools": [WEATHER, TIME], "tool_choice": "required"},
            )  # fmt: skip
            async with asyncio.timeout(10):
                events = await collect_until_end(
                    http, started["events_url"], started["generation_id"]
                )
    kinds = [e.event for e in events]
    assert kinds == ["start", "token"] + ["tool_call"] * 6 + ["end"]
    assert [e.data["seq"] for e in events] == list(range(len(events)))
    calls = [e.data for e in events if e.event == "tool_call"]
    assert calls[0] == {
        "generation_id": started["generation_id"], "seq": 2, "ts": calls[0]["ts"],
        "index": 0, "call_id": "call_a", "name": "get_weather", "arguments": "",
    }  # fmt: skip
    assert [(c["index"], c["arguments"]) for c in calls[1:]] == [
        (0, '{"ci'), (0, 'ty": "Pa'), (0, 'ris"}'), (1, ""), (1, "{}"),
    ]  # fmt: skip
    assert all("call_id" not in c and "name" not in c for c in calls[1:] if c["arguments"])
    assert {(c["index"], c["call_id"], c["name"]) for c in calls if "call_id" in c} == {
        (0, "call_a", "get_weather"), (1, "call_b", "get_time")
    }  # fmt: skip
    for index in (0, 1):
        json.loads("".join(c["arguments"] for c in calls if c["index"] == index))
    end = events[-1].data
    assert end["reason"] == "tool_calls"
    assert end["tokens"] == 1  # text tokens; the call fragments share seq, not this count
    body = srv.requests[0]
    if provider == "openai":
        assert body["tools"] == [WEATHER, TIME] and body["tool_choice"] == "required"
    else:
        assert [t["name"] for t in body["tools"]] == ["get_weather", "get_time"]
        assert body["tool_choice"] == {"type": "any"}
        assert body["messages"][1]["content"][0]["type"] == "tool_use"


# -- The wire: tool_call entries and the new end reasons -----------------------------------


def _raw(event: Event) -> dict[bytes, bytes]:
    return {str(k).encode(): str(v).encode() for k, v in event.to_fields().items()}


def test_tool_call_entries_round_trip() -> None:
    first = Event("tool_call", "g_1", 2, 5, index=0, call_id="call_a", name="f", arguments="")
    later = Event("tool_call", "g_1", 3, 6, index=1, arguments='{"a": 1}')
    assert decode_entry(_raw(first)) == first
    assert decode_entry(_raw(later)) == later
    assert later.to_data() == {
        "generation_id": "g_1", "seq": 3, "ts": 6, "index": 1, "arguments": '{"a": 1}'
    }  # fmt: skip
    fields = _raw(later)
    del fields[b"arguments"]
    with pytest.raises(InvalidEntry):
        decode_entry(fields)


@pytest.mark.parametrize("reason", ["tool_calls", "content_filter", "abandoned"])
def test_new_end_reasons_are_valid(reason: str) -> None:
    end = Event("end", "g_1", 4, 7, reason=reason, tokens=2)
    assert decode_entry(_raw(end)).reason == reason


async def test_answer_with_tool_calls_is_not_cached(settings_factory: Any) -> None:
    """A forced function call ends with ``stop`` (OpenAI's way): a cached replay would carry
    only the text, so such an answer must never be stored; a text answer still is."""
    forced = {"type": "function", "function": {"name": "get_weather"}}
    with ModelServer(Answer(tokens=("plain",))) as srv:
        srv.script(Answer(tokens=("ok",), finish_reason="stop", tool_calls=TWO_CALLS[:1]))
        settings = settings_factory(models={"m": srv.model_config()})
        async with Gateway(settings) as gw, httpx.AsyncClient(base_url=gw.url) as http:
            answers = []
            for params in ({"tools": [WEATHER], "tool_choice": forced}, {}):
                started = await start(http, model="m", params={"temperature": 0, **params})
                async with asyncio.timeout(10):
                    events = await collect_until_end(
                        http, started["events_url"], started["generation_id"]
                    )
                assert events[-1].data["reason"] == "stop"
                answer = await gw.runtime.cache._read_answer(
                    started["session_id"], started["generation_id"]
                )
                answers.append(answer)
    assert [e.event for e in events] == ["start", "token", "end"]
    with_calls, plain = answers
    assert with_calls is None
    assert plain is not None and plain["tokens"] == ["plain"]


# -- The demo model's forced calls ---------------------------------------------------------


async def test_demo_calls_a_forced_function_deterministically() -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    first = await collect_all(DemoModel(), tools_request(tool_choice=named, rate=0))
    again = await collect_all(DemoModel(), tools_request(tool_choice=named, rate=500))
    assert first == again  # pacing never changes the answer
    [call] = joined_calls(first).values()
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    assert list(json.loads(call["arguments"])) == ["city"]
    assert all(len(i.arguments) <= 8 for i in first if isinstance(i, ToolCallDelta))
    assert isinstance(first[-1], Finish) and first[-1].reason == "tool_calls"
    required = await collect_all(DemoModel(), tools_request(tool_choice="required", rate=0))
    assert joined_calls(required)[0]["name"] == "get_weather"  # the first tool
    auto = await collect_all(DemoModel(), tools_request(tool_choice="auto", rate=0, max_tokens=3))
    assert [type(i) for i in auto] == [Delta, Delta, Delta, Finish]
