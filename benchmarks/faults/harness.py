"""The fault suite's harness: real processes on one real Redis, recording clients, checks.

:class:`FaultEnv` starts ``tokenbridge serve`` / ``tokenbridge worker`` processes (each a
:class:`~benchmarks.processes.Child`: own session, killed with the suite) under one key prefix
with short timings. :class:`Recorder` follows one session over SSE with httpx, resumes with
``Last-Event-ID`` on a gateway picked by the scenario's seeded RNG, and records every
``(seq, id, kind)`` it gets; :func:`exact` says whether a generation arrived whole, in
order, exactly once. Every wait is bounded; hitting a bound fails the scenario.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import secrets
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from redis.asyncio import Redis

from benchmarks.processes import Child, free_port
from tokenbridge.store.embedded import EmbeddedRedis
from tokenbridge.wire.keys import Keys

__all__ = ["Event", "FaultEnv", "Node", "Outcome", "Recorder", "exact", "until"]

# Short timings so that crashes are detected in seconds, as in the tests.
BASE_ENV = {
    "TOKENBRIDGE_AUTH_DISABLED": "true",
    "TOKENBRIDGE_CONSUMER_HEARTBEAT_S": "0.5",
    "TOKENBRIDGE_CONSUMER_CLAIM_IDLE_MS": "1500",
    "TOKENBRIDGE_CONSUMER_BLOCK_MS": "1000",
    "TOKENBRIDGE_LIMITS_MAX_CONNECTIONS_PER_ADDRESS": "100000",
    "TOKENBRIDGE_LIMITS_MAX_CONNECTIONS_PER_SESSION": "100000",
    "PYTHONUNBUFFERED": "1",
}


@dataclass
class Outcome:
    """A scenario's figures and verdict against its stated criterion."""

    passed: bool
    figures: dict[str, Any]
    note: str = ""


@dataclass(frozen=True, slots=True)
class Event:
    """One SSE event as a client got it."""

    kind: str
    id: str
    data: dict[str, Any]

    @property
    def seq(self) -> int:
        return int(self.data.get("seq", -1))

    @property
    def generation_id(self) -> str:
        return str(self.data.get("generation_id", ""))


class Node(Child):
    """``tokenbridge serve`` (or ``worker``) as a process of the suite."""

    def __init__(self, name: str, env: dict[str, str], worker_only: bool = False, *extra: str):
        self.port = free_port()
        cmd = [sys.executable, "-m", "tokenbridge"]
        if worker_only:
            args = [*cmd, "worker", *extra, "--log-level", "warning"]
            marker = "ready"
        else:
            args = [*cmd, "serve", "--port", str(self.port), *extra, "--log-level", "warning"]
            marker = "tokenbridge serving at"
        super().__init__(name, args, env, ready_marker=marker)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.stop()

    def restart(self) -> None:
        self.stop()
        self.lines.clear()
        self._settled.clear()
        self._ready = False
        self.start()


@dataclass
class FaultEnv:
    """One scenario's world: a Redis URL, a fresh key prefix, the processes it started."""

    redis_url: str
    server: EmbeddedRedis | None = None
    prefix: str = field(default_factory=lambda: "f" + secrets.token_hex(4))
    nodes: list[Node] = field(default_factory=list)
    redis: Redis = field(init=False)
    restarted: list[EmbeddedRedis] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.redis = Redis.from_url(self.redis_url)
        self.keys = Keys(self.prefix)

    def env(self, **overrides: str) -> dict[str, str]:
        values = {**os.environ, **BASE_ENV, "TOKENBRIDGE_REDIS_URL": self.redis_url}
        values["TOKENBRIDGE_KEY_PREFIX"] = self.prefix
        values.update({f"TOKENBRIDGE_{k.upper()}": v for k, v in overrides.items()})
        return values

    async def node(self, name: str, *extra: str, worker_only: bool = False, **env: str) -> Node:
        """Start a process and wait until it serves (bounded)."""
        node = Node(name, self.env(**env), worker_only, *extra)
        self.nodes.append(node)
        node.start()
        await node.wait_ready(60)
        return node

    def restart_redis(self, keep_data: bool = False) -> None:
        """SIGKILL the Redis server and start an empty one on the same port (no persistence:
        everything is lost, as after a crash of a cache-only Redis); ``keep_data``: start it
        again in the same directory (a server with its append-only file on comes back with
        what it had written)."""
        assert self.server is not None and self.server.pid is not None
        if keep_data:
            self.server.kill()
            self.server.start()
            return
        os.kill(self.server.pid, signal.SIGKILL)
        self.server.stop()
        self.server = EmbeddedRedis(port=self.server.port)
        self.restarted.append(self.server)
        self.server.start()

    async def aclose(self) -> None:
        for node in self.nodes:
            node.kill()
        await self.redis.aclose()
        for server in self.restarted:
            server.stop()


async def start_generation(
    http: httpx.AsyncClient, gateway: str, tokens: int, rate: float, **extra: Any
) -> dict[str, Any]:
    """POST /v1/generations; the reply (session_id, generation_id, events_url)."""
    body = {"model": "demo", "prompt": extra.pop("prompt", "fault suite"), **extra}
    body["params"] = {"max_tokens": tokens, "rate": rate}
    response = await http.post(f"{gateway}/v1/generations", json=body)
    response.raise_for_status()
    reply: dict[str, Any] = response.json()
    return reply


class Recorder:
    """Follows one session, resuming on a random gateway, recording every event."""

    def __init__(self, session_id: str, gateways: Callable[[], Sequence[str]], rng: random.Random):
        self.session_id = session_id
        self.gateways = gateways
        self.rng = rng
        self.events: list[Event] = []
        self.comments: list[str] = []
        self.reconnects = 0
        self.last_id: str | None = None
        self.subscribed = asyncio.Event()

    async def follow(
        self, http: httpx.AsyncClient, generation_id: str, cut_after: Sequence[int] = ()
    ) -> None:
        """Until the generation's ``end``/``error``; reconnect on every drop, and on purpose
        after each count of events in ``cut_after``."""
        cuts = list(cut_after)
        while True:
            gateway = self.rng.choice(list(self.gateways()))
            headers = {"Last-Event-ID": self.last_id} if self.last_id else {}
            url = f"{gateway}/v1/sessions/{self.session_id}/events"
            try:
                async with http.stream("GET", url, headers=headers) as response:
                    if response.status_code != 200:
                        raise httpx.TransportError(f"status {response.status_code}")
                    async for event in _sse(response, self.comments):
                        self.subscribed.set()
                        if event is None:
                            continue
                        self.events.append(event)
                        self.last_id = event.id or self.last_id
                        if event.kind in ("end", "error") and event.generation_id == generation_id:
                            return
                        if cuts and len(self.events) >= cuts[0]:
                            cuts.pop(0)
                            break  # the client drops on purpose
            except (httpx.TransportError, httpx.RemoteProtocolError):
                await asyncio.sleep(0.1)  # a gateway is down: try another (browsers wait too)
            self.reconnects += 1

    def of(self, generation_id: str) -> list[Event]:
        return [e for e in self.events if e.generation_id == generation_id]


async def _sse(response: httpx.Response, comments: list[str]) -> Any:
    """Yield each event (None for the preamble and comments)."""
    fields: dict[str, str] = {}
    data: list[str] = []
    async for line in response.aiter_lines():
        if line == "":
            if data or "event" in fields:  # not the ``retry:`` preamble
                payload = json.loads("\n".join(data)) if data else {}
                yield Event(fields.get("event", "message"), fields.get("id", ""), payload)
            else:
                yield None
            fields, data = {}, []
        elif line.startswith(":"):
            comments.append(line[1:].strip())
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            else:
                fields[name] = value


def exact(events: Sequence[Event], tokens: int | None = None) -> tuple[bool, str]:
    """One generation's events: seq 0..n exactly once and in order, a terminal event last,
    ids strictly increasing; with ``tokens``, ending with ``end`` after that many tokens."""
    real = [e for e in events if e.kind != "gap"]
    seqs = [e.seq for e in real]
    if seqs != list(range(len(seqs))):
        return False, f"seq not 0..n once each: {seqs[:5]}..{seqs[-5:]}"
    if not real or real[-1].kind not in ("end", "error"):
        return False, "no terminal event"
    keys = [tuple(int(p) for p in e.id.rsplit(":", 1)[1].split("-")) for e in real if e.id]
    if any(a >= b for a, b in itertools.pairwise(keys)):
        return False, "ids not increasing"
    if tokens is not None and (real[-1].kind != "end" or len(real) != tokens + 2):
        return False, f"{len(real)} events, {real[-1].kind} last; expected {tokens + 2} and end"
    return True, ""


async def until(check: Callable[[], Any], timeout_s: float, every_s: float = 0.1) -> Any:
    """Evaluate ``check`` (sync or async) until truthy, for at most ``timeout_s`` (then
    TimeoutError: the scenario fails). For process-level state that has no event to wait on."""
    async with asyncio.timeout(timeout_s):
        while True:
            value = check()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return value
            await asyncio.sleep(every_s)
