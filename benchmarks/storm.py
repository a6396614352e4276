"""The reconnect storm: every client of a gateway comes back at once with ``Last-Event-ID``.

What a deploy or a network blip does: ``--clients`` clients, one session each, all resuming at
the same moment, each having missed ``--storm-missed`` (4) events of a generation that is still
running. Before the window opens, every session's stream is written (a ``start``, then the
tokens) straight into Redis, so the gateway holds no session when the storm starts.

Figures, per client count:

- time until every client had its first missed event (the storm starts when the bench begins
  opening its sockets, all at once);
- Redis commands per resuming client: ``INFO commandstats`` deltas over the whole storm, from
  the first connection until the gateway has let go of every session again (the clients leave
  once they have their events; unsubscribes are part of the storm's cost);
- the gateway's CPU time over that window, per client and in total.

Several client counts in one run (``--clients 1000,2500,5000``) show how the cost grows.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from benchmarks.connections import _status
from benchmarks.processes import GatewayProcess
from benchmarks.scenarios import Bench, Figure, ScenarioResult
from benchmarks.sse_client import StreamTally, follow
from tokenbridge.store.live import append_events

__all__ = ["storm"]

_EPOCH = "b0000001"  # the sessions' epoch, written with their streams


class _ResumeTally(StreamTally):
    """A client that leaves once it has ``expect`` tokens (the missed ones)."""

    def __init__(self, session_id: str, last_event_id: str | None, expect: int) -> None:
        super().__init__(session_id)
        self.last_event_id = last_event_id
        self.expect = expect

    def feed(self, block: bytes, now: float, wall_ns: int) -> None:
        super().feed(block, now, wall_ns)
        if self.tokens >= self.expect and not self.ended.is_set():
            self.end_at = now
            self.ended.set()  # the protocol closes the socket: the client leaves


def _keys(bench: Bench, sid: str) -> tuple[str, str, str, str]:
    k = bench.keys
    return k.events(sid), k.meta(sid), k.generations(sid), k.live(sid)


async def _append(bench: Bench, ids: Sequence[str], first: int, last: int) -> None:
    """Tokens ``first..last`` (``0``: the ``start``) of every session, appended and published
    as the producer does (one script call per session; ``store/live.py``), 32 at once."""
    ms = str(int(time.time() * 1000))

    async def one(sid: str) -> None:
        events = []
        for seq in range(first, last + 1):
            kind = "start" if seq == 0 else "token"
            fields = {"v": "1", "kind": kind, "gen": "g_storm", "seq": str(seq), "ts": ms}
            events.append(fields if seq == 0 else {**fields, "text": f" t{seq}"})
        expected = "" if first == 0 else f"running {first - 1}"
        await append_events(
            bench.stats, _keys(bench, sid), "g_storm", events, state=f"running {last}",
            expected_state=expected, ttl_s=3600, new_epoch=_EPOCH,
        )  # fmt: skip

    for at in range(0, len(ids), 32):
        await asyncio.gather(*(one(sid) for sid in ids[at : at + 32]))


async def _write_sessions(bench: Bench, ids: Sequence[str]) -> None:
    """Each session: its epoch, a ``start`` and one token (what the clients first see)."""
    await _append(bench, ids, 0, 1)


async def _write_missed(bench: Bench, ids: Sequence[str], missed: int) -> None:
    """The generation goes on while the clients are away: ``missed`` tokens per session."""
    await _append(bench, ids, 2, missed + 1)


async def _status_held(bench: Bench) -> tuple[int, int]:
    status = await _status(bench.gateway)
    return status["connections"]["total"], status["fanout"]["sessions"]


async def _until(bench: Bench, connections: int) -> None:
    """Wait until the gateway holds ``connections`` connections; polled 10 times a second
    under the caller's deadline."""
    while True:
        if (await _status_held(bench))[0] == connections:
            return
        await asyncio.sleep(0.1)


async def _connect(bench: Bench, tallies: Sequence[_ResumeTally], timeout_s: float) -> float:
    """Open every client's stream at once; wait until each has its tokens; returns when the
    opening began (``time.perf_counter()``)."""
    host, port = bench.gateway.host, bench.gateway.port
    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for tally in tallies:
            group.create_task(follow(host, port, tally))
        async with asyncio.timeout(timeout_s):
            for tally in tallies:
                await tally.ended.wait()
    return started


def _add(result: ScenarioResult, part: ScenarioResult) -> None:
    """Sum a window's CPU seconds and commands into ``result`` (``cpu`` holds seconds)."""
    for name, pct in part.cpu.items():
        result.cpu[name] = result.cpu.get(name, 0.0) + pct * part.window_s / 100
    for name, calls in part.commands.items():
        result.commands[name] = result.commands.get(name, 0) + calls
    result.window_s += part.window_s


async def storm(
    bench: Bench, clients: int, missed: int, timeout_s: float, fresh: bool = False
) -> ScenarioResult:
    """``clients`` clients on as many sessions drop at once, miss ``missed`` events, and
    resume at once; the storm is the drop and the comeback (two measurement windows).

    ``fresh``: they come back to a new gateway process (a deploy), which holds nothing."""
    where = "a new gateway" if fresh else "the same gateway"
    result = ScenarioResult(f"storm: {clients:,} clients resume at once on {where}")
    ids = [f"bench-{bench.tag}-storm{clients}-{i}" for i in range(clients)]
    await _write_sessions(bench, ids)
    first = [_ResumeTally(sid, None, 1) for sid in ids]
    await _connect(bench, first, timeout_s)  # connected, then all gone: the drop
    drop = ScenarioResult("drop")
    window = await bench.open_window()
    async with asyncio.timeout(timeout_s):
        await _until(bench, 0)
    await bench.close_window(window, drop, 0.0)
    await _write_missed(bench, ids, missed)
    back = [_ResumeTally(sid, t.last_event_id, missed) for sid, t in zip(ids, first, strict=True)]
    comeback = ScenarioResult("comeback")
    old = bench.gateway
    if fresh:
        bench.gateway = GatewayProcess(bench.redis_server.url)
        bench.gateway.start()
    try:
        if fresh:
            await bench.gateway.wait_ready(30)
        window = await bench.open_window()
        started = await _connect(bench, back, timeout_s)
        all_in = time.perf_counter() - started
        await bench.close_window(window, comeback, 0.0)
    finally:
        if fresh:
            bench.gateway.stop()
            bench.gateway = old
    for part in (drop, comeback):
        _add(result, part)
    result.cpu = {name: 100 * s / result.window_s for name, s in result.cpu.items()}
    result.cpu.pop("producer", None)
    firsts = sorted(t.first_token_at - started for t in back if t.first_token_at is not None)
    result.tokens_delivered = sum(t.tokens for t in back)
    commands = sum(result.commands.values())
    gateway_cpu_s = result.cpu.get("gateway", 0.0) * result.window_s / 100
    last_first = firsts[-1]
    result.figures = [
        Figure("every client had its first event", last_first * 1000, "ms",
               "≤ 1,000 at 5,000 clients", last_first <= 1.0 if clients <= 5000 else None),
        Figure("median client's first event", firsts[len(firsts) // 2] * 1000, "ms"),
        Figure("every client had all its missed events", all_in * 1000, "ms"),
        Figure("Redis commands per resuming client", commands / clients, "", "≤ 2",
               commands / clients <= 2),
        Figure("gateway CPU (drop + comeback)", gateway_cpu_s, "s"),
        Figure("gateway CPU per resuming client", 1e6 * gateway_cpu_s / clients, "us"),
        Figure("drop: until the gateway held no connection", drop.window_s * 1000, "ms"),
    ]  # fmt: skip
    top = sorted(result.commands.items(), key=lambda kv: -kv[1])[:8]
    result.notes.append(
        "commands per client: " + ", ".join(f"{n} {c / clients:.2f}" for n, c in top)
    )
    lacking = sum(1 for t in back if t.tokens != missed)
    if lacking or any(t.gaps for t in back):
        result.notes.append(f"{lacking} clients got another number of tokens than {missed}")
    return result
