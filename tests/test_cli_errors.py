"""A new user's first hour: every expected error of the CLI is one line naming what to change,
exit 1, no traceback; SIGTERM/SIGINT always end ``serve``. Real processes, real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.model_server import HttpError, ModelServer
from tests.servers import GatewayProcess, RedisServer, free_port
from tests.test_cli import clean_env, fresh_prefix, lines, redis_pid_on, run_cli
from tokenbridge.client import AsyncTokenBridgeClient


def assert_one_line(code: int, out: str, err: str, *expected: str) -> None:
    assert code == 1, (out, err)
    assert "Traceback" not in err and "Traceback" not in out, err
    assert len(lines(err)) == 1, err
    for text in expected:
        assert text in err, err


async def test_serve_on_a_taken_port_exits_1_with_one_line_at_once() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = clean_env(TOKENBRIDGE_AUTH_DISABLED="true")
        code, out, err = await run_cli("serve", "--port", str(port), env=env, timeout_s=5)
    assert_one_line(code, out, err, f"TOKENBRIDGE_PORT={port} (--port)", "already in use")
    assert out == ""  # nothing started: no embedded Redis line either


async def test_sigterm_ends_a_serve_that_failed_to_bind() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tokenbridge", "serve", "--port", str(port),
            env=clean_env(TOKENBRIDGE_AUTH_DISABLED="true"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            await asyncio.sleep(0.3)  # not a sync: the signal may land before or after the bind
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(5):
                _, err = await process.communicate()
        finally:
            if process.returncode is None:
                process.kill()
                await process.communicate()
    assert process.returncode in (1, -signal.SIGTERM), err
    assert b"Traceback" not in err


def _config_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "tokenbridge.toml"
    path.write_text(text)
    return str(path)


BAD = [
    pytest.param(
        ["serve"], {"TOKENBRIDGE_REDIS_URL": "redis://127.0.0.1:1/0"}, None,
        ["TOKENBRIDGE_REDIS_URL", "cannot reach Redis"], id="serve-unreachable-redis",
    ),
    pytest.param(
        ["serve"], {"TOKENBRIDGE_REDIS_URL": "http://127.0.0.1:1/0"}, None,
        ["TOKENBRIDGE_REDIS_URL", "not a Redis URL"], id="serve-redis-url-scheme",
    ),
    pytest.param(
        ["worker"], {"TOKENBRIDGE_REDIS_URL": "http://127.0.0.1:1/0"}, None,
        ["TOKENBRIDGE_REDIS_URL", "not a Redis URL"], id="worker-redis-url-scheme",
    ),
    pytest.param(
        ["serve"], {"TOKENBRIDGE_MODELS": '{"gpt": '}, None,
        ["TOKENBRIDGE_MODELS is not valid JSON"], id="models-bad-json",
    ),
    pytest.param(
        ["serve"], {"TOKENBRIDGE_MODELS": '{"gpt": {"adapter": "opnai"}}'}, None,
        ["TOKENBRIDGE_MODELS (model 'gpt', field adapter)", "'openai'"], id="adapter-typo",
    ),
    pytest.param(
        ["serve"], {"TOKENBRIDGE_MODELS": '{"gpt": {"adapter": "demo", "fallbacks": ["x"]}}'},
        None, ["TOKENBRIDGE_MODELS", "fallback 'x'"], id="unknown-fallback",
    ),
    pytest.param(
        ["serve", "--model", "gpt=opnai:gpt-4o"], {}, None,
        ["--model gpt=opnai:gpt-4o", "openai:gpt-4o-mini"], id="model-flag-typo",
    ),
    pytest.param(
        ["serve", "--config", "{missing}"], {}, None, ["--config", "cannot read"],
        id="config-missing",
    ),
    pytest.param(
        ["serve", "--config", "{file}"], {}, "prot = 8080\n", ["unknown setting 'prot'"],
        id="config-unknown-key",
    ),
    pytest.param(
        ["serve", "--config", "{file}"], {}, "port = 'x'\n", ["tokenbridge.toml: port"],
        id="config-bad-value",
    ),
    pytest.param(
        ["serve", "--config", "{file}"], {}, "port = \n", ["not valid TOML"], id="config-bad-toml",
    ),
    pytest.param(
        ["config"], {"TOKENBRIDGE_PORT": "x"}, None, ["TOKENBRIDGE_PORT"], id="config-cmd",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("args", "env", "file_text", "expected"), BAD)
async def test_bad_configuration_is_one_line_naming_it(
    tmp_path: Path, args: list[str], env: dict[str, str], file_text: str | None,
    expected: list[str],
) -> None:  # fmt: skip
    file = _config_file(tmp_path, file_text or "")
    args = [a.format(file=file, missing=tmp_path / "missing.toml") for a in args]
    code, out, err = await run_cli(*args, env=clean_env(**env))
    assert_one_line(code, out, err, *expected)
    assert "TOKENBRIDGE_MODELS_GPT" not in err  # a variable that does not exist


async def test_generate_against_a_stopped_server_is_one_line() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = await run_cli("generate", "hi", "--url", url, env=clean_env())
    assert_one_line(code, out, err, "--url / TOKENBRIDGE_URL", url, "tokenbridge serve")


async def test_generate_without_a_key_names_the_flag(redis_server: RedisServer) -> None:
    env = {"TOKENBRIDGE_REDIS_URL": redis_server.url, "TOKENBRIDGE_KEY_PREFIX": fresh_prefix(),
           "TOKENBRIDGE_AUTH_DISABLED": "false", "TOKENBRIDGE_API_KEYS": "k" * 32}  # fmt: skip
    gateway = GatewayProcess(env)
    gateway.start()
    try:
        await gateway.wait_ready()
        cli_env = clean_env(TOKENBRIDGE_URL=gateway.url)  # the flag's variable
        code, out, err = await run_cli("generate", "hi", env=cli_env)
        assert_one_line(code, out, err, "--api-key", "TOKENBRIDGE_API_KEY")
        assert "Authorization" not in err
        code, out, err = await run_cli("generate", "hi", "--api-key", "wrong", env=cli_env)
        assert_one_line(code, out, err, "refused the key")
        args = ["generate", "hi", "--max-tokens", "3", "--rate", "0", "--api-key", "k" * 32]
        code, out, err = await run_cli(*args, env=cli_env)
        assert code == 0, err
        assert "3 tokens" in err
    finally:
        gateway.stop()


async def _serve_embedded(drain_s: str) -> tuple[GatewayProcess, int]:
    """``serve`` with its embedded Redis; returns it and that Redis's port."""
    gateway = GatewayProcess({})
    gateway.args.append("--ephemeral")  # a throwaway embedded Redis, no data directory
    gateway.env = clean_env(TOKENBRIDGE_AUTH_DISABLED="true",
                            TOKENBRIDGE_SHUTDOWN_DRAIN_S=drain_s)  # fmt: skip
    gateway.start()
    assert gateway.process is not None and gateway.process.stdout is not None
    seen = ""
    async with asyncio.timeout(30):
        while "tokenbridge serving" not in seen:
            line = (await asyncio.to_thread(gateway.process.stdout.readline)).decode()
            assert line, seen
            seen += line
    found = re.search(r"embedded redis: .* at redis://127\.0\.0\.1:(\d+)/0", seen)
    assert found, seen
    return gateway, int(found.group(1))


async def _first_token_of_a_slow_generation(url: str) -> None:
    async with AsyncTokenBridgeClient(url) as tb:
        started = await tb.start_generation("slow", params={"rate": 2, "max_tokens": 1000})
        async with asyncio.timeout(10), contextlib.aclosing(tb.stream(started)) as events:
            async for event in events:
                if event.event == "token":
                    return


@pytest.mark.parametrize("signals", [[signal.SIGTERM], [signal.SIGINT, signal.SIGINT]],
                         ids=["sigterm-drains", "second-sigint-at-once"])  # fmt: skip
async def test_signals_always_end_serve(signals: list[signal.Signals]) -> None:
    gateway, redis_port = await _serve_embedded(drain_s="1")
    process = gateway.process
    assert process is not None and process.stdout is not None
    try:
        await _first_token_of_a_slow_generation(gateway.url)
        for sig in signals:
            process.send_signal(sig)
        # Bounded: drain_s (1 s) plus the close grace; the watchdog forces it past that.
        code = await asyncio.to_thread(process.wait, 10)
        output = (await asyncio.to_thread(process.stdout.read)).decode()
    finally:
        gateway.stop(signal.SIGKILL)
    assert code in (0, 1), output
    assert "Traceback" not in output
    assert redis_pid_on(redis_port) is None  # stopped, even on a forced exit


async def test_generate_error_event_is_one_line(redis_server: RedisServer) -> None:
    with ModelServer(HttpError(400, "no such model")) as provider:
        models = {"gpt": provider.model_config().model_dump(exclude_none=True)}
        env = {"TOKENBRIDGE_REDIS_URL": redis_server.url, "TOKENBRIDGE_KEY_PREFIX": fresh_prefix(),
               "TOKENBRIDGE_MODELS": json.dumps(models)}  # fmt: skip
        gateway = GatewayProcess(env)
        gateway.start()
        try:
            await gateway.wait_ready()
            args = ["generate", "hi", "--model", "gpt", "--url", gateway.url]
            code, _, err = await run_cli(*args, env=clean_env())
        finally:
            gateway.stop()
    assert code == 1, err
    assert "Traceback" not in err and "RuntimeError" not in err, err
    [error] = [line for line in lines(err) if line.startswith("error ")]
    assert error.startswith("error provider_http_4xx: model 'gpt'"), err
    assert str(provider.port) not in err and "127.0.0.1" not in err


@pytest.mark.parametrize("signals", [[signal.SIGTERM], [signal.SIGINT, signal.SIGINT]],
                         ids=["sigterm", "two-sigints"])  # fmt: skip
async def test_signals_always_end_worker(
    redis_server: RedisServer, signals: list[signal.Signals]
) -> None:
    env = clean_env(TOKENBRIDGE_REDIS_URL=redis_server.url, TOKENBRIDGE_KEY_PREFIX=fresh_prefix(),
                    TOKENBRIDGE_SHUTDOWN_DRAIN_S="1")  # fmt: skip
    worker = GatewayProcess(env, args=["worker"])
    worker.env = env
    worker.start()
    process = worker.process
    assert process is not None and process.stdout is not None
    try:
        await worker.wait_ready(marker=b"tokenbridge worker")
        for sig in signals:
            process.send_signal(sig)
        code = await asyncio.to_thread(process.wait, 10)  # bounded: drain_s + close grace
        output = (await asyncio.to_thread(process.stdout.read)).decode()
    finally:
        worker.stop(signal.SIGKILL)
    assert code in (0, 1), output
    assert "Traceback" not in output


@pytest.fixture(scope="module")
def acl_redis() -> Iterator[RedisServer]:
    """A Redis with two users short of permissions tokenbridge needs."""
    with RedisServer() as server:
        admin = redis.Redis.from_url(server.url)
        admin.execute_command("ACL", "SETUSER", "noname", "on", ">pw", "+ping", "~*")
        admin.execute_command(
            "ACL", "SETUSER", "noset", "on", ">pw", "+ping", "+client|setname", "+hello", "~*"
        )
        admin.close()
        yield server


@pytest.mark.parametrize(("user", "expected"), [
    ("noname", ["TOKENBRIDGE_REDIS_URL", "client|setname", "ACL SETUSER"]),
    ("noset", ["TOKENBRIDGE_REDIS_URL", "may not run", "'set'"]),
], ids=["no-client-setname", "no-set"])  # fmt: skip
async def test_a_redis_user_without_permissions_is_one_line(
    acl_redis: RedisServer, user: str, expected: list[str]
) -> None:
    url = f"redis://{user}:pw@127.0.0.1:{acl_redis.port}/0"
    env = clean_env(TOKENBRIDGE_REDIS_URL=url, TOKENBRIDGE_API_KEYS="k" * 32)
    args = ["serve", "--port", str(free_port()), "--log-level", "warning"]
    code, out, err = await run_cli(*args, env=env)
    assert_one_line(code, out, err, *expected)
    assert "pw@" not in err


WEDGED = """
import sys, threading, time
from tokenbridge.cli.process import StopSignals
signals = StopSignals(0.5, lambda sig: None)  # a graceful stop that never finishes
signals.cleanups.append(lambda: print("cleanup ran", flush=True))
signals.install()
print("ready", flush=True)
threading.Event().wait()
"""


async def test_a_stop_that_never_finishes_is_forced_after_the_deadline() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WEDGED, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        async with asyncio.timeout(10):
            assert await process.stdout.readline() == b"ready\n"
            process.send_signal(signal.SIGTERM)
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()
    assert process.returncode == 1
    assert out == b"cleanup ran\n"
    assert lines(err.decode()) == [
        "tokenbridge: did not stop within 0.5 s (TOKENBRIDGE_SHUTDOWN_DRAIN_S + close); "
        "stopped at once"
    ]
