"""Connection scenarios: memory per idle connection, and delivery to many sessions at once.

``idle-sse`` / ``idle-ws`` start a gateway process of their own (fresh, so that no earlier
scenario's freed memory is reused and hides the cost), open a few connections and close them
(one-time costs: code paths, pools), then measure its resident memory (``VmRSS``) and its
Redis connections (``CLIENT LIST`` entries named ``tokenbridge-<node id>``), open
``--idle-connections`` connections on ``--idle-sessions`` sessions in waves, and measure both
again. Memory per connection = RSS delta / connections.

``sessions-sse`` / ``sessions-ws`` subscribe ``--spread-connections`` clients to
``--spread-sessions`` sessions on the shared gateway; a ``spread`` producer writes
``--spread-tokens`` tokens into every session at once. Delivered = tokens received by all
clients / (last ``end`` - first token).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Literal

import httpx

from benchmarks.processes import GatewayProcess, ServerProcess, process_rss_bytes
from benchmarks.producer import spread_session_ids
from benchmarks.scenarios import Bench, Figure, ScenarioResult, _gateway_cost, _stream_notes
from benchmarks.sse_client import StreamTally, follow
from benchmarks.ws_client import follow_ws
from tokenbridge.settings import load_settings

__all__ = ["Transport", "idle_connections", "many_sessions"]

Transport = Literal["sse", "ws"]
_WAVE = 250  # connections opened at once: well under the listen backlog (2048)


def _follower(
    transport: Transport,
) -> Callable[[str, int, StreamTally], Coroutine[Any, Any, None]]:
    return follow if transport == "sse" else follow_ws


async def _open(
    host: str,
    port: int,
    transport: Transport,
    tallies: Sequence[StreamTally],
    group: asyncio.TaskGroup,
    timeout_s: float,
) -> list[asyncio.Task[None]]:
    """Open one stream per tally in waves of ``_WAVE``; return once every one is subscribed."""
    follower = _follower(transport)
    tasks = []
    async with asyncio.timeout(timeout_s):
        for first in range(0, len(tallies), _WAVE):
            wave = tallies[first : first + _WAVE]
            tasks += [group.create_task(follower(host, port, tally)) for tally in wave]
            for tally in wave:
                await tally.subscribed.wait()
    return tasks


async def _redis_connections(bench: Bench, name: str) -> int:
    clients: list[dict[str, Any]] = await bench.stats.client_list()
    return sum(1 for client in clients if client.get("name") == name)


async def _status(gateway: ServerProcess) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=f"http://{gateway.host}:{gateway.port}") as http:
        response = await http.get("/v1/status", timeout=30)
        response.raise_for_status()
        status: dict[str, Any] = response.json()
        return status


async def _until_held(gateway: ServerProcess, connections: int, sessions: int) -> dict[str, Any]:
    """The gateway's status once it holds ``connections`` on ``sessions`` fan-out sessions.

    A WebSocket client learns that its connection is registered (the ``pong``), not that its
    session is subscribed (nothing is sent until an event): poll the status, 10 times a
    second, under the caller's deadline.
    """
    while True:
        status = await _status(gateway)
        held = status["connections"]["total"], status["fanout"]["sessions"]
        if held == (connections, sessions):
            return status
        await asyncio.sleep(0.1)


async def _close(tasks: Sequence[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def idle_connections(
    bench: Bench, transport: Transport, connections: int, sessions: int, timeout_s: float
) -> ScenarioResult:
    """Resident memory per idle connection on a fresh gateway; its Redis connections."""
    label = "SSE" if transport == "sse" else "WebSocket"
    result = ScenarioResult(f"idle {label}: {connections:,} connections, {sessions:,} sessions")
    gateway = GatewayProcess(bench.redis_server.url)
    try:
        gateway.start()
        await gateway.wait_ready(30)
        name = f"tokenbridge-{(await _status(gateway))['fanout']['node_id']}"
        ids = [f"bench-{bench.tag}-idle-{transport}-{i % sessions}" for i in range(connections)]
        async with asyncio.TaskGroup() as group:
            # One-time costs first (code paths, the Redis pool growing to its bound).
            warm = [StreamTally(f"bench-{bench.tag}-warm-{transport}-{i}") for i in range(100)]
            warm_tasks = await _open(gateway.host, gateway.port, transport, warm, group, 60)
            async with asyncio.timeout(60):
                await _until_held(gateway, 100, 100)
            await _close(warm_tasks)
            rss_before = process_rss_bytes(gateway.pid)
            redis_before = await _redis_connections(bench, name)
            tallies = [StreamTally(session_id) for session_id in ids]
            loop = asyncio.get_running_loop()
            started = loop.time()
            tasks = await _open(gateway.host, gateway.port, transport, tallies, group, timeout_s)
            async with asyncio.timeout(timeout_s):
                status = await _until_held(gateway, connections, min(sessions, connections))
            opened_s = loop.time() - started
            rss_after = process_rss_bytes(gateway.pid)
            redis_after = await _redis_connections(bench, name)
            await _close(tasks)
    finally:
        gateway.stop()
    if rss_before is None or rss_after is None:
        raise RuntimeError("cannot read the gateway's VmRSS (/proc)")
    per_connection_kb = (rss_after - rss_before) / connections / 1024
    settings = load_settings(redis_url=bench.redis_server.url)
    bound = settings.redis_max_connections + 1  # gateway, no worker
    result.figures = [
        Figure(
            "resident memory per idle connection",
            per_connection_kb,
            "KB",
            "< 20",
            per_connection_kb < 20,
        ),
        Figure("gateway RSS before", rss_before / 2**20, "MB"),
        Figure("gateway RSS with the connections", rss_after / 2**20, "MB"),
        Figure("gateway Redis connections before", redis_before, ""),
        Figure(
            "gateway Redis connections with them",
            redis_after,
            "",
            f"unchanged, ≤ {bound}",
            redis_after == redis_before and redis_after <= bound,
        ),
        Figure("connections / fan-out sessions held", status["connections"]["total"], ""),
        Figure(f"time to open them ({_WAVE} at a time)", opened_s * 1000, "ms"),
    ]
    return result


async def many_sessions(
    bench: Bench,
    transport: Transport,
    connections: int,
    sessions: int,
    tokens: int,
    timeout_s: float,
    producer: str = "spread",
) -> ScenarioResult:
    """Delivered tokens/s with ``connections`` clients spread over ``sessions`` sessions;
    ``producer="fast"``: the real Producer, one generation per session, all at once."""
    label = "SSE" if transport == "sse" else "WebSocket"
    by = ", real producer" if producer == "fast" else ""
    result = ScenarioResult(f"{label}: {connections:,} connections on {sessions} sessions{by}")
    tag = f"{bench.tag}{transport}{tokens}"
    ids = spread_session_ids(tag, sessions)
    tallies = [StreamTally(ids[i % sessions]) for i in range(connections)]
    gateway = bench.gateway
    async with asyncio.TaskGroup() as group:
        await _open(gateway.host, gateway.port, transport, tallies, group, 60)
        args = ["spread", "--tag", tag, "--sessions", str(sessions), "--tokens", str(tokens)]
        if producer == "fast":
            args = ["fast", "--session", tag, "--sessions", str(sessions), "--tokens", str(tokens)]
        produced, window = await bench.run_producer(args, timeout_s)
        await bench.until_ended(tallies, timeout_s)
        await bench.close_window(window, result, produced["cpu_s"])
    if produced.get("errors"):
        result.notes.append(f"producer errors: {produced['errors']}")
    first = min(t.first_token_at for t in tallies if t.first_token_at is not None)
    last = max(t.end_at for t in tallies if t.end_at is not None)
    delivered = sum(t.tokens for t in tallies)
    rate = delivered / max(last - first, 1e-9)
    result.tokens_delivered = delivered
    result.figures = [
        Figure("delivered, sum over connections", rate, "tokens/s"),
        Figure("per connection", rate / connections, "tokens/s"),
        Figure("producer write rate (all sessions)", produced["tokens"] / produced["duration_s"],
               "tokens/s"),
        Figure("first token to last end", (last - first) * 1000, "ms"),
    ]  # fmt: skip
    result.figures.append(_gateway_cost(result))
    trimmed = sum([await bench.trimmed(session_id) for session_id in ids])
    _stream_notes(result, tallies, tokens, trimmed)
    return result
