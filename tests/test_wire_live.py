"""The non-Python producer contract of docs/wire-format.md ("Live delivery"), run as written."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.servers import RedisServer
from tokenbridge.gateway.client_connection import ClientConnection
from tokenbridge.gateway.fanout import SessionFanout
from tokenbridge.store.client import command_client
from tokenbridge.store.live import APPEND_SCRIPT
from tokenbridge.store.scripts import Scripts
from tokenbridge.wire.keys import Keys

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_the_documented_script_is_the_one_the_producer_runs() -> None:
    doc = (DOCS / "wire-format.md").read_text()
    linked = re.findall(r"\]\(\.\./(src/[^)]+\.lua)\)", doc) + re.findall(r"--eval (\S+)", doc)
    assert len(linked) == 3
    for path in linked:
        assert (ROOT / path).read_text() == APPEND_SCRIPT, path


def _redis_cli_lines() -> list[str]:
    doc = (DOCS / "wire-format.md").read_text()
    section = doc[doc.index("## Live delivery") :]
    block = re.findall(r"```\n(redis-cli --eval.*?)```", section, re.S)[0]
    return [cmd for cmd in block.replace("\\\n", " ").splitlines() if cmd.strip()]


@pytest.fixture
async def fanout(redis_server: RedisServer) -> AsyncIterator[SessionFanout]:
    redis: Any = command_client(redis_server.url, 8, 10)
    fan = SessionFanout(redis, Scripts(redis), Keys("tb"), probe_s=5.0)
    task = asyncio.create_task(fan.run())
    yield fan
    fan.stop()
    async with asyncio.timeout(10):
        await task
    await redis.aclose()
    await redis.connection_pool.disconnect()


@pytest.mark.skipif(shutil.which("redis-cli") is None, reason="needs redis-cli")
async def test_redis_cli_producer_reaches_a_subscribed_gateway(
    redis_server: RedisServer, fanout: SessionFanout
) -> None:
    await fanout.redis.delete(*(f"tb:{{s_7Jq2xLw}}:{k}" for k in ("events", "meta", "gens")))
    conn = ClientConnection("s_7Jq2xLw", "sse", 100)
    opening = await fanout.open(conn, None)  # subscribed before anything is written
    assert opening.history == []
    for line in _redis_cli_lines():
        command = line.replace("redis-cli", f"redis-cli -p {redis_server.port}", 1)
        done = subprocess.run(["bash", "-c", command], capture_output=True, timeout=30, cwd=ROOT)
        assert done.returncode == 0 and b"ERR" not in done.stdout, done.stdout + done.stderr
    events = []
    async with asyncio.timeout(10):
        while len(events) < 4:
            batches = await conn.next_batches(5)
            assert batches is not None
            events += [frame.event for batch in batches for frame in batch.frames]
    assert [e.kind for e in events] == ["start", "token", "token", "end"]
    assert "".join(e.text for e in events) == "Hello world"
