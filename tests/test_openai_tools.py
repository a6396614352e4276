"""Function calling through the OpenAI-compatible routes: ``tool_call`` wire events (written
here with a plain XADD, as any producer may, docs/wire-format.md) reach the ``openai`` SDK as
``tool_calls`` (Chat Completions) and ``function_call`` items (Responses)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import openai
import pytest
from redis.asyncio import Redis

from tests.anthropic_server import AnthropicServer
from tests.model_server import Answer, ModelServer, ToolCall
from tests.servers import Gateway
from tokenbridge.settings import Settings
from tokenbridge.wire.events import Event
from tokenbridge.wire.keys import Keys

T = TypeVar("T")

PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS: Any = [{"type": "function", "function": {"name": "get_weather", "parameters": PARAMETERS}}]


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client = Redis.from_url(settings.redis_url_value() or "")
    yield client
    await client.aclose()


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[openai.AsyncOpenAI]:
    async with (
        Gateway(settings, worker=False) as gw,  # the test is the producer
        openai.AsyncOpenAI(
            base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=30
        ) as client,
    ):
        yield client


async def produce_tool_calls(redis: Redis, keys: Keys, text: str = "") -> dict[str, Any]:
    """Take the next job off the job stream and answer it with two tool calls."""
    reply: Any = await redis.xread({keys.jobs: "0-0"}, count=1, block=10_000)
    assert reply, "no job was submitted"
    entry_id, fields = reply[0][1][0]
    job = json.loads(fields[b"job"])
    job["entry_id"] = entry_id
    gen, stream = job["generation_id"], keys.events(job["session_id"])
    events = [Event("start", gen, 0, model=job["model"])]
    if text:
        events.append(Event("token", gen, len(events), text=text))
    pieces = [(0, "call_a", "get_weather", '{"city": '), (0, "", "", '"Paris"}')]
    pieces += [(1, "call_b", "get_weather", '{"city": "Oslo"}')]
    for index, call_id, name, arguments in pieces:
        events.append(
            Event("tool_call", gen, len(events), index=index, call_id=call_id, name=name,
                  arguments=arguments)
        )  # fmt: skip
    usage = {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}
    events.append(Event("end", gen, len(events), reason="tool_calls", tokens=9, usage=usage))
    for event in events:
        await redis.xadd(stream, event.to_fields())  # type: ignore[arg-type]
    return job


async def with_producer(
    call: Awaitable[T], redis: Redis, keys: Keys, text: str = ""
) -> tuple[T, dict[str, Any]]:
    task = asyncio.ensure_future(call)
    job = await produce_tool_calls(redis, keys, text)
    async with asyncio.timeout(15):
        result = await task
    assert job["params"]["tools"][0]["function"]["name"] == "get_weather"
    return result, job


async def test_chat_tool_calls_non_stream(
    client: openai.AsyncOpenAI, redis: Redis, settings: Settings
) -> None:
    call = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "weather?"}], tools=TOOLS
    )
    completion, _ = await with_producer(call, redis, Keys(settings.key_prefix))
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls or []
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in calls] == [  # type: ignore[union-attr]
        ("call_a", "get_weather", {"city": "Paris"}),
        ("call_b", "get_weather", {"city": "Oslo"}),
    ]


async def test_chat_tool_calls_stream(
    client: openai.AsyncOpenAI, redis: Redis, settings: Settings
) -> None:
    async def consume() -> list[Any]:
        stream = await client.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": "weather?"}],
            tools=TOOLS,
            stream=True,
        )
        return [chunk async for chunk in stream]

    chunks, _ = await with_producer(consume(), redis, Keys(settings.key_prefix), text="Let me see.")
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(d.content or "" for d in deltas) == "Let me see."
    calls: dict[int, dict[str, str]] = {}
    for delta in deltas:
        for tc in delta.tool_calls or []:
            call = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += tc.id or ""
            call["name"] += (tc.function and tc.function.name) or ""
            call["arguments"] += (tc.function and tc.function.arguments) or ""
    assert calls == {
        0: {"id": "call_a", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        1: {"id": "call_b", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_responses_function_calls(
    client: openai.AsyncOpenAI, redis: Redis, settings: Settings
) -> None:
    tools: Any = [
        {
            "type": "function",
            "name": "get_weather",
            "parameters": TOOLS[0]["function"]["parameters"],
        }
    ]

    async def consume() -> tuple[list[Any], Any]:
        async with client.responses.stream(model="demo", input="weather?", tools=tools) as s:
            events = [e async for e in s]
            return events, await s.get_final_response()

    (events, final), job = await with_producer(
        consume(), redis, Keys(settings.key_prefix), text="Hm."
    )
    assert final.status == "completed" and final.output_text == "Hm."
    calls = [item for item in final.output if item.type == "function_call"]
    assert [(c.call_id, c.name, c.arguments) for c in calls] == [
        ("call_a", "get_weather", '{"city": "Paris"}'),
        ("call_b", "get_weather", '{"city": "Oslo"}'),
    ]
    kinds = [e.type for e in events]
    assert kinds.count("response.function_call_arguments.done") == 2
    # and the conversation continues with the calls' outputs
    outputs: Any = [
        {"type": "function_call_output", "call_id": c.call_id, "output": "sunny"} for c in calls
    ]
    follow = client.responses.create(
        model="demo", input=outputs, previous_response_id=final.id, extra_body={"rate": 0}
    )
    task = asyncio.ensure_future(follow)
    jobs = Keys(settings.key_prefix).jobs
    reply: Any = await redis.xread({jobs: job["entry_id"]}, count=1, block=10_000)
    assert reply, "the follow-up was not submitted"
    messages = json.loads(reply[0][1][0][1][b"job"])["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool"]
    assert messages[1]["content"] == "Hm."
    assert [c["id"] for c in messages[1]["tool_calls"]] == ["call_a", "call_b"]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# -- end to end: the adapters turn a provider's tool calls into the wire events ------------


@pytest.mark.parametrize("adapter", ["openai", "anthropic"])
async def test_model_server_tool_calls_end_to_end(adapter: str, settings_factory: Any) -> None:
    """A real local provider answers with a function call; the SDK gets it, whole and streamed,
    as Chat Completions ``tool_calls`` and as a Responses ``function_call`` item."""
    server_type = AnthropicServer if adapter == "anthropic" else ModelServer
    reply = Answer(tokens=("Checking.",), finish_reason="tool_calls", tool_calls=(ToolCall(),))
    with server_type(reply) as srv:
        settings = settings_factory(models={"m": srv.model_config()})
        async with (
            Gateway(settings) as gw,
            openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0) as client,
        ):
            messages: Any = [{"role": "user", "content": "weather in Paris?"}]
            whole = await client.chat.completions.create(model="m", messages=messages, tools=TOOLS)
            choice = whole.choices[0]
            assert choice.finish_reason == "tool_calls"
            [call] = choice.message.tool_calls or []
            assert call.function.name == "get_weather"  # type: ignore[union-attr]
            assert json.loads(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
            stream = await client.chat.completions.create(
                model="m", messages=messages, tools=TOOLS, stream=True
            )
            chunks = [c async for c in stream]
            arguments = "".join(
                tc.function.arguments or ""
                for c in chunks
                for tc in (c.choices[0].delta.tool_calls or [])
                if tc.function
            )
            assert json.loads(arguments) == {"city": "Paris"}
            assert chunks[-1].choices[0].finish_reason == "tool_calls"
            flat: Any = [{"type": "function", "name": "get_weather", "parameters": PARAMETERS}]
            response = await client.responses.create(model="m", input="weather?", tools=flat)
            calls = [item for item in response.output if item.type == "function_call"]
            assert [(c.name, json.loads(c.arguments)) for c in calls] == [
                ("get_weather", {"city": "Paris"})
            ]
        sent = srv.requests[0]
    if adapter == "openai":
        assert sent["tools"][0]["function"]["name"] == "get_weather"
    else:
        assert sent["tools"][0]["name"] == "get_weather"


async def test_demo_forced_call_then_the_answer(gateway: Gateway) -> None:
    """The demo model calls a function when tool_choice forces it; the conversation goes on
    with the call's output (Responses, previous_response_id)."""
    async with openai.AsyncOpenAI(
        base_url=gateway.url + "/v1", api_key="x", max_retries=0
    ) as client:
        flat: Any = [{"type": "function", "name": "get_weather", "parameters": PARAMETERS}]
        first = await client.responses.create(
            model="demo", input="weather?", tools=flat, tool_choice="required",
            extra_body={"rate": 0},
        )  # fmt: skip
        [call] = [item for item in first.output if item.type == "function_call"]
        assert call.name == "get_weather" and "city" in json.loads(call.arguments)
        outputs: Any = [{"type": "function_call_output", "call_id": call.call_id, "output": "sun"}]
        second = await client.responses.create(
            model="demo", input=outputs, previous_response_id=first.id, extra_body={"rate": 0}
        )
        assert second.status == "completed" and second.output_text
