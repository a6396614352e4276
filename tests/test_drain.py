"""Graceful drain: a stopping gateway refuses new work, its clients resume elsewhere, and a
generation running in it finishes within ``shutdown_drain_s`` or ends ``cancelled``."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import httpx
from websockets.asyncio.client import connect

from tests.servers import Gateway, GatewayProcess
from tests.sse_client import SSEEvent
from tests.test_connections import parse_sse
from tests.test_resume import assert_complete
from tests.test_token_path import collect_until_end, start
from tests.test_websocket_cancel import ws_url
from tokenbridge.settings import Settings


def gateway_process(settings: Settings, *args: str, **env: str) -> GatewayProcess:
    """`tokenbridge serve` on the test's Redis and key prefix, auth off (as the fixtures)."""
    process = GatewayProcess(
        {
            "TOKENBRIDGE_REDIS_URL": settings.redis_url_value() or "",
            "TOKENBRIDGE_KEY_PREFIX": settings.key_prefix,
            "TOKENBRIDGE_AUTH_DISABLED": "true",
            **env,
        },
        args=["serve", *args, "--log-level", "warning"],
    )
    process.args += ["--port", str(process.port)]
    return process


async def sigterm_and_wait(process: GatewayProcess) -> int:
    """SIGTERM, then the exit code (waited for in a thread: the clients go on meanwhile)."""
    assert process.process is not None
    process.process.send_signal(signal.SIGTERM)
    return await asyncio.to_thread(process.process.wait, 30)


class Countdown:
    """An event set once ``arrive`` was called ``n`` times."""

    def __init__(self, n: int) -> None:
        self.left = n
        self.done = asyncio.Event()

    def arrive(self) -> None:
        self.left -= 1
        if self.left == 0:
            self.done.set()


class Follower:
    """One SSE client of a session: reads from the first gateway until it closes the stream,
    then resumes on the second from its last id, until the end of ``generation_id`` (set once
    the generation is started)."""

    def __init__(self, session_id: str, opened: Countdown, reading: Countdown) -> None:
        self.url = f"/v1/sessions/{session_id}/events"
        self.generation_id = ""
        self.opened = opened  # arrives once the stream is open (registered on the gateway)
        self.reading = reading  # arrives at the first token
        self.first: list[SSEEvent] = []
        self.comments: list[str] = []
        self.rest: list[SSEEvent] = []

    async def run(self, first: httpx.AsyncClient, second: httpx.AsyncClient) -> None:
        async with first.stream("GET", self.url) as response:
            assert response.status_code == 200
            self.opened.arrive()
            block: list[str] = []
            async for line in response.aiter_lines():
                if line:
                    block.append(line)
                    continue
                events, comments = parse_sse("\n".join(block).encode())
                block = []
                self.comments += comments
                for event in events:
                    self.first.append(event)
                    if event.event == "token" and event.data["seq"] == 1:
                        self.reading.arrive()
                    if event.event in ("end", "error"):
                        return
        self.rest = await collect_until_end(
            second, self.url, self.generation_id, last_event_id=self.first[-1].id
        )

    @property
    def events(self) -> list[SSEEvent]:
        return self.first + self.rest


async def test_a_draining_gateway_refuses_new_work_and_closes_its_streams(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    async with asyncio.timeout(30):
        started = await start(http, session_id="draining", params={"max_tokens": 3})
        await collect_until_end(http, started["events_url"], started["generation_id"])
        async with http.stream("GET", started["events_url"]) as sse:
            assert sse.status_code == 200  # registered before its headers were sent
            async with connect(ws_url(gateway.url, "draining")) as ws:
                await ws.recv()  # replaying the history: registered
                gateway.app.state.drain()
                await ws.wait_closed()
            lines = [line async for line in sse.aiter_lines()]
        assert ws.close_code == 1012 and ws.close_reason == "shutdown"
        assert [line for line in lines if line.startswith(":")][-1] == ": closed shutdown"

        refused = await http.get("/v1/sessions/draining/events")
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "draining"
        assert refused.headers["retry-after"] == "1"
        post = await http.post("/v1/generations", json={"model": "demo", "prompt": "hi"})
        assert post.status_code == 503 and post.json()["error"]["code"] == "draining"
        ready = await http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "draining"
        async with connect(ws_url(gateway.url, "draining")) as ws:
            await ws.wait_closed()
        assert ws.close_code == 1012 and ws.close_reason.startswith("draining")
        stats = (await http.get("/v1/status")).json()["connections"]
    assert stats["draining"] is True
    assert stats["closed"]["shutdown"] == 2
    assert stats["refused"]["draining"] == 3  # SSE, POST, WebSocket


async def test_sigterm_with_100_live_clients_each_resumes_on_a_second_gateway(
    settings_factory: Any,
) -> None:
    """100 SSE clients (20 sessions x 5) mid-answer on a `tokenbridge serve --no-worker`
    process; the worker runs in the second gateway, where every client ends up."""
    settings = settings_factory()
    sessions, per_session, tokens = 20, 5, 150  # 3 s each
    first_gateway = gateway_process(settings, "--no-worker")
    first_gateway.start()
    limits = httpx.Limits(max_connections=None)
    try:
        async with (
            Gateway(settings, worker=True) as second_gateway,
            httpx.AsyncClient(base_url=first_gateway.url, timeout=30, limits=limits) as first,
            httpx.AsyncClient(base_url=second_gateway.url, timeout=30, limits=limits) as second,
            asyncio.timeout(60),
        ):
            await first_gateway.wait_ready()
            opened, reading = Countdown(sessions * per_session), Countdown(sessions * per_session)
            followers = [
                Follower(f"drain-{i}", opened, reading)
                for i in range(sessions)
                for _ in range(per_session)
            ]
            tasks = [asyncio.create_task(f.run(first, second)) for f in followers]
            await opened.done.wait()  # every client is connected: now the answers start
            generations = await asyncio.gather(
                *(
                    start(  # each its own prompt: no answer comes from the cache
                        second,
                        session_id=f"drain-{i}",
                        prompt=f"answer number {i}",
                        params={"max_tokens": tokens, "rate": 50},
                    )
                    for i in range(sessions)
                )
            )
            for i, started in enumerate(generations):
                for follower in followers[i * per_session : (i + 1) * per_session]:
                    follower.generation_id = started["generation_id"]
            await reading.done.wait()
            exit_code = await sigterm_and_wait(first_gateway)
            await asyncio.gather(*tasks)
    finally:
        first_gateway.stop()
    assert exit_code == 0
    for follower in followers:
        assert follower.comments[-1] == "closed shutdown"
        assert follower.first[-1].event == "token"  # cut mid-answer, resumed elsewhere
        assert_complete(follower.events, follower.generation_id, tokens)


async def test_a_generation_in_a_stopping_gateway_finishes_within_drain_or_ends_cancelled(
    settings_factory: Any,
) -> None:
    """The worker in `tokenbridge serve` stops taking jobs at SIGTERM; a running generation
    gets `shutdown_drain_s` to finish, then ends with reason `cancelled` (it is not handed
    over: another worker would run the model again, and clients already have its start)."""
    settings = settings_factory(run_worker=False)
    stopping = gateway_process(settings, "--worker", TOKENBRIDGE_SHUTDOWN_DRAIN_S="3")
    stopping.start()
    try:
        async with (
            Gateway(settings) as other,
            httpx.AsyncClient(base_url=stopping.url, timeout=30) as first,
            httpx.AsyncClient(base_url=other.url, timeout=30) as second,
            asyncio.timeout(60),
        ):
            await stopping.wait_ready()
            opened, reading = Countdown(2), Countdown(2)
            followers: list[Follower] = []
            for max_tokens in (40, 100_000):  # done in 2 s / never
                started = await start(first, params={"max_tokens": max_tokens, "rate": 20})
                followers.append(Follower(started["session_id"], opened, reading))
                followers[-1].generation_id = started["generation_id"]
            tasks = [asyncio.create_task(f.run(first, second)) for f in followers]
            await reading.done.wait()
            exit_code = await sigterm_and_wait(stopping)
            await asyncio.gather(*tasks)
    finally:
        stopping.stop()
    assert exit_code == 0
    short, long = followers
    assert short.comments[-1] == "closed shutdown"
    assert_complete(short.events, short.generation_id, 40)
    assert short.events[-1].data["reason"] == "length"
    end = long.events[-1]
    assert end.event == "end" and end.data["reason"] == "cancelled"
    seqs = [e.data["seq"] for e in long.events]
    assert seqs == list(range(len(seqs)))
