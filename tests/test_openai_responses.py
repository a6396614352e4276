"""The Responses API with the unmodified ``openai`` SDK against a real gateway on a socket."""

from __future__ import annotations

from collections.abc import AsyncIterator

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
