"""The one SSE parser: what the adapters, the SDK and the tests' client rely on."""

from __future__ import annotations

from collections.abc import AsyncIterator

from tokenbridge.sse_parser import SSEMessage, parse_sse


async def lines(*items: str) -> AsyncIterator[str]:
    for item in items:
        yield item


async def test_messages_comments_ids_and_multiline_data() -> None:
    comments: list[str] = []
    source = lines(
        "retry: 1000", "", ": ping", "id: e:1-0", "event: token", "data: {\"a\":", "data:1}", "",
        "event: gap", "data: {}", "", "data: tail",
    )  # fmt: skip
    got = [m async for m in parse_sse(source, comments=comments)]
    assert got == [SSEMessage("token", '{"a":\n1}', "e:1-0"), SSEMessage("gap", "{}", None)]
    assert comments == ["ping"]


async def test_a_last_message_without_blank_line_only_when_asked() -> None:
    got = [m.data async for m in parse_sse(lines("data: a", "", "data: b"), partial_at_end=True)]
    assert got == ["a", "b"]
