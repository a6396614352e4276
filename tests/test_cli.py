"""The ``tokenbridge`` command as users run it: a subprocess, its exit code and its output."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.servers import GatewayProcess, RedisServer
from tests.sse_client import read_events
from tests.test_embedded import accepts


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without TOKENBRIDGE_* (and COLUMNS: stderr is a pipe, as in a service)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENBRIDGE_")}
    env.pop("COLUMNS", None)
    env.update(extra)
    return env


async def run_cli(*args: str, env: dict[str, str], timeout_s: float = 30) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tokenbridge",
        *args,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


UNREACHABLE = "redis://127.0.0.1:1/0"
FAILURES = [
    pytest.param(["serve"], {"TOKENBRIDGE_PORT": "abc"}, "TOKENBRIDGE_PORT", id="serve-bad-port"),
    pytest.param(
        ["serve"],
        {"TOKENBRIDGE_STREAM_MAX_LEN": "-1"},
        "TOKENBRIDGE_STREAM_MAX_LEN",
        id="serve-bad-stream-max-len",
    ),
    pytest.param(["worker"], {}, "TOKENBRIDGE_REDIS_URL is not set", id="worker-no-redis-url"),
    pytest.param(
        ["worker"],
        {"TOKENBRIDGE_REDIS_URL": UNREACHABLE},
        "cannot reach Redis",
        id="worker-unreachable-redis",
    ),
]


@pytest.mark.parametrize(("args", "env", "expected"), FAILURES)
async def test_startup_error_is_one_line_and_exit_1(
    args: list[str], env: dict[str, str], expected: str
) -> None:
    code, out, err = await run_cli(*args, env=clean_env(**env))
    assert code == 1, (out, err)
    assert "Traceback" not in err and "Traceback" not in out
    assert len(lines(err)) == 1, err  # not wrapped at 80 columns either (stderr is a pipe)
    assert expected in err
    assert out == ""


async def test_generate_prints_the_stream(redis_server: RedisServer) -> None:
    env = {"TOKENBRIDGE_REDIS_URL": redis_server.url, "TOKENBRIDGE_KEY_PREFIX": fresh_prefix()}
    gateway = GatewayProcess(env)
    gateway.start()
    try:
        await gateway.wait_ready()
        args = ["generate", "hello from the cli", "--url", gateway.url]
        code, out, err = await run_cli(*args, "--max-tokens", "12", "--rate", "0", env=clean_env())
        assert code == 0, err
        assert "Traceback" not in err
        assert "12 tokens, reason length" in err
        found = re.search(r"session (\S+) generation (\S+)", err)
        assert found, err
        session_id, generation_id = found.groups()
        texts: list[str] = []
        url = f"/v1/sessions/{session_id}/events"
        async with (
            httpx.AsyncClient(base_url=gateway.url, timeout=30) as http,
            asyncio.timeout(10),
            contextlib.aclosing(read_events(http, url)) as stream,
        ):
            async for ev in stream:
                assert ev.data["generation_id"] == generation_id
                if ev.event == "token":
                    texts.append(ev.data["text"])
                if ev.event in ("end", "error"):
                    assert ev.event == "end" and ev.data["tokens"] == 12
                    break
        assert len(texts) == 12
        assert out == "".join(texts) + "\n"
    finally:
        gateway.stop()


def fresh_prefix() -> str:
    return "t" + secrets.token_hex(4)


def redis_pid_on(port: int) -> int | None:
    """The pid of the redis/valkey server on ``port``, from /proc.

    The server rewrites its title to ``/usr/bin/redis-server 127.0.0.1:<port>``; an unchanged
    command line has ``--port <port>``.
    """
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            words = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().split()
        except (OSError, UnicodeDecodeError):
            continue
        if not words or Path(words[0]).name not in ("redis-server", "valkey-server"):
            continue
        if f"127.0.0.1:{port}" in words or f"--port {port} " in " ".join(words) + " ":
            return int(entry.name)
    return None


@dataclass
class Stopped:
    """What became of ``tokenbridge serve`` (embedded Redis) after a SIGTERM."""

    exit_code: int
    output: str
    redis_port: int
    redis_pid: int
    redis_dir_left: bool


async def serve_embedded_then_sigterm() -> Stopped:
    gateway = GatewayProcess({}, args=["serve", "--ephemeral"])  # today's throwaway server
    gateway.args += ["--port", str(gateway.port)]
    gateway.env = clean_env()  # no TOKENBRIDGE_REDIS_URL: serve starts its own server
    gateway.start()
    assert gateway.process is not None and gateway.process.stdout is not None
    stdout = gateway.process.stdout
    try:
        seen: list[str] = []
        async with asyncio.timeout(30):
            while not any("tokenbridge serving at" in line for line in seen):
                line = (await asyncio.to_thread(stdout.readline)).decode()
                assert line, f"serve exited before serving: {''.join(seen)}"
                seen.append(line)
        embedded = [line for line in seen if line.startswith("embedded redis: ")]
        assert len(embedded) == 1, seen
        found = re.search(r" at redis://127\.0\.0\.1:(\d+)/0$", embedded[0].rstrip())
        assert found, embedded
        redis_port = int(found.group(1))
        redis_pid = redis_pid_on(redis_port)
        assert redis_pid is not None
        redis_dir = os.readlink(f"/proc/{redis_pid}/cwd")  # the server runs in its --dir
        assert Path(redis_dir).name.startswith("tokenbridge-redis-")
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            response = await http.get("/healthz")
        assert response.status_code == 200
        gateway.process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(gateway.process.wait, 30)
        output = "".join(seen) + (await asyncio.to_thread(stdout.read)).decode()
        dir_left = await asyncio.to_thread(os.path.exists, redis_dir)
        await asyncio.to_thread(shutil.rmtree, redis_dir, True)  # if serve did not
        return Stopped(code, output, redis_port, redis_pid, dir_left)
    finally:
        gateway.stop()


async def test_serve_with_embedded_redis_exits_0_and_cleans_up_on_sigterm() -> None:
    stopped = await serve_embedded_then_sigterm()
    assert stopped.exit_code == 0, stopped.output
    assert "Traceback" not in stopped.output
    # serve stopped its server (SIGTERM, then waited for it) before exiting: nothing is left.
    with pytest.raises(ProcessLookupError):
        os.kill(stopped.redis_pid, 0)
    assert not accepts(stopped.redis_port)
    assert not stopped.redis_dir_left


def test_the_server_spaces_out_garbage_collections() -> None:
    """``tokenbridge serve`` calls tune_gc() (gc_tuning.py); in a process of its own here,
    since freezing would keep this test process's garbage forever."""
    code = (
        "import gc\nfrom tokenbridge.gc_tuning import YOUNG_THRESHOLD, tune_gc\n"
        "tune_gc()\nassert gc.get_threshold()[0] == YOUNG_THRESHOLD > 700, gc.get_threshold()\n"
        "assert gc.get_freeze_count() > 1000, gc.get_freeze_count()\nprint('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr
