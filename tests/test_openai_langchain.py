"""LangChain's ``ChatOpenAI(base_url=...)`` invokes and streams through the gateway."""

from __future__ import annotations

import pytest

from tests.servers import Gateway

langchain_openai = pytest.importorskip("langchain_openai")


async def test_chat_openai_invokes_and_streams(gateway: Gateway) -> None:
    llm = langchain_openai.ChatOpenAI(
        base_url=gateway.url + "/v1",
        api_key="unused",
        model="demo",
        max_retries=0,
        max_tokens=9,
        stream_usage=True,
        extra_body={"rate": 0},
    )
    answer = await llm.ainvoke("hello from langchain")
    assert len(str(answer.content).split()) == 9
    assert answer.response_metadata["finish_reason"] == "length"
    chunks = [chunk async for chunk in llm.astream("hello from langchain")]
    assert "".join(str(c.content) for c in chunks) == answer.content
    streamed_usage = [c.usage_metadata for c in chunks if c.usage_metadata]
    assert streamed_usage and streamed_usage[-1]["output_tokens"] == 9
