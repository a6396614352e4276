"""The Responses API with the unmodified ``openai`` SDK against a real gateway on a socket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from tests.servers import Gateway


@pytest.fixture
async def client(gateway: Gateway) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=30
    ) as client:
        yield client


async def test_non_stream(client: openai.AsyncOpenAI) -> None:
    response = await client.responses.create(
        model="demo", input="hello there", max_output_tokens=6, extra_body={"rate": 0}
    )
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert len(response.output_text.split()) == 6
    assert response.usage is not None and response.usage.output_tokens == 6


async def test_stream(client: openai.AsyncOpenAI) -> None:
    stream = await client.responses.create(
        model="demo", input="hello there", stream=True, extra_body={"rate": 0}
    )
    events = [event async for event in stream]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    types = [e.type for e in events]
    assert types[:5] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-1].response.output_text == deltas
    assert len(deltas.split()) == 40


async def test_stream_helper(client: openai.AsyncOpenAI) -> None:
    async with client.responses.stream(
        model="demo", input="hello there", extra_body={"rate": 0}
    ) as stream:
        text = "".join([e.delta async for e in stream if e.type == "response.output_text.delta"])
        final = await stream.get_final_response()
    assert final.output_text == text and final.status == "completed"


async def _text_of(stream: object) -> str:
    return "".join(
        [e.delta async for e in stream if e.type == "response.output_text.delta"]  # type: ignore[attr-defined]
    )


async def test_background_then_poll(client: openai.AsyncOpenAI) -> None:
    created = await client.responses.create(
        model="demo", input="poll me", background=True, extra_body={"rate": 400}
    )
    assert created.status == "queued" and created.background is True
    polled = await client.responses.retrieve(created.id)
    assert polled.id == created.id and polled.status in ("queued", "in_progress", "completed")
    # Wait for the end on the event stream (no sleep-polling), then poll again.
    replay = await client.responses.retrieve(created.id, stream=True)
    streamed = await _text_of(replay)
    done = await client.responses.retrieve(created.id)
    assert done.status == "completed" and done.output_text == streamed
    assert len(streamed.split()) == 40 and done.usage is not None


async def _events_through(client: openai.AsyncOpenAI, response_id: str, last: int) -> list[Any]:
    """Read a background response's stream up to sequence number ``last``, then drop it."""
    stream = await client.responses.retrieve(response_id, stream=True)
    events = []
    async for event in stream:
        events.append(event)
        if event.sequence_number == last:
            break
    await stream.close()
    return events


def _deltas(events: list[Any]) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


async def test_background_stream_resumed_with_retrieve(client: openai.AsyncOpenAI) -> None:
    created = await client.responses.create(
        model="demo", input="resume me", background=True, extra_body={"rate": 200}
    )
    first = await _events_through(client, created.id, 10)
    assert [e.sequence_number for e in first] == list(range(11))
    assert first[0].type == "response.created"
    rest = await client.responses.retrieve(created.id, stream=True, starting_after=10)
    events = [e async for e in rest]
    assert events[0].sequence_number == 11 and events[-1].type == "response.completed"
    final = events[-1].response
    assert _deltas(first) + _deltas(events) == final.output_text
    assert len(final.output_text.split()) == 40


async def test_background_stream_resumed_with_stream_helper(client: openai.AsyncOpenAI) -> None:
    created = await client.responses.create(
        model="demo", input="again", background=True, extra_body={"rate": 200}
    )
    first = await _events_through(client, created.id, 10)
    # The helper replays from event 0 (it needs response.created) and filters client-side.
    async with client.responses.stream(response_id=created.id, starting_after=10) as stream:
        events = [e async for e in stream]
        final = await stream.get_final_response()
    assert events[0].sequence_number == 11
    assert _deltas(first) + _deltas(events) == final.output_text
    assert len(final.output_text.split()) == 40


async def test_cancel_is_idempotent(client: openai.AsyncOpenAI) -> None:
    created = await client.responses.create(
        model="demo", input="slow", background=True, max_output_tokens=10_000,
        extra_body={"rate": 20},
    )  # fmt: skip
    first = await _events_through(client, created.id, 5)  # it runs
    assert first[-1].type == "response.output_text.delta"
    cancelled = await client.responses.cancel(created.id)
    assert cancelled.status == "cancelled"
    again = await client.responses.cancel(created.id)
    assert again.status == "cancelled" and again.output_text == cancelled.output_text
    polled = await client.responses.retrieve(created.id)
    assert polled.status == "cancelled"


async def test_previous_response_id_continues(client: openai.AsyncOpenAI) -> None:
    first = await client.responses.create(
        model="demo", input="first question", max_output_tokens=5, extra_body={"rate": 0}
    )
    second = await client.responses.create(
        model="demo",
        input="second question",
        previous_response_id=first.id,
        extra_body={"rate": 0},
    )
    assert second.previous_response_id == first.id
    # the demo model counts the prompt's words: both questions and the first answer
    assert second.usage is not None and second.usage.input_tokens == 2 + 5 + 2


async def test_delete(client: openai.AsyncOpenAI) -> None:
    created = await client.responses.create(
        model="demo", input="bye", max_output_tokens=3, extra_body={"rate": 0}
    )
    await client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.delete(created.id)


async def test_kept_response_outlives_its_stream(client: openai.AsyncOpenAI, gateway: Any) -> None:
    created = await client.responses.create(model="demo", input="keep me", extra_body={"rate": 0})
    session_id = created.id.removeprefix("resp_")
    redis = gateway.app.state.gateway.redis
    await redis.delete(gateway.app.state.gateway.keys.events(session_id))  # as if it expired
    polled = await client.responses.retrieve(created.id)
    assert polled.output_text == created.output_text and polled.status == "completed"
    async with client.responses.stream(response_id=created.id) as stream:
        events = [e async for e in stream]
        final = await stream.get_final_response()
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert final.output_text == created.output_text


async def test_response_lost_with_its_stream_says_so(settings_factory: Any) -> None:
    import json

    async with (
        Gateway(settings_factory(), worker=False) as gw,
        openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0) as client,
    ):
        created = await client.responses.create(model="demo", input="lost", background=True)
        state = gw.app.state.gateway
        key = f"{state.keys.prefix}:{{{created.id.removeprefix('resp_')}}}:openai"
        record = json.loads(await state.redis.hget(key, "response"))
        record["base"]["created_at"] -= 86_400  # a day ago, and no stream was ever written
        await state.redis.hset(key, "response", json.dumps(record))
        polled = await client.responses.retrieve(created.id)
        assert polled.status == "failed" and polled.error is not None


async def _wait_for_the_end(redis: Any, events_key: str) -> None:
    """Block on the session stream (no gateway reads it) until its terminal event."""
    last = "0-0"
    async with asyncio.timeout(30):
        while True:
            for _, entries in await redis.xread({events_key: last}, block=5000) or []:
                for entry_id, fields in entries:
                    last = entry_id
                    if fields[b"kind"] in (b"end", b"error"):
                        return


async def test_a_background_response_nobody_polls_keeps_its_final_past_its_stream(
    client: openai.AsyncOpenAI, gateway: Any
) -> None:
    created = await client.responses.create(
        model="demo", input="nobody reads me", background=True, extra_body={"rate": 0}
    )
    state = gateway.state
    session_id = created.id.removeprefix("resp_")
    await _wait_for_the_end(state.redis, state.keys.events(session_id))
    key = f"{state.keys.prefix}:{{{session_id}}}:openai"
    assert not await state.redis.hexists(key, "final")  # nobody has read it
    await state.response_keeper.sweep()  # (its own task sweeps once a minute)
    assert await state.redis.hexists(key, "final")
    assert session_id.encode() not in await state.redis.zrange(
        f"{state.keys.prefix}:openai:unfinished", 0, -1
    )
    await state.redis.delete(state.keys.events(session_id))  # as if stream_retention_s passed
    polled = await client.responses.retrieve(created.id)
    assert polled.status == "completed" and polled.output_text


async def test_one_unreadable_record_does_not_stop_the_keeper_keeping_the_others(
    client: openai.AsyncOpenAI, gateway: Any
) -> None:
    state = gateway.state
    unfinished = f"{state.keys.prefix}:openai:unfinished"
    # Listed first (oldest): a record that cannot be read (written by something else).
    await state.redis.hset(f"{state.keys.prefix}:{{s_bad}}:openai", "response", "not json")
    await state.redis.zadd(unfinished, {"s_bad": 1})
    created = await client.responses.create(
        model="demo", input="after a bad one", background=True, extra_body={"rate": 0}
    )
    session_id = created.id.removeprefix("resp_")
    await _wait_for_the_end(state.redis, state.keys.events(session_id))
    await state.response_keeper.sweep()
    assert await state.redis.hexists(f"{state.keys.prefix}:{{{session_id}}}:openai", "final")
    assert await state.redis.zrange(unfinished, 0, -1) == []  # the bad one is not kept listed


async def test_background_stream_from_create(client: openai.AsyncOpenAI) -> None:
    stream = await client.responses.create(
        model="demo", input="queued first", background=True, stream=True, extra_body={"rate": 0}
    )
    events = [e async for e in stream]
    assert [e.type for e in events[:3]] == [
        "response.created",
        "response.queued",
        "response.in_progress",
    ]
    assert events[0].response.status == "queued" and events[-1].type == "response.completed"
    stored = await client.responses.retrieve(events[0].response.id)
    assert stored.status == "completed" and stored.output_text == events[-1].response.output_text
