"""``python -m benchmarks``: start Redis and one gateway process, run the scenarios, report.

Run from the source checkout (see benchmarks/README.md). Every process it starts (Redis, the
gateway, producers) is stopped by PID when it returns, fails, or gets Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console

from benchmarks.connections import Transport, idle_connections, many_sessions
from benchmarks.live import live_floor, sessions_live
from benchmarks.openai_chat import openai_chat
from benchmarks.processes import GatewayProcess, machine_info, new_runner, raise_open_files_limit
from benchmarks.report import print_report
from benchmarks.scenarios import (
    Bench,
    Figure,
    ScenarioResult,
    fanout,
    latency,
    pipeline,
    single_session,
)
from benchmarks.storm import storm
from tokenbridge.exceptions import TokenBridgeError
from tokenbridge.store.embedded import EmbeddedRedis

__all__ = ["main"]

SCENARIOS = (
    "idle-sse",
    "idle-ws",
    "single",
    "single-raw",
    "latency",
    "fanout",
    "sessions-sse",
    "sessions-ws",
    "sessions-live",
    "live-floor",
    "pipeline",
    "storm",
    "storm-fresh",
    "sessions-fast",
    "openai-chat",
)


@dataclass(frozen=True)
class Options:
    scenarios: tuple[str, ...]
    tokens: int
    fanout_connections: int
    fanout_tokens: int
    sessions: int
    rate: float
    duration_s: float
    timeout_s: float
    pipeline_generations: int = 400
    pipeline_tokens: int = 100
    pipeline_rate: float = 50.0
    idle_connections: int = 5000
    idle_sessions: int = 5000
    spread_connections: int = 1000
    spread_sessions: int = 100
    spread_tokens: int = 2000
    storm_clients: tuple[int, ...] = (1000, 2500, 5000)
    storm_missed: int = 4
    live_sessions: tuple[int, ...] = (200, 2000)
    live_rate: float = 20.0
    live_transports: tuple[Transport, ...] = ("sse", "ws")
    cluster: bool = False
    openai_tokens: int = 8_000
    openai_rounds: int = 10


def _parse(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure tokenbridge on an embedded Redis and one gateway process.",
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run (seconds)")
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {', '.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument("--tokens", type=int, help="single: tokens (200,000; quick 20,000)")
    parser.add_argument("--fanout-connections", type=int, default=100, help="fanout: clients")
    parser.add_argument(
        "--fanout-tokens", type=int, help="fanout: tokens written (20,000; quick 2,000)"
    )
    parser.add_argument("--sessions", type=int, default=200, help="latency: sessions")
    parser.add_argument("--rate", type=float, default=20.0, help="latency: tokens/s per session")
    parser.add_argument("--duration", type=float, help="latency: seconds (20; quick 5)")
    parser.add_argument("--timeout", type=float, default=120.0, help="bound of each wait, s")
    parser.add_argument(
        "--pipeline-generations", type=int, help="pipeline: generations (400; quick 100)"
    )
    parser.add_argument("--pipeline-tokens", type=int, default=100, help="pipeline: tokens each")
    parser.add_argument(
        "--pipeline-rate", type=float, default=50.0, help="pipeline: tokens/s each (0: unpaced)"
    )
    parser.add_argument(
        "--idle-connections", type=int, help="idle-sse/ws: connections (5,000; quick 1,000)"
    )
    parser.add_argument("--idle-sessions", type=int, help="idle-sse/ws: sessions (as many)")
    parser.add_argument(
        "--spread-connections", type=int, default=1000, help="sessions-sse/ws: clients"
    )
    parser.add_argument("--spread-sessions", type=int, default=100, help="sessions-sse/ws")
    parser.add_argument(
        "--spread-tokens", type=int, help="sessions-sse/ws: tokens per session (2,000; quick 200)"
    )
    parser.add_argument(
        "--clients",
        help="storm: clients resuming at once, comma-separated (1000,2500,5000; quick 500)",
    )
    parser.add_argument("--storm-missed", type=int, default=4, help="storm: events missed")
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="run on a Redis Cluster (3 primaries + 3 replicas) instead of one Redis",
    )
    parser.add_argument(
        "--openai-tokens",
        type=int,
        default=8000,
        help="openai-chat: tokens per generation (8,000: under stream_max_len)",
    )
    parser.add_argument("--openai-rounds", type=int, help="openai-chat: rounds (10; quick 3)")
    parser.add_argument(
        "--live-sessions",
        default="200,2000",
        help="sessions-live, live-floor: session counts (200,2000)",
    )
    parser.add_argument(
        "--live-rate", type=float, default=20.0, help="sessions-live, live-floor: tokens/s"
    )
    parser.add_argument(
        "--live-transports", default="sse,ws", help="sessions-live: sse, ws or both (sse,ws)"
    )
    args = parser.parse_args(argv)
    chosen = tuple(s.strip() for s in args.scenarios.split(",") if s.strip())
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown or not chosen:
        parser.error(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    quick = args.quick
    return Options(
        scenarios=tuple(s for s in SCENARIOS if s in chosen),
        tokens=args.tokens or (20_000 if quick else 200_000),
        fanout_connections=args.fanout_connections,
        fanout_tokens=args.fanout_tokens or (2_000 if quick else 20_000),
        sessions=args.sessions,
        rate=args.rate,
        duration_s=args.duration or (5.0 if quick else 20.0),
        timeout_s=args.timeout,
        pipeline_generations=args.pipeline_generations or (100 if quick else 400),
        pipeline_tokens=args.pipeline_tokens,
        pipeline_rate=args.pipeline_rate,
        idle_connections=args.idle_connections or (1000 if quick else 5000),
        idle_sessions=args.idle_sessions or args.idle_connections or (1000 if quick else 5000),
        spread_connections=args.spread_connections,
        spread_sessions=args.spread_sessions,
        spread_tokens=args.spread_tokens or (200 if quick else 2000),
        storm_clients=tuple(int(n) for n in args.clients.split(","))
        if args.clients
        else ((500,) if quick else (1000, 2500, 5000)),
        storm_missed=args.storm_missed,
        live_sessions=tuple(int(n) for n in args.live_sessions.split(",") if n.strip()),
        live_rate=args.live_rate,
        live_transports=tuple(
            "sse" if t.strip() == "sse" else "ws" for t in args.live_transports.split(",")
        ),
        cluster=args.cluster,
        openai_tokens=args.openai_tokens,
        openai_rounds=args.openai_rounds or (3 if quick else 10),
    )


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, TimeoutError) and not str(exc):
        return "TimeoutError: a bounded wait passed its deadline (see --timeout)"
    return f"{type(exc).__name__}: {exc}"


async def _scenarios(bench: Bench, name: str, options: Options) -> list[ScenarioResult]:
    if name in ("storm", "storm-fresh"):  # one result per client count, smallest first
        fresh = name == "storm-fresh"
        return [
            await storm(bench, clients, options.storm_missed, options.timeout_s, fresh)
            for clients in sorted(options.storm_clients)
        ]
    if name == "sessions-live":  # one result per transport and session count
        return [
            await sessions_live(
                bench, transport, sessions, options.live_rate, options.duration_s,
                options.timeout_s,
            )
            for transport in options.live_transports
            for sessions in options.live_sessions
        ]  # fmt: skip
    if name == "live-floor":  # the floor relay under the same load: SSE, each session count
        return await live_floor(
            bench, options.live_sessions, options.live_rate, options.duration_s, options.timeout_s
        )
    return [await _scenario(bench, name, options)]


async def _scenario(bench: Bench, name: str, options: Options) -> ScenarioResult:
    if name == "warm-up":  # a first short run, so that no figure includes start-up costs
        return await single_session(bench, 2_000, options.timeout_s)
    if name in ("single", "single-raw"):
        producer = "raw" if name == "single-raw" else "fast"
        return await single_session(bench, options.tokens, options.timeout_s, producer)
    if name == "latency":
        return await latency(
            bench, options.sessions, options.rate, options.duration_s, options.timeout_s
        )
    if name in ("idle-sse", "idle-ws"):
        transport: Transport = "sse" if name == "idle-sse" else "ws"
        return await idle_connections(
            bench, transport, options.idle_connections, options.idle_sessions, options.timeout_s
        )
    if name == "sessions-fast":  # the real Producer into many sessions at once
        return await many_sessions(
            bench, "sse", options.spread_connections, options.spread_sessions,
            options.spread_tokens, options.timeout_s, producer="fast",
        )  # fmt: skip
    if name in ("sessions-sse", "sessions-ws"):
        spread: Transport = "sse" if name == "sessions-sse" else "ws"
        return await many_sessions(
            bench,
            spread,
            options.spread_connections,
            options.spread_sessions,
            options.spread_tokens,
            options.timeout_s,
        )
    if name == "openai-chat":
        return await openai_chat(
            bench, options.openai_tokens, options.openai_rounds, options.timeout_s
        )
    if name == "pipeline":
        return await pipeline(
            bench,
            options.pipeline_generations,
            options.pipeline_tokens,
            options.pipeline_rate,
            options.timeout_s,
        )
    return await fanout(bench, options.fanout_connections, options.fanout_tokens, options.timeout_s)


async def _run(options: Options, console: Console) -> int:
    current = asyncio.current_task()
    assert current is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, current.cancel)
    raise_open_files_limit()  # thousands of client sockets in this process
    results: list[ScenarioResult] = []
    failures: list[tuple[str, str]] = []
    target: Any = _cluster() if options.cluster else EmbeddedRedis()
    with target as redis_server:
        version = redis_server.nodes[0].version if options.cluster else redis_server.version
        machine = machine_info(version + (" (cluster: 3 primaries + 3 replicas)" * options.cluster))
        gateway = GatewayProcess(redis_server.url)
        try:
            gateway.start()
            await gateway.wait_ready(timeout_s=30)
            bench = Bench(redis_server, gateway, tag=secrets.token_hex(3))
            try:
                for name in ("warm-up", *options.scenarios):
                    with console.status(f"running {name}"):
                        try:
                            done = await _scenarios(bench, name, options)
                        except (Exception, ExceptionGroup) as exc:  # report, go on with the next
                            failures.append((name, _describe(exc)))
                            if name == "warm-up" or not gateway.running:
                                failures.append(("gateway", f"output:\n{gateway.output()}"))
                                break
                            continue
                    if name != "warm-up":
                        results.extend(_per_primary(r) if options.cluster else r for r in done)
            finally:
                await bench.aclose()
        finally:
            gateway.stop()
    print_report(console, machine, results, failures)
    return 1 if failures else 0


def _cluster() -> Any:
    """The tests' RedisCluster (3 primaries + 3 replicas of redis-server on free ports)."""
    from tests.servers import RedisCluster  # run from the source checkout

    return RedisCluster()


def _per_primary(result: ScenarioResult) -> ScenarioResult:
    """A cluster run: Redis CPU per delivered token and the share of appends, per primary."""
    tokens = max(result.tokens_delivered, 1)
    appends = {k.split("@")[1]: v for k, v in result.per_node.items() if k.startswith("evalsha@")}
    total = sum(appends.values()) or 1
    for key, cpu_s in sorted(result.per_node.items()):
        if not key.startswith("redis:"):
            continue
        port = key.split(":")[1]
        if port not in appends and cpu_s < 0.01:
            continue  # a replica, idle
        result.figures.append(
            Figure(f"Redis CPU per delivered token, node {port}", 1e6 * cpu_s / tokens, "us")
        )
        if port in appends:
            share = 100 * appends[port] / total
            result.figures.append(Figure(f"share of append calls on node {port}", share, "%"))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit code (130 on Ctrl-C, 143 on SIGTERM)."""
    options = _parse(argv)
    console = Console(width=None if sys.stdout.isatty() else 120)
    runner = new_runner()
    try:
        with runner:
            return runner.run(_run(options, console))
    except KeyboardInterrupt:
        console.print("[red]interrupted: every process the benchmark started is stopped[/red]")
        return 130
    except (RuntimeError, TokenBridgeError) as exc:
        console.print(f"[red]{type(exc).__name__}: {exc}[/red]", highlight=False)
        return 1
    except asyncio.CancelledError:
        console.print("[red]terminated: every process the benchmark started is stopped[/red]")
        return 143


if __name__ == "__main__":
    sys.exit(main())
