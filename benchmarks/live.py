"""``sessions-live``: the realistic load of an LLM service, many sessions at a live model's pace.

Each run subscribes one reader per session (SSE or WebSocket), then the ``paced`` producer
writes ``--live-rate`` (20) tokens/s into every session for ``--duration`` s: session ``i``'s
``k``-th event at ``t0 + (k * n + i) / (n * rate)``, its ``text`` the producer's
``time.time_ns()`` right before the bytes leave. Reported per run: the gateway's CPU per
delivered token (the figure to compare across commits), the added latency of every token
(receipt at the client - that timestamp: p50, p99), and the gateway's resident memory at the
end of the window. Runs: ``--live-sessions`` (200 and 2,000) x SSE and WebSocket.

``live-floor``: the same load, readers and figures over SSE, served by the floor relay
(benchmarks/floor_relay.py: one Redis connection, a bare HTTP protocol, nothing but
parse-format-write per token) in a process of its own instead of the gateway: what CPython on
uvloop needs at the least on this machine, to read the gateway's figure against.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from benchmarks.connections import Transport, _open
from benchmarks.processes import FloorRelayProcess, process_rss_bytes
from benchmarks.producer import paced_session_ids
from benchmarks.scenarios import Bench, Figure, ScenarioResult, _gateway_cost, _stream_notes
from benchmarks.sse_client import StreamTally

__all__ = ["live_floor", "sessions_live"]

_CPU_TARGET_US = 20.0
_P50_TARGET_MS = 0.3
_P99_TARGET_MS = 1.0


def _percentile(ordered: Sequence[int], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6


async def sessions_live(
    bench: Bench,
    transport: Transport,
    sessions: int,
    rate: float,
    duration_s: float,
    timeout_s: float,
) -> ScenarioResult:
    """``sessions`` sessions x ``rate`` tokens/s, one ``transport`` reader each."""
    label = "SSE" if transport == "sse" else "WebSocket"
    name = f"8. live, {sessions:,} sessions x {rate:g} tokens/s, {label}"
    tag = f"{bench.tag}{transport}{sessions}"
    return await _live(bench, name, tag, transport, sessions, rate, duration_s, timeout_s)


async def live_floor(
    bench: Bench,
    session_counts: Sequence[int],
    rate: float,
    duration_s: float,
    timeout_s: float,
) -> list[ScenarioResult]:
    """The same load and figures as ``sessions_live`` over SSE, served by the floor relay
    (benchmarks/floor_relay.py, a process of its own) instead of the gateway."""
    if bench.cluster:
        raise RuntimeError("live-floor runs on one Redis (the relay has one connection)")
    relay = FloorRelayProcess(bench.redis_server.url)
    try:
        relay.start()
        await relay.wait_ready(timeout_s=30)
        floor = Bench(bench.redis_server, relay, tag=bench.tag)
        try:
            results = []
            for sessions in session_counts:
                load = f"{sessions:,} sessions x {rate:g} tokens/s, SSE"
                name = f"8f. floor: minimal Python relay, {load}"
                tag = f"{bench.tag}flr{sessions}"  # as long as sessions-live's: same key sizes
                results.append(
                    await _live(
                        floor, name, tag, "sse", sessions, rate, duration_s, timeout_s, "relay"
                    )
                )
            return results
        finally:
            await floor.aclose()
    finally:
        relay.stop()


async def _live(
    bench: Bench,
    name: str,
    tag: str,
    transport: Transport,
    sessions: int,
    rate: float,
    duration_s: float,
    timeout_s: float,
    server: str = "gateway",
) -> ScenarioResult:
    """One run: subscribe a reader per session of ``tag``, run the paced producer, measure
    ``bench.gateway`` (named ``server`` in the figures)."""
    result = ScenarioResult(name)
    tallies = [StreamTally(s, latency=True) for s in paced_session_ids(tag, sessions)]
    args = ["paced", "--tag", tag, "--sessions", str(sessions)]
    args += ["--rate", str(rate), "--duration", str(duration_s)]
    gateway = bench.gateway
    async with asyncio.TaskGroup() as group:
        tasks = await _open(gateway.host, gateway.port, transport, tallies, group, timeout_s)
        produced, window = await bench.run_producer(args, duration_s + timeout_s)
        await bench.until_ended(tallies, timeout_s)
        await bench.close_window(window, result, produced["cpu_s"])
        rss = process_rss_bytes(gateway.pid)
        for task in tasks:  # WebSocket readers return at ``end``; SSE ones too: no-op
            task.cancel()
    if produced["errors"] or produced["replies"] != produced["events"]:
        result.notes.append(
            f"producer: {produced['replies']} replies to {produced['events']} XADDs, "
            f"errors {produced['errors']}"
        )
    samples = sorted(ns for tally in tallies for ns in tally.latencies_ns)
    if not samples:
        raise RuntimeError("no token reached a client")
    result.tokens_delivered = len(samples)
    p50, p99 = _percentile(samples, 0.50), _percentile(samples, 0.99)
    cost = _gateway_cost(result)
    small = sessions <= 200
    result.figures = [
        Figure(f"{server} CPU per delivered token", cost.value, "us",
               f"≤ {_CPU_TARGET_US:g}" if small else "",
               cost.value <= _CPU_TARGET_US if small else None),
        Figure("p50 added latency", p50, "ms", f"≤ {_P50_TARGET_MS:g}" if small else "",
               p50 <= _P50_TARGET_MS if small else None),
        Figure("p99 added latency", p99, "ms", f"≤ {_P99_TARGET_MS:g}" if small else "",
               p99 <= _P99_TARGET_MS if small else None),
        Figure("max added latency", samples[-1] / 1e6, "ms"),
        Figure(f"{server} CPU, % of one core", result.cpu.get("gateway", 0.0), "%"),
        Figure(f"{server} RSS at the end", (rss or 0) / 2**20, "MB"),
        Figure("offered load", produced["tokens"] / produced["duration_s"], "tokens/s"),
        Figure("producer pacing: p99 lateness", produced["late_p99_ms"], "ms"),
    ]  # fmt: skip
    _stream_notes(result, tallies, produced["tokens"] // sessions)
    return result
