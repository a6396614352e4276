"""The scenarios: what each one sets up, waits on and measures.

Every scenario subscribes its clients first (each has received the ``retry:`` preamble, so the
gateway's fan-out reader holds its session), then opens a measurement window (Redis
``INFO commandstats`` and the CPU time of every process), starts its producer process, waits
for every client's ``end`` event, and closes the window. Every wait is bounded; hitting a
bound fails the scenario, it is never a figure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks import pipeline as pipeline_process
from benchmarks.processes import Child, ServerProcess, process_cpu_s, system_busy_s
from benchmarks.producer import READY, paced_session_ids
from benchmarks.sse_client import StreamTally, follow
from tokenbridge.settings import load_settings
from tokenbridge.store.client import close_client, cluster_url, command_client
from tokenbridge.wire.keys import Keys


def is_cluster_url(url: str) -> bool:
    return cluster_url(url)[1]


@contextlib.asynccontextmanager
async def redis_client(url: str) -> AsyncIterator[Any]:
    client = command_client(url, 2, 30)
    try:
        yield client
    finally:
        await close_client(client)


__all__ = ["Bench", "Figure", "ScenarioResult", "fanout", "latency", "pipeline", "single_session"]


@dataclass(slots=True)
class Figure:
    """One measured figure; ``ok`` is None when it has no target."""

    label: str
    value: float
    unit: str
    target: str = ""
    ok: bool | None = None


@dataclass
class ScenarioResult:
    name: str
    figures: list[Figure] = field(default_factory=list)
    tokens_delivered: int = 0
    commands: dict[str, int] = field(default_factory=dict)  # INFO commandstats call deltas
    cpu: dict[str, float] = field(default_factory=dict)  # % of one core over the window
    window_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    # A cluster run: "redis:<port>" CPU seconds and "<command>@<port>" calls per node.
    per_node: dict[str, float] = field(default_factory=dict)


@dataclass
class _Window:
    """CPU seconds and Redis command counts at the start of a measurement."""

    started: float
    cpu: dict[str, float | None]
    commands: dict[str, int]


class Bench:
    """The servers under test and what a scenario needs to drive them."""

    def __init__(self, redis_server: Any, gateway: ServerProcess, tag: str) -> None:
        """``redis_server``: an EmbeddedRedis, or a RedisCluster (``--cluster``); ``gateway``:
        the server the clients read from (scenario ``live-floor``: the floor relay)."""
        self.redis_server = redis_server
        self.gateway = gateway
        self.tag = tag
        self.cluster = is_cluster_url(redis_server.url)
        self.stats: Any = command_client(redis_server.url, 8, 30)
        self.env = {**os.environ, "TOKENBRIDGE_REDIS_URL": redis_server.url}
        self.keys = Keys(load_settings(redis_url=redis_server.url).key_prefix)

    async def aclose(self) -> None:
        await close_client(self.stats)

    def _cpu(self) -> dict[str, float | None]:
        cpu: dict[str, float | None] = {
            "gateway": process_cpu_s(self.gateway.pid),
            "clients (bench)": time.process_time(),
            "all": system_busy_s(),
        }
        if not self.cluster:
            cpu["redis"] = process_cpu_s(self.redis_server.pid)
            return cpu
        nodes = {f"redis:{n.port}": process_cpu_s(n.pid) for n in self.redis_server.live_nodes()}
        cpu["redis"] = sum(v for v in nodes.values() if v is not None)
        return {**cpu, **nodes}  # per node: popped into figures by the cluster run

    async def _commands(self) -> dict[str, int]:
        if self.cluster:  # summed over the primaries; per primary as "<command>@<port>"
            totals: dict[str, int] = {}
            for node in self.redis_server.primaries():
                async with redis_client(f"redis://127.0.0.1:{node.port}/0") as one:
                    info: dict[str, Any] = await one.info("commandstats")
                for name, stat in info.items():
                    if name != "cmdstat_info":
                        short = name.removeprefix("cmdstat_")
                        totals[short] = totals.get(short, 0) + int(stat["calls"])
                        totals[f"{short}@{node.port}"] = int(stat["calls"])
            return totals
        info = await self.stats.info("commandstats")
        return {
            name.removeprefix("cmdstat_"): int(stat["calls"])
            for name, stat in info.items()
            if name != "cmdstat_info"
        }

    async def open_window(self) -> _Window:
        return _Window(time.perf_counter(), self._cpu(), await self._commands())

    async def close_window(
        self, window: _Window, result: ScenarioResult, producer_cpu_s: float
    ) -> None:
        """Fill ``result.cpu`` (% of one core) and ``result.commands`` since ``window``."""
        wall = time.perf_counter() - window.started
        result.window_s = wall
        now = self._cpu()
        for name, before in window.cpu.items():
            after = now[name]
            if before is not None and after is not None:
                if name.startswith("redis:"):
                    result.per_node[name] = after - before
                else:
                    result.cpu[name] = 100 * (after - before) / wall
        result.cpu["producer"] = 100 * producer_cpu_s / wall
        if "all" in result.cpu:  # what the machine did besides the processes of this run
            ours = sum(v for k, v in result.cpu.items() if k != "all")
            result.cpu["other processes"] = max(0.0, result.cpu.pop("all") - ours)
        after_commands = await self._commands()
        for name, calls in after_commands.items():
            delta = calls - window.commands.get(name, 0)
            if delta <= 0:
                continue
            if "@" in name:
                result.per_node[name] = delta
            else:
                result.commands[name] = delta

    async def run_producer(
        self, args: list[str], timeout_s: float
    ) -> tuple[dict[str, Any], _Window]:
        """Run ``python -m benchmarks.producer ARGS``: its JSON summary, and the window opened
        once it was ready (connected, imports done), just before it was told to go."""
        argv = [sys.executable, "-m", "benchmarks.producer", *args]
        child = Child("producer", argv, self.env, ready_marker=READY, stdin_pipe=True)
        try:
            child.start()
            await child.wait_ready(30)
            window = await self.open_window()
            child.send_line("go")
            code = await child.wait_exit(timeout_s)
        finally:
            child.stop()
        summary = next((line for line in reversed(child.lines) if line.startswith("{")), None)
        if code != 0 or summary is None:
            raise RuntimeError(f"producer exited with {code}:\n{child.output()}")
        result: dict[str, Any] = json.loads(summary)
        return result, window

    async def subscribe(self, tallies: Sequence[StreamTally], group: asyncio.TaskGroup) -> None:
        """Open one event stream per tally in ``group``; return once each is subscribed."""
        for tally in tallies:
            group.create_task(follow(self.gateway.host, self.gateway.port, tally))
        async with asyncio.timeout(30):
            for tally in tallies:
                await tally.subscribed.wait()

    async def trimmed(self, session_id: str) -> int:
        """Entries that ``MAXLEN ~`` trimmed from a session stream (Redis 7 ``entries-added``)."""
        info: dict[str, Any] = await self.stats.xinfo_stream(self.keys.events(session_id))
        return int(info.get("entries-added", info["length"])) - int(info["length"])

    async def until_ended(self, tallies: Sequence[StreamTally], timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            for tally in tallies:
                await tally.ended.wait()


def _gateway_cost(result: ScenarioResult) -> Figure:
    """Gateway CPU time per delivered token: a figure that other load on the machine moves
    far less than a rate does (it shows what a dedicated core would give)."""
    cpu_s = result.cpu.get("gateway", 0.0) * result.window_s / 100
    return Figure("gateway CPU per delivered token", 1e6 * cpu_s / result.tokens_delivered, "us")


def _stream_notes(
    result: ScenarioResult, tallies: Sequence[StreamTally], expected: int, trimmed: int = 0
) -> None:
    """Say what a reader of the figures must know: lost tokens, resumes, gaps."""
    delivered = sum(t.tokens for t in tallies)
    gaps = sum(t.gaps for t in tallies)
    if delivered < expected * len(tallies):
        why = f"; MAXLEN ~ trimmed {trimmed:,} entries of the stream" if trimmed else ""
        told = f"{gaps} gap events told the clients" if gaps else "no gap event told the clients"
        result.notes.append(
            f"{expected * len(tallies) - delivered:,} of {expected * len(tallies):,} tokens "
            f"never reached a client{why}; {told}"
        )
    reconnects = sum(t.reconnects for t in tallies)
    if reconnects:
        reasons: dict[str, int] = {}
        for tally in tallies:
            for reason in tally.closed_reasons:
                reasons[reason] = reasons.get(reason, 0) + 1
        shown = ", ".join(f"{r}: {n}" for r, n in sorted(reasons.items())) or "socket closed"
        result.notes.append(f"{reconnects} resumes with Last-Event-ID after cuts ({shown})")
    if gaps and delivered >= expected * len(tallies):
        result.notes.append(f"{gaps} gap events")


async def single_session(
    bench: Bench, tokens: int, timeout_s: float, producer: str = "fast"
) -> ScenarioResult:
    """1. One client, one session; ``tokens`` written as fast as the producer can.

    ``producer="fast"`` is the real Producer; ``"raw"`` is pipelined plain XADDs (1b), which
    shows what the gateway alone can deliver when the producer is not the slower side.
    """
    raw = producer == "raw"
    result = ScenarioResult(
        "1b. single session, raw XADD producer" if raw else "1. single session, full speed"
    )
    tally = StreamTally(f"bench-{bench.tag}-{producer}-{tokens}")
    async with asyncio.TaskGroup() as group:
        await bench.subscribe([tally], group)
        produced, window = await bench.run_producer(
            [producer, "--session", tally.session_id, "--tokens", str(tokens)], timeout_s
        )
        await bench.until_ended([tally], timeout_s)
        await bench.close_window(window, result, produced["cpu_s"])
    assert tally.first_token_at is not None and tally.end_at is not None
    rate = tally.tokens / max(tally.end_at - tally.first_token_at, 1e-9)
    written = produced["tokens"] / produced["duration_s"]
    result.tokens_delivered = tally.tokens
    target = "≥ 100,000 (gateway alone)" if raw else "≥ 100,000"
    result.figures = [
        Figure("delivered to the client", rate, "tokens/s", target, rate >= 100_000),
        Figure("producer write rate", written, "tokens/s"),
    ]
    if not raw:
        result.figures += [
            Figure("producer round trips per token", produced["writes"] / tokens, ""),
            Figure("producer round trips (writes)", produced["writes"], ""),
        ]
    result.figures.append(_gateway_cost(result))
    _stream_notes(result, [tally], tokens, await bench.trimmed(tally.session_id))
    return result


async def fanout(bench: Bench, connections: int, tokens: int, timeout_s: float) -> ScenarioResult:
    """3. ``connections`` clients on one session; the real Producer writes ``tokens`` fast."""
    result = ScenarioResult(f"3. fan-out, {connections} connections")
    session_id = f"bench-{bench.tag}-fanout-{tokens}"
    tallies = [StreamTally(session_id) for _ in range(connections)]
    async with asyncio.TaskGroup() as group:
        await bench.subscribe(tallies, group)
        produced, window = await bench.run_producer(
            ["fast", "--session", session_id, "--tokens", str(tokens)], timeout_s
        )
        await bench.until_ended(tallies, timeout_s)
        await bench.close_window(window, result, produced["cpu_s"])
    first = min(t.first_token_at for t in tallies if t.first_token_at is not None)
    last = max(t.end_at for t in tallies if t.end_at is not None)
    delivered = sum(t.tokens for t in tallies)
    rate = delivered / max(last - first, 1e-9)
    result.tokens_delivered = delivered
    result.figures = [
        Figure("delivered, sum over connections", rate, "tokens/s", "≥ 300,000",
               rate >= 300_000),
        Figure("per connection", rate / connections, "tokens/s"),
        Figure("producer write rate", produced["tokens"] / produced["duration_s"], "tokens/s"),
        Figure("first token to last end", (last - first) * 1000, "ms"),
    ]  # fmt: skip
    result.figures.append(_gateway_cost(result))
    _stream_notes(result, tallies, tokens, await bench.trimmed(session_id))
    return result


def _percentile(ordered: Sequence[int], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6


async def latency(
    bench: Bench, sessions: int, rate: float, duration_s: float, timeout_s: float
) -> ScenarioResult:
    """2. ``sessions`` sessions at ``rate`` tokens/s each; added latency of every token."""
    total_rate = sessions * rate
    result = ScenarioResult(f"2. added latency, {sessions} sessions x {rate:g} tokens/s")
    tallies = [
        StreamTally(session_id, latency=True)
        for session_id in paced_session_ids(bench.tag, sessions)
    ]
    args = ["paced", "--tag", bench.tag, "--sessions", str(sessions)]
    args += ["--rate", str(rate), "--duration", str(duration_s)]
    async with asyncio.TaskGroup() as group:
        await bench.subscribe(tallies, group)
        produced, window = await bench.run_producer(args, duration_s + timeout_s)
        await bench.until_ended(tallies, timeout_s)
        await bench.close_window(window, result, produced["cpu_s"])
    if produced["errors"] or produced["replies"] != produced["events"]:
        result.notes.append(
            f"producer: {produced['replies']} replies to {produced['events']} XADDs, "
            f"errors {produced['errors']}"
        )
    samples = sorted(ns for tally in tallies for ns in tally.latencies_ns)
    if not samples:
        raise RuntimeError("no token reached a client")
    result.tokens_delivered = len(samples)
    p99 = _percentile(samples, 0.99)
    result.figures = [
        Figure("p50 added latency", _percentile(samples, 0.50), "ms"),
        Figure("p90 added latency", _percentile(samples, 0.90), "ms"),
        Figure("p99 added latency", p99, "ms", f"< 5 at {total_rate:,.0f} tokens/s", p99 < 5),
        Figure("max added latency", samples[-1] / 1e6, "ms"),
        Figure("offered load", produced["tokens"] / produced["duration_s"], "tokens/s"),
        Figure("producer pacing: p99 lateness", produced["late_p99_ms"], "ms"),
    ]
    result.figures.append(_gateway_cost(result))
    _stream_notes(result, tallies, produced["tokens"] // sessions)
    return result


async def pipeline(
    bench: Bench, generations: int, tokens: int, rate: float, timeout_s: float
) -> ScenarioResult:
    """4. The processor pipeline: a backlog of ``generations`` x ``tokens`` (written by a real
    worker at ``rate`` tokens/s per generation, so entries are as small as a live model's),
    drained by one process running every configured processor. Key prefix of its own."""
    paced = f"{rate:g} tokens/s each" if rate else "unpaced"
    result = ScenarioResult(f"4. processor pipeline, {generations} x {tokens} tokens, {paced}")
    env = {
        **bench.env,
        "TOKENBRIDGE_KEY_PREFIX": f"bp{bench.tag}{int(rate)}",
        "TOKENBRIDGE_RATE_LIMIT_TOKENS_PER_MINUTE": "1000000000",  # charged, never refused
        "TOKENBRIDGE_CONSUMER_BLOCK_MS": "200",  # the drain's last read returns soon after
    }
    base = [sys.executable, "-m", "benchmarks.pipeline"]
    feed_args = ["feed", "--generations", str(generations), "--tokens", str(tokens)]
    feed = Child("pipeline feed", [*base, *feed_args, "--rate", str(rate)], env)
    drain = Child(
        "processors", [*base, "drain"], env, ready_marker=pipeline_process.READY, stdin_pipe=True
    )
    try:
        feed.start()
        if await feed.wait_exit(timeout_s) != 0:
            raise RuntimeError(f"pipeline feed failed:\n{feed.output()}")
        fed = json.loads(next(ln for ln in reversed(feed.lines) if ln.startswith("{")))
        drain.start()
        await drain.wait_ready(30)
        window = await bench.open_window()
        drain.send_line("go")
        if await drain.wait_exit(timeout_s) != 0:
            raise RuntimeError(f"processors failed:\n{drain.output()}")
    finally:
        feed.stop()
        drain.stop()
    drained = json.loads(next(ln for ln in reversed(drain.lines) if ln.startswith("{")))
    await bench.close_window(window, result, drained["cpu_s"])
    result.cpu["processors"] = result.cpu.pop("producer")
    seconds = drained["duration_s"]
    entries, written = drained["entries"], fed["tokens"]
    result.tokens_delivered = written
    result.figures = [
        Figure("entries through all processors", entries / seconds, "entries/s"),
        Figure("tokens through all processors", written / seconds, "tokens/s"),
        Figure("tokens per pipeline entry", written / max(entries, 1), ""),
        Figure("processors CPU per entry", 1e6 * drained["cpu_s"] / max(entries, 1), "us"),
        Figure("entries per group (one round trip)", entries / max(drained["groups"], 1), ""),
    ]
    for name, figures in sorted(drained["processors"].items()):
        ms = 1000 * figures["time_spent_s"] / max(figures["processed"], 1)
        result.figures.append(Figure(f"{name}: time per entry (wall, concurrent)", ms, "ms"))
    if entries != fed["entries"]:
        result.notes.append(f"{fed['entries'] - entries:,} pipeline entries were not acked")
    if (drained["analytics_generations"], drained["analytics_tokens"]) != (generations, written):
        result.notes.append(
            f"analytics counted {drained['analytics_generations']} generations and "
            f"{drained['analytics_tokens']:,} tokens, expected {generations} and {written:,}"
        )
    return result
