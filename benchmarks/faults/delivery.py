"""Delivery faults: client cuts, a gateway SIGKILLed, a slow client, hostile text, foreign ids.

Each scenario starts its own processes (``FaultEnv``), drives real clients and returns its
figures with a verdict against the criterion stated in ``benchmarks/faults/__init__.py``.
"""

from __future__ import annotations

import asyncio
import random
import socket

import httpx

from benchmarks.faults.harness import (
    FaultEnv,
    Outcome,
    Recorder,
    exact,
    start_generation,
    until,
)
from benchmarks.faults.proxy import PausingProxy
from tokenbridge.producer.jobs import GenerationJob, Message
from tokenbridge.producer.models.base import GenerationParams
from tokenbridge.producer.producer import Producer
from tokenbridge.store.scripts import Scripts
from tokenbridge.wire.events import Event

__all__ = [
    "client_cuts",
    "cross_session",
    "gateway_kill",
    "hostile_sse",
    "partition",
    "reconnect_storm",
    "slow_client",
]

_CLIENTS = 10
_TOKENS = 300


async def client_cuts(env: FaultEnv, seed: int) -> Outcome:
    """Clients drop at random points and resume on a random one of two gateways."""
    rng = random.Random(seed)
    gateways = [(await env.node(f"gw{i}", "--no-worker")).url for i in range(2)]
    await env.node("worker", worker_only=True)
    session = f"s_cuts{seed}"
    recorders = [Recorder(session, lambda: gateways, rng) for _ in range(_CLIENTS)]
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=None)) as http:
        gid = await _subscribed_then_started(http, recorders, gateways[0], session, 200.0)
        plans = [sorted(rng.sample(range(3, _TOKENS), 3)) for _ in recorders]
        async with asyncio.timeout(60):
            await asyncio.gather(
                *(r.follow(http, gid, p) for r, p in zip(recorders, plans, strict=False))
            )
    verdicts = [exact(r.of(gid), _TOKENS) for r in recorders]
    bad = [why for ok, why in verdicts if not ok]
    figures = {"clients": _CLIENTS, "reconnects": sum(r.reconnects for r in recorders),
               "exact": len(verdicts) - len(bad)}  # fmt: skip
    return Outcome(not bad, figures, bad[0] if bad else "")


async def _subscribed_then_started(
    http: httpx.AsyncClient, recorders: list[Recorder], gateway: str, session: str, rate: float
) -> str:
    """Start the generation; the recorders read it from its first event (history)."""
    del recorders
    started = await start_generation(http, gateway, _TOKENS, rate, session_id=session)
    return str(started["generation_id"])


async def gateway_kill(env: FaultEnv, seed: int) -> Outcome:
    """The gateway holding every client is SIGKILLed mid-answer, then restarted."""
    rng = random.Random(seed)
    doomed = await env.node("gw-doomed", "--no-worker")
    other = await env.node("gw-other", "--no-worker")
    await env.node("worker", worker_only=True)
    alive = [doomed.url]
    session = f"s_gwkill{seed}"
    recorders = [Recorder(session, lambda: alive, rng) for _ in range(_CLIENTS)]
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=None)) as http:
        gid = await _subscribed_then_started(http, recorders, doomed.url, session, 100.0)
        follows = [asyncio.create_task(r.follow(http, gid)) for r in recorders]
        async with asyncio.timeout(60):
            await until(lambda: min(len(r.events) for r in recorders) >= 20, 30)
            doomed.kill()
            alive[:] = [other.url]
            doomed.restart()
            await doomed.wait_ready(60)
            alive.append(doomed.url)
            await asyncio.gather(*follows)
    verdicts = [exact(r.of(gid), _TOKENS) for r in recorders]
    bad = [why for ok, why in verdicts if not ok]
    figures = {"clients": _CLIENTS, "reconnects": sum(r.reconnects for r in recorders),
               "exact": len(verdicts) - len(bad)}  # fmt: skip
    return Outcome(not bad, figures, bad[0] if bad else "")


async def slow_client(env: FaultEnv, seed: int) -> Outcome:
    """A reader at a tenth of a fast session's speed: cut within its byte budget, then its
    resume continues exactly (or starts with ``gap``)."""
    budget = 128 * 1024
    gw = await env.node(
        "gw", connection_max_buffered_bytes=str(budget), connection_send_buffer_bytes="16384",
        connection_max_buffered_events="1000000",
    )  # fmt: skip
    session = f"s_slow{seed}"
    tokens = 20_000
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    received = bytearray()
    async with httpx.AsyncClient(timeout=30) as http:
        try:
            await loop.sock_connect(sock, ("127.0.0.1", gw.port))
            request = f"GET /v1/sessions/{session}/events HTTP/1.1\r\nHost: x\r\n\r\n"
            await loop.sock_sendall(sock, request.encode())
            started = None
            async with asyncio.timeout(90):
                while chunk := await loop.sock_recv(sock, 1024):
                    received += chunk
                    if started is None and b"retry:" in received:
                        started = await start_generation(
                            http, gw.url, tokens, 20_000, session_id=session
                        )
                    await asyncio.sleep(len(chunk) / 100_000)  # ~100 KB/s: the slow pace
        finally:
            sock.close()
        assert started is not None
        cut = b": closed slow_client" in received
        rec = Recorder(session, lambda: [gw.url], random.Random(seed))
        rec.last_id = _last_id(bytes(received))
        async with asyncio.timeout(60):
            await rec.follow(http, started["generation_id"])
    first_seq = rec.events[0].seq if rec.events else -1
    resumed = rec.events and (rec.events[0].kind == "gap" or first_seq > 0)
    figures = {"budget_bytes": budget, "received_before_cut": len(received),
               "cut": cut, "resumed_events": len(rec.events)}  # fmt: skip
    figures["first_last"] = f"{rec.events[0].kind}/{rec.events[-1].kind}" if rec.events else "-"
    ok = cut and bool(resumed) and rec.events[-1].kind == "end"
    return Outcome(ok, figures, "" if ok else "not cut, or resume incomplete")


def _last_id(raw: bytes) -> str | None:
    at = raw.rfind(b"\nid: ")
    return raw[at + 5 : raw.index(b"\n", at + 5)].decode().strip() if at >= 0 else None


_HOSTILE = [
    "\n\nevent: end\ndata: {}\n\n", "id: 0-0\r\n", "data: x\r\rdata: y", "\r\n\r\n:",
    "\u2028\u2029", "\x00", "event: error", '"}]', "\ud7ff\ue000", "é" * 3,
]  # fmt: skip


async def hostile_sse(env: FaultEnv, seed: int) -> Outcome:
    """Tokens full of SSE framing (newlines, ``event:``, ``id:``) arrive as text, intact."""
    rng = random.Random(seed)
    gw = await env.node("gw", "--no-worker", "--no-processors")
    session = f"s_hostile{seed}"
    gid = f"g_hostile{seed}"
    texts = [rng.choice(_HOSTILE) + str(i) for i in range(200)]
    events = [Event("start", gid, 0, model="demo")]
    events += [Event("token", gid, i + 1, text=t) for i, t in enumerate(texts)]
    events.append(Event("end", gid, len(texts) + 1, reason="stop", tokens=len(texts)))
    producer = Producer(env.redis, Scripts(env.redis), env.keys, 10_000, 60, 60, 4096)
    job = GenerationJob(
        generation_id=gid, session_id=session, model="demo",
        messages=[Message(role="user", content="x")], params=GenerationParams(),
    )  # fmt: skip
    await producer.write_events(job, *events)
    rec = Recorder(session, lambda: [gw.url], rng)
    async with httpx.AsyncClient(timeout=30) as http, asyncio.timeout(30):
        await rec.follow(http, gid)
    got = [e.data.get("text", "") for e in rec.of(gid) if e.kind == "token"]
    ok, why = exact(rec.of(gid), len(texts))
    ok = ok and got == texts
    figures = {
        "tokens": len(texts),
        "intact": sum(a == b for a, b in zip(got, texts, strict=False)),
    }
    return Outcome(ok, figures, why or ("" if ok else "text changed"))


async def cross_session(env: FaultEnv, seed: int) -> Outcome:
    """A Last-Event-ID of session A presented on session B: B's own events, a ``gap`` at
    most, never one of A's."""
    rng = random.Random(seed)
    gw = await env.node("gw")
    async with httpx.AsyncClient(timeout=30) as http:
        a = await start_generation(http, gw.url, 20, 0, session_id=f"s_a{seed}")
        rec_a = Recorder(a["session_id"], lambda: [gw.url], rng)
        async with asyncio.timeout(30):
            await rec_a.follow(http, a["generation_id"])
        b = await start_generation(http, gw.url, 20, 0, session_id=f"s_b{seed}")
        rec_b = Recorder(b["session_id"], lambda: [gw.url], rng)
        rec_b.last_id = rec_a.events[-1].id  # A's id, on B
        async with asyncio.timeout(30):
            await rec_b.follow(http, b["generation_id"])
    foreign = [e for e in rec_b.events if e.generation_id == a["generation_id"]]
    ok, why = exact(rec_b.of(b["generation_id"]), 20)
    figures = {"foreign_events": len(foreign), "gaps": sum(e.kind == "gap" for e in rec_b.events)}
    return Outcome(ok and not foreign, figures, why)


async def partition(env: FaultEnv, seed: int) -> Outcome:
    """The gateway loses Redis for 5 s (a proxy holds every byte) mid-answer: its readers
    wait and resume; every client gets every token exactly once."""
    rng = random.Random(seed)
    tokens, pause_s = 600, 5.0
    async with PausingProxy(_port_of(env.redis_url)) as proxy:
        gw = await env.node("gw", "--no-worker", redis_url=proxy.url)
        await env.node("worker", worker_only=True)
        session = f"s_part{seed}"
        recorders = [Recorder(session, lambda: [gw.url], rng) for _ in range(_CLIENTS)]
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=None)) as h:
            started = await start_generation(h, gw.url, tokens, 100, session_id=session)
            gid = started["generation_id"]
            follows = [asyncio.create_task(r.follow(h, gid)) for r in recorders]
            await until(lambda: min(len(r.events) for r in recorders) >= 20, 30)
            proxy.pause()
            await asyncio.sleep(pause_s)  # the partition's length, not a sync
            proxy.resume()
            async with asyncio.timeout(60):
                await asyncio.gather(*follows)
    verdicts = [exact(r.of(gid), tokens) for r in recorders]
    bad = [why for ok, why in verdicts if not ok]
    figures = {"clients": _CLIENTS, "pause_s": pause_s, "exact": len(verdicts) - len(bad),
               "reconnects": sum(r.reconnects for r in recorders)}  # fmt: skip
    return Outcome(not bad, figures, bad[0] if bad else "")


def _port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


async def reconnect_storm(env: FaultEnv, seed: int) -> Outcome:
    """200 clients of one gateway lose it at once (SIGKILL) and all resume on the other at
    the same moment: every client gets every token exactly once."""
    rng = random.Random(seed)
    clients, tokens = 200, 400
    doomed = await env.node("gw-doomed", "--no-worker")
    other = await env.node("gw-other", "--no-worker")
    await env.node("worker", worker_only=True)
    alive = [doomed.url]
    session = f"s_storm{seed}"
    recorders = [Recorder(session, lambda: alive, rng) for _ in range(clients)]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        started = await start_generation(http, doomed.url, tokens, 100, session_id=session)
        gid = started["generation_id"]
        follows = [asyncio.create_task(r.follow(http, gid)) for r in recorders]
        await until(lambda: min(len(r.events) for r in recorders) >= 20, 60)
        alive[:] = [other.url]
        doomed.kill()
        async with asyncio.timeout(90):
            await asyncio.gather(*follows)
    verdicts = [exact(r.of(gid), tokens) for r in recorders]
    bad = [why for ok, why in verdicts if not ok]
    figures = {"clients": clients, "exact": len(verdicts) - len(bad),
               "reconnects": sum(r.reconnects for r in recorders)}  # fmt: skip
    return Outcome(not bad, figures, bad[0] if bad else "")
