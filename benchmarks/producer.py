"""Producers of the benchmark, each run as its own process (``python -m benchmarks.producer``).

A producer in its own process neither steals the clients' event loop nor is slowed by it.
Each mode connects, prints ``producer ready``, waits for a line on stdin (so that the bench
opens its measurement window after the start-up), runs, and prints one JSON line of figures.

``fast``: the real :class:`tokenbridge.producer.producer.Producer` runs one generation of the
``demo`` model at ``params.rate=0`` (as fast as it can) into one session.

``raw``: the same session events as ``fast``, as plain pipelined ``XADD ... MAXLEN ~`` over a
raw RESP connection, hundreds per round trip: a producer far cheaper than the real one, so
that a gateway's own ceiling shows even where the real Producer is the slower side.

``spread``: as ``raw``, over ``--sessions`` sessions at once: each session's events in order,
the sessions interleaved (event ``k`` of every session, then ``k + 1``), so that all of them
stream at the same time, each as fast as the gateway and Redis take it.

``paced``: plain ``XADD`` s that follow the wire format (docs/wire-format.md), sent over one
raw RESP connection so that the timestamp is taken right before the bytes leave: ``text`` of
a token is ``time.time_ns()`` at that moment. Session ``i`` of ``n`` at ``rate`` tokens/s gets
its events at ``t0 + (k * n + i) / (n * rate)``: absolute deadlines, so a late wake-up never
makes the rate drift, and the load is spread evenly rather than in bursts of ``n``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from typing import Any, cast

import hiredis

from benchmarks.processes import new_runner
from tokenbridge.producer.jobs import GenerationJob, Message
from tokenbridge.producer.models.base import GenerationParams
from tokenbridge.producer.models.demo import DemoModel
from tokenbridge.producer.producer import Producer
from tokenbridge.settings import load_settings
from tokenbridge.store.client import close_client, command_client
from tokenbridge.store.live import APPEND_SCRIPT, AppendCommand
from tokenbridge.store.resp import pack
from tokenbridge.store.scripts import Scripts
from tokenbridge.wire.keys import Keys, new_generation_id

__all__ = [
    "paced_session_ids",
    "run_fast",
    "run_paced",
    "run_raw",
    "run_spread",
    "spread_session_ids",
]

READY = "producer ready"


def paced_session_ids(tag: str, sessions: int) -> list[str]:
    """The session ids of a paced run (the clients subscribe to the same ones)."""
    return [f"bench-{tag}-lat-{i}" for i in range(sessions)]


def spread_session_ids(tag: str, sessions: int) -> list[str]:
    """The session ids of a spread run (the clients subscribe to the same ones)."""
    return [f"bench-{tag}-spread-{i}" for i in range(sessions)]


async def run_fast(session_id: str, tokens: int, sessions: int = 0) -> dict[str, Any]:
    """One generation of ``tokens`` demo tokens, unpaced, with the settings' defaults; with
    ``sessions``, one such generation in each of the spread sessions of tag ``session_id``
    at once (standalone or cluster: the real Producer routes by slot)."""
    settings = load_settings()
    url = settings.redis_url_value()
    if url is None:
        raise SystemExit("TOKENBRIDGE_REDIS_URL is not set")
    redis = command_client(
        url,
        settings.redis_max_connections,
        settings.redis_socket_timeout_s,
        cluster=settings.redis_cluster,
    )
    try:
        producer = Producer(
            redis,
            Scripts(redis),
            Keys(settings.key_prefix),
            stream_max_len=settings.stream_max_len,
            retention_s=settings.stream_retention_s,
            max_generation_s=settings.stream_max_generation_s,
            max_pending=settings.producer_max_pending,
            # As in production: one pipeline entry per batch (TOKENBRIDGE_PIPELINE_ENABLED).
            pipeline_shards=settings.pipeline_shards if settings.pipeline_enabled else 0,
            pipeline_max_len=settings.pipeline_max_len,
            outage_s=settings.redis_outage_s,
            max_pending_bytes=settings.producer_max_pending_bytes,
            history_s=settings.stream_history_s,
            history_max_len=settings.stream_history_max_len,
        )
        ids = spread_session_ids(session_id, sessions) if sessions else [session_id]
        jobs = [
            GenerationJob(
                generation_id=new_generation_id(),
                session_id=sid,
                model="demo",
                messages=[Message(role="user", content="benchmark")],
                params=GenerationParams(max_tokens=tokens, rate=0.0),
            )
            for sid in ids
        ]
        await redis.ping()
        await _ready_then_go()
        cpu = time.process_time()
        started = time.monotonic()
        results = await asyncio.gather(*(producer.run(job, DemoModel()) for job in jobs))
        result = results[0]
        cpu = time.process_time() - cpu
    finally:
        await close_client(redis)
    return {
        "outcome": result.outcome,
        "tokens": sum(r.tokens for r in results),
        "writes": sum(r.writes for r in results),
        "duration_s": time.monotonic() - started,
        "cpu_s": cpu,
        "stream_max_len": settings.stream_max_len,
    }


class _Link(asyncio.Protocol):
    """A pipelined RESP connection that counts replies; errors are kept, not raised."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.replies = 0
        self.errors: list[str] = []
        self.transport: asyncio.Transport | None = None
        self.lost_reason: str | None = None
        self._target = 0
        self._reached = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            self.replies += 1
            if isinstance(reply, hiredis.ReplyError) and len(self.errors) < 10:
                self.errors.append(str(reply))
        if self.replies >= self._target:
            self._reached.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_reason = str(exc) if exc else "closed"
        self._reached.set()

    def send(self, commands: bytes) -> None:
        if self.lost_reason is not None:
            raise ConnectionError(f"redis connection lost: {self.lost_reason}")
        assert self.transport is not None
        self.transport.write(commands)

    async def until(self, replies: int) -> None:
        """Wait until ``replies`` replies have arrived (or the connection is lost)."""
        self._target = replies
        if self.replies < replies and self.lost_reason is None:
            self._reached.clear()
            await self._reached.wait()


async def _open_link(url: str) -> _Link:
    host_port = url.split("://", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    _, link = await asyncio.get_running_loop().create_connection(_Link, host, int(port))
    link.send(pack(b"SCRIPT", b"LOAD", APPEND_SCRIPT.encode()))  # then EVALSHA finds it
    await link.until(1)
    link.replies = 0
    return link


async def _ready_then_go() -> None:
    """Say ready, then wait for the bench's go (a line on stdin)."""
    print(READY, flush=True)
    await asyncio.to_thread(sys.stdin.readline)


def _fields(
    gen: bytes, seq: int, tokens: int, wall_ns: int, text: bytes | None
) -> list[tuple[bytes, bytes]]:
    """Event ``seq``: 0 is ``start``, 1..tokens are tokens, tokens + 1 is ``end``. A token's
    text is ``text``, else ``wall_ns`` (the send time, for latency)."""
    ts = b"%d" % (wall_ns // 1_000_000)
    head = [(b"v", b"1")]
    if seq == 0:
        kind = [(b"kind", b"start"), (b"gen", gen), (b"seq", b"0"), (b"ts", ts)]
        return [*head, *kind, (b"model", b"bench")]
    if seq <= tokens:
        kind = [(b"kind", b"token"), (b"gen", gen), (b"seq", b"%d" % seq), (b"ts", ts)]
        return [*head, *kind, (b"text", text if text is not None else b"%d" % wall_ns)]
    kind = [(b"kind", b"end"), (b"gen", gen), (b"seq", b"%d" % seq), (b"ts", ts)]
    return [*head, *kind, (b"reason", b"stop"), (b"tokens", b"%d" % tokens)]


def _event(
    key: bytes,
    gen: bytes,
    seq: int,
    tokens: int,
    wall_ns: int,
    text: bytes | None = None,
    maxlen: int | None = None,
) -> bytes:
    """One event, appended and published as every producer does (the append script)."""
    return _append(key, gen, [seq], tokens, wall_ns, text, maxlen)


def _append(
    key: bytes,
    gen: bytes,
    seqs: Sequence[int],
    tokens: int,
    wall_ns: int,
    text: bytes | None = None,
    maxlen: int | None = None,
) -> bytes:
    """The events ``seqs`` of one session in one call of the append script (store/live.py);
    its failover check is off (a benchmark writes on)."""
    base = key.removesuffix(b"events")
    command = AppendCommand(
        (key, base + b"meta", base + b"gens", base + b"live"), gen, maxlen or 100_000, [], []
    )
    events = [AppendCommand.event(_fields(gen, seq, tokens, wall_ns, text)) for seq in seqs]
    state = b"%s %d" % (b"done" if seqs[-1] > tokens else b"running", seqs[-1])
    return command.pack(events, state, b"", None, b"b0000001", 3600)


async def run_raw(session_id: str, tokens: int, batch: int = 500) -> dict[str, Any]:
    """``tokens`` tokens into one session, ``batch`` XADDs per write, at most 20 in flight."""
    settings = load_settings()
    url = settings.redis_url_value()
    if url is None:
        raise SystemExit("TOKENBRIDGE_REDIS_URL is not set")
    key = Keys(settings.key_prefix).events(session_id).encode()
    gen = new_generation_id().encode()
    link = await _open_link(url)
    await _ready_then_go()
    loop = asyncio.get_running_loop()
    cpu, started = time.process_time(), loop.time()
    sent = 0
    for first in range(0, tokens + 2, batch):
        now = time.time_ns()
        seqs = range(first, min(first + batch, tokens + 2))
        link.send(_append(key, gen, seqs, tokens, now, b" token", settings.stream_max_len))
        sent += 1
        await link.until(sent - 20)  # bounded: Redis and the socket set the pace
    await link.until(sent)
    duration = loop.time() - started
    cpu = time.process_time() - cpu
    assert link.transport is not None
    link.transport.close()
    return {
        "tokens": tokens,
        "writes": sent,
        "replies": link.replies,
        "errors": link.errors,
        "duration_s": duration,
        "cpu_s": cpu,
    }


async def run_spread(tag: str, sessions: int, tokens: int, batch: int = 500) -> dict[str, Any]:
    """``tokens`` tokens into each of ``sessions`` sessions, interleaved, ``batch`` XADDs per
    write, at most 20 writes in flight."""
    settings = load_settings()
    url = settings.redis_url_value()
    if url is None:
        raise SystemExit("TOKENBRIDGE_REDIS_URL is not set")
    keys = Keys(settings.key_prefix)
    streams = [keys.events(s).encode() for s in spread_session_ids(tag, sessions)]
    gens = [new_generation_id().encode() for _ in range(sessions)]
    link = await _open_link(url)
    await _ready_then_go()
    loop = asyncio.get_running_loop()
    cpu, started = time.process_time(), loop.time()
    sent = 0
    pending: list[bytes] = []
    maxlen = settings.stream_max_len
    for seq in range(tokens + 2):
        now = time.time_ns()
        for key, gen in zip(streams, gens, strict=True):
            pending.append(_event(key, gen, seq, tokens, now, b" token", maxlen))
        if len(pending) >= batch or seq == tokens + 1:
            link.send(b"".join(pending))
            sent += len(pending)
            pending.clear()
            await link.until(sent - 20 * batch)  # bounded: Redis and the socket set the pace
    await link.until(sent)
    duration = loop.time() - started
    cpu = time.process_time() - cpu
    assert link.transport is not None
    link.transport.close()
    return {
        "tokens": tokens * sessions,
        "replies": link.replies,
        "errors": link.errors,
        "duration_s": duration,
        "cpu_s": cpu,
    }


async def run_paced(tag: str, sessions: int, rate: float, duration_s: float) -> dict[str, Any]:
    """``sessions`` generations at ``rate`` tokens/s each for ``duration_s``, one RESP link."""
    settings = load_settings()
    url = settings.redis_url_value()
    if url is None:
        raise SystemExit("TOKENBRIDGE_REDIS_URL is not set")
    keys = Keys(settings.key_prefix)
    stream_keys = [keys.events(s).encode() for s in paced_session_ids(tag, sessions)]
    gens = [new_generation_id().encode() for _ in range(sessions)]
    tokens = max(1, round(rate * duration_s))
    link = await _open_link(url)
    await _ready_then_go()
    loop = asyncio.get_running_loop()
    interval = 1.0 / (sessions * rate)
    total = sessions * (tokens + 2)  # start, tokens, end
    lateness: list[float] = []
    cpu = time.process_time()
    t0 = loop.time() + 0.05
    for j in range(total):
        due = t0 + j * interval
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        lateness.append(loop.time() - due)
        session, seq = j % sessions, j // sessions
        wall_ns = time.time_ns()
        link.send(_event(stream_keys[session], gens[session], seq, tokens, wall_ns))
    elapsed = loop.time() - t0
    async with asyncio.timeout(30):
        await link.until(total)
    cpu = time.process_time() - cpu
    assert link.transport is not None
    link.transport.close()
    lateness.sort()
    return {
        "events": total,
        "tokens": sessions * tokens,
        "replies": link.replies,
        "errors": link.errors,
        "duration_s": elapsed,
        "cpu_s": cpu,
        "late_p99_ms": lateness[int(0.99 * (len(lateness) - 1))] * 1000,
        "late_max_ms": lateness[-1] * 1000,
    }


def _main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.producer")
    modes = parser.add_subparsers(dest="mode", required=True)
    for mode, help_text in (
        ("fast", "the real Producer, demo model, rate 0"),
        ("raw", "pipelined plain XADDs, as fast as Redis takes them"),
    ):
        one = modes.add_parser(mode, help=help_text)
        one.add_argument("--session", required=True)
        one.add_argument("--tokens", type=int, required=True)
        one.add_argument("--sessions", type=int, default=0, help="fast: over N spread sessions")
    spread = modes.add_parser("spread", help="pipelined plain XADDs into many sessions")
    spread.add_argument("--tag", required=True)
    spread.add_argument("--sessions", type=int, required=True)
    spread.add_argument("--tokens", type=int, required=True)
    paced = modes.add_parser("paced", help="plain XADDs at a fixed rate per session")
    paced.add_argument("--tag", required=True)
    paced.add_argument("--sessions", type=int, required=True)
    paced.add_argument("--rate", type=float, required=True)
    paced.add_argument("--duration", type=float, required=True)
    args = parser.parse_args()
    if args.mode == "fast":
        work = run_fast(args.session, args.tokens, args.sessions)
    elif args.mode == "raw":
        work = run_raw(args.session, args.tokens)
    elif args.mode == "spread":
        work = run_spread(args.tag, args.sessions, args.tokens)
    else:
        work = run_paced(args.tag, args.sessions, args.rate, args.duration)
    with new_runner() as runner, contextlib.suppress(KeyboardInterrupt):
        print(json.dumps(runner.run(work)), flush=True)


if __name__ == "__main__":
    _main()
