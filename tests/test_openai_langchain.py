"""LangChain's ``ChatOpenAI(base_url=...)`` and the docs example of the openai SDK, against a
live gateway."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import langchain_openai

from tests.servers import Gateway

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "openai_client.py"


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


async def test_docs_example_runs(gateway: Gateway) -> None:
    """docs/examples/openai_client.py, as a user runs it, against a live gateway."""
    env = {**os.environ, "TOKENBRIDGE_URL": gateway.url}
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLE), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, _ = await process.communicate()
    assert process.returncode == 0, out.decode()
    assert b"background: completed" in out and b"(40 tokens)" in out
