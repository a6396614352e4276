"""`tokenbridge dlq list|replay|purge` and `tokenbridge consumers` against a real Redis."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from tests.servers import GatewayProcess, RedisServer
from tokenbridge.consumers.dead_letters import DeadLetters
from tokenbridge.wire.keys import Keys


async def cli(
    redis_server: RedisServer, prefix: str, *args: str
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "TOKENBRIDGE_REDIS_URL": redis_server.url,
        "TOKENBRIDGE_KEY_PREFIX": prefix,
    }
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tokenbridge", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_dlq_list_replay_purge(redis_server: RedisServer) -> None:
    prefix = "a" + secrets.token_hex(4)
    keys = Keys(prefix)
    source = f"{prefix}:src"
    client = aioredis.Redis.from_url(redis_server.url)
    async with client:
        await client.xgroup_create(source, "g", id="0", mkstream=True)
        ids = [await client.xadd(source, {"n": str(i)}) for i in range(3)]
        await client.xreadgroup("g", "c", {source: ">"})
        dlq = DeadLetters(client, keys.dead_letters)
        for i, entry_id in enumerate(ids[:2]):
            await dlq.move(source, "g", entry_id.decode(), {b"n": str(i).encode()}, "boom", 5, "c")

        listed = await cli(redis_server, prefix, "dlq", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        rows = [json.loads(line) for line in listed.stdout.splitlines()]
        assert [r["entry_id"] for r in rows] == [i.decode() for i in ids[:2]]
        assert rows[0]["error"] == "boom" and rows[0]["stream"] == source

        replayed = await cli(redis_server, prefix, "dlq", "replay", rows[0]["dlq_id"])
        assert replayed.returncode == 0 and "replayed 1" in replayed.stdout
        tail: Any = await client.xrevrange(source, count=1)
        assert tail[0][1] == {b"n": b"0"}  # back in its source stream, as a new entry

        purged = await cli(redis_server, prefix, "dlq", "purge", "--yes")
        assert purged.returncode == 0 and "purged 1" in purged.stdout
        assert await dlq.count() == 0
        pending: Any = await client.xpending(source, "g")
        assert pending["pending"] == 1  # the third entry: never dead-lettered, still pending


async def test_consumers_command_shows_groups_from_redis(redis_server: RedisServer) -> None:
    prefix = "a" + secrets.token_hex(4)
    client = aioredis.Redis.from_url(redis_server.url)
    async with client:
        jobs = Keys(prefix).jobs
        await client.xgroup_create(jobs, "workers", id="0", mkstream=True)
        await client.xadd(jobs, {"job": "{}"})
        await client.xreadgroup("workers", "w1", {jobs: ">"})
    shown = await cli(redis_server, prefix, "consumers", "--json")
    assert shown.returncode == 0, shown.stderr
    [group] = json.loads(shown.stdout)
    assert group["group"] == "workers" and group["pending"] == 1
    assert group["consumers"][0]["name"] == "w1"


async def test_admin_without_redis_url_is_one_clear_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENBRIDGE_")}
    env["TOKENBRIDGE_DATA_DIR"] = str(tmp_path)  # no local serve there: the default URL
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tokenbridge", "dlq", "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "cannot reach the gateway at http://127.0.0.1:8000" in done.stderr
    assert "TOKENBRIDGE_URL" in done.stderr and "TOKENBRIDGE_REDIS_URL" in done.stderr
    assert "Traceback" not in done.stderr


async def gateway_cli(url: str, key: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENBRIDGE_")}
    env.update({"TOKENBRIDGE_URL": url, "TOKENBRIDGE_API_KEY": key})
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tokenbridge", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_admin_commands_through_a_gateway(redis_server: RedisServer) -> None:
    """With TOKENBRIDGE_URL and TOKENBRIDGE_API_KEY (no Redis URL) the commands use the
    gateway's admin API and show what Redis holds."""
    prefix = "a" + secrets.token_hex(4)
    key = "tbk_cli_" + secrets.token_hex(8)
    gateway = GatewayProcess(
        {
            "TOKENBRIDGE_REDIS_URL": redis_server.url,
            "TOKENBRIDGE_KEY_PREFIX": prefix,
            "TOKENBRIDGE_AUTH_DISABLED": "false",
            "TOKENBRIDGE_API_KEYS": key,
        }
    )
    gateway.start()
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await gateway.wait_ready()
        source = f"{prefix}:src"
        await client.xgroup_create(source, "g", id="0", mkstream=True)
        entry_id = await client.xadd(source, {"n": "1"})
        dlq = DeadLetters(client, Keys(prefix).dead_letters)
        await dlq.move(source, "g", entry_id.decode(), {b"n": b"1"}, "boom", 5, "c")

        listed = await gateway_cli(gateway.url, key, "dlq", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        [row] = [json.loads(line) for line in listed.stdout.splitlines()]
        assert row["error"] == "boom" and row["stream"] == source
        replayed = await gateway_cli(gateway.url, key, "dlq", "replay", row["dlq_id"])
        assert replayed.returncode == 0 and "replayed 1" in replayed.stdout, replayed.stderr
        assert await dlq.count() == 0

        shown = await gateway_cli(gateway.url, key, "consumers", "--json")
        assert shown.returncode == 0, shown.stderr
        assert {g["group"] for g in json.loads(shown.stdout)} >= {"workers"}
        stats = await gateway_cli(gateway.url, key, "stats", "--json")
        assert stats.returncode == 0 and "total" in json.loads(stats.stdout), stats.stderr

        created = await gateway_cli(gateway.url, key, "keys", "create", "--name", "ops")
        assert created.returncode == 0, created.stderr
        new_key = created.stdout.strip().splitlines()[-1]
        assert new_key.startswith("tbk_")
        key_id = re.search(r"created key (\w+)", created.stdout)
        assert key_id is not None
        listed_keys = await gateway_cli(gateway.url, new_key, "keys", "list")
        assert "ops" in listed_keys.stdout, listed_keys.stderr  # the new key works too
        revoked = await gateway_cli(gateway.url, key, "keys", "revoke", key_id.group(1))
        assert revoked.returncode == 0, revoked.stderr

        refused = await gateway_cli(gateway.url, new_key, "keys", "list")
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert "TOKENBRIDGE_API_KEY" in refused.stderr
    finally:
        await client.aclose()
        gateway.stop()
