"""Slow clients bounded in bytes (issue 16, item 6): a reader at a tenth of a fast session's
speed is cut (``slow_client``) once its backlog passes the byte budget, long before the event
bound, and its resume continues exactly (or starts with ``gap``)."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import socket
from typing import Any

import httpx
import pytest

from tests.servers import Gateway
from tests.test_connections import dechunk, parse_sse
from tests.test_resume import assert_complete
from tests.test_token_path import collect_until_end, start

BUDGET = 128 * 1024
SEND_BUFFER = 16 * 1024
TOKENS = 20_000
RATE = 20_000  # tokens/s: about 2 MB/s of SSE
READ_BYTES_PER_S = 100_000  # the slow reader: about a tenth of that


async def _read_slowly(port: int, path: str, subscribed: asyncio.Event) -> bytes:
    """A raw-socket SSE reader with a small receive buffer, paced at READ_BYTES_PER_S; sets
    ``subscribed`` once its preamble (``retry:``) arrived."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    received = bytearray()
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        request = f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
        await loop.sock_sendall(sock, request.encode())
        while chunk := await loop.sock_recv(sock, 1024):
            received += chunk
            if b"retry:" in received:
                subscribed.set()
            await asyncio.sleep(len(chunk) / READ_BYTES_PER_S)  # the pace, not a sync
    finally:
        sock.close()
    return bytes(received)


async def test_reader_at_a_tenth_of_the_speed_is_cut_within_its_byte_budget_and_resumes(
    settings_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_factory(
        connection_max_buffered_events=1_000_000,  # the event bound would never cut it
        connection_max_buffered_bytes=BUDGET,
        connection_send_buffer_bytes=SEND_BUFFER,
        fanout_batch_events=100,  # (was the XREAD fan-out's read count)
    )
    session = "slowb-" + secrets.token_hex(4)
    path = f"/v1/sessions/{session}/events"
    caplog.set_level(logging.INFO, logger="tokenbridge.gateway.client_connection")
    async with Gateway(settings) as gw, httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        subscribed = asyncio.Event()
        reader = asyncio.create_task(_read_slowly(gw.port, path, subscribed))
        async with asyncio.timeout(60):
            await subscribed.wait()  # subscribed before the first token
            started = await start(
                http, session_id=session, params={"max_tokens": TOKENS, "rate": RATE}
            )
            first, comments = parse_sse(dechunk(await reader))
        assert comments[-1] == "closed slow_client"
        assert not any(e.event == "end" for e in first)  # cut mid-answer
        [held] = [int(m) for m in re.findall(r"buffered_bytes=(\d+)", caplog.text)]
        assert 0 < held <= BUDGET  # cut within its byte budget
        gen = started["generation_id"]
        async with asyncio.timeout(60):
            rest = await collect_until_end(http, path, gen, last_event_id=first[-1].id)
    if rest[0].event == "gap":
        assert rest[-1].event == "end"  # told, then the rest
    else:
        assert rest[0].data["seq"] == first[-1].data["seq"] + 1  # continues exactly
        assert_complete([e for e in first if e.event != "gap"] + rest, gen, TOKENS)
