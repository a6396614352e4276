"""Redis faults: a restart with and without persistence, a round trip whose reply is lost.

The producer retries a failed write for up to ``redis_outage_s``, and both commands of its
round trip (the pipeline entry, the append script) recognise a batch they already wrote, so
an answer goes on through a restart and a lost reply never doubles a ``seq`` or a pipeline
entry; these scenarios check it with real processes, clients and a real Redis.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from typing import Any

import httpx

from benchmarks.faults.harness import (
    FaultEnv,
    Outcome,
    Recorder,
    exact,
    start_generation,
    until,
)
from benchmarks.faults.proxy import ReplyCuttingProxy
from tokenbridge.store.live import APPEND_SHA

__all__ = ["AOF_ALWAYS", "lost_reply_first", "lost_reply_whole", "redis_restart_aof",
           "redis_restart_empty"]  # fmt: skip

AOF_ALWAYS = ("--appendonly", "yes", "--appendfsync", "always")
_SESSIONS = 5
_TOKENS = 400
EMPTY_BOUND_S = 30.0  # redis-restart-empty: every stream ends within this after the restart


async def _start_all(
    http: httpx.AsyncClient, gateway: str, rng: random.Random, tag: str, sessions: int,
    clients: int, tokens: int, rate: float,
) -> list[tuple[str, list[Recorder], asyncio.Task[Any]]]:  # fmt: skip
    """``sessions`` generations, each followed by ``clients`` recorders (tasks started)."""
    runs = []
    for n in range(sessions):
        session = f"s_{tag}{n}"
        started = await start_generation(http, gateway, tokens, rate, session_id=session)
        gid = started["generation_id"]
        recorders = [Recorder(session, lambda: [gateway], rng) for _ in range(clients)]
        follows = asyncio.gather(*(r.follow(http, gid) for r in recorders))
        runs.append((gid, recorders, asyncio.ensure_future(follows)))
    return runs


async def redis_restart_aof(env: FaultEnv, seed: int) -> Outcome:
    """Redis (append-only file, fsync always) is SIGKILLed mid-answer and restarted with its
    data: every answer goes on to its ``end``, every token exactly once, no ``worker_lost``."""
    rng = random.Random(seed)
    gw = await env.node("gw", "--no-worker")
    await env.node("worker", worker_only=True)
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=None)) as http:
        runs = await _start_all(http, gw.url, rng, f"aof{seed}_", _SESSIONS, 2, _TOKENS, 100)
        recorders = [r for _, rs, _ in runs for r in rs]
        await until(lambda: min(len(r.events) for r in recorders) >= 20 + rng.randrange(50), 30)
        down = time.monotonic()
        env.restart_redis(keep_data=True)
        restart_s = time.monotonic() - down
        async with asyncio.timeout(60):
            await asyncio.gather(*(task for _, _, task in runs))
    verdicts = [exact(r.of(gid), _TOKENS) for gid, rs, _ in runs for r in rs]
    bad = [why for ok, why in verdicts if not ok]
    codes = Counter(e.data.get("code") for r in recorders for e in r.events if e.kind == "error")
    figures = {"clients": len(recorders), "restart_s": round(restart_s, 2),
               "exact": len(verdicts) - len(bad), "gaps": sum(
                   e.kind == "gap" for r in recorders for e in r.events),
               "worker_lost": codes["worker_lost"]}  # fmt: skip
    return Outcome(not bad and not codes, figures, bad[0] if bad else ", ".join(codes))


async def lost_reply_whole(env: FaultEnv, seed: int) -> Outcome:
    """Round trips of the producer reach Redis whole and their replies are lost."""
    return await _lost_reply(env, seed, first_only=False)


async def lost_reply_first(env: FaultEnv, seed: int) -> Outcome:
    """Round trips of the producer reach Redis up to their first command (the pipeline
    entry), the rest and the reply are lost."""
    return await _lost_reply(env, seed, first_only=True)


async def _lost_reply(env: FaultEnv, seed: int, first_only: bool) -> Outcome:
    """The worker talks to Redis through a proxy that cuts 3 round trips per answer after
    the request (or its first command) left: every client gets every token exactly once,
    the stream holds each ``seq`` once, the pipeline each batch once and every event once."""
    rng = random.Random(seed)
    tokens, sessions, cuts = 300, 3, 3
    async with ReplyCuttingProxy(_port_of(env.redis_url), APPEND_SHA) as proxy:
        gw = await env.node("gw", "--no-worker", run_processors="false")
        await env.node("worker", worker_only=True, redis_url=proxy.url, run_processors="false")
        async with httpx.AsyncClient(timeout=30) as http:
            tag = f"lr{seed}{'f' if first_only else 'w'}_"
            runs = await _start_all(http, gw.url, rng, tag, sessions, 1, tokens, 100)
            for _ in range(cuts):
                await asyncio.sleep(rng.uniform(0.1, 0.5))  # where the cut lands
                proxy.arm(first_only)
                await until(lambda: not proxy.armed, 10, every_s=0.02)
            async with asyncio.timeout(60):
                await asyncio.gather(*(task for _, _, task in runs))
    verdicts = [exact(r.of(gid), tokens) for gid, rs, _ in runs for r in rs]
    bad = [why for ok, why in verdicts if not ok]
    stream_twice = pipeline_twice = pipeline_wrong = 0
    for n, (gid, _, _) in enumerate(runs):
        seqs = await _stream_seqs(env, f"s_{tag}{n}", gid)
        stream_twice += len(seqs) - len(set(seqs))
        batches = await _pipeline_batches(env, gid)
        firsts = [b[0] for b in batches]
        pipeline_twice += len(firsts) - len(set(firsts))
        covered = sorted(seq for batch in batches for seq in batch)
        pipeline_wrong += covered != list(range(tokens + 2))
    figures = {"cuts": proxy.cuts, "exact": len(verdicts) - len(bad),
               "stream_seq_twice": stream_twice, "pipeline_batch_twice": pipeline_twice,
               "pipeline_not_exact": pipeline_wrong}  # fmt: skip
    ok = not bad and proxy.cuts == cuts and not (stream_twice or pipeline_twice or pipeline_wrong)
    return Outcome(ok, figures, bad[0] if bad else "")


async def _stream_seqs(env: FaultEnv, session: str, gid: str) -> list[int]:
    entries: Any = await env.redis.xrange(env.keys.events(session))
    return [int(f[b"seq"]) for _, f in entries if f.get(b"gen") == gid.encode()]


async def _pipeline_batches(env: FaultEnv, gid: str, shards: int = 4) -> list[list[int]]:
    """The seqs of each pipeline entry of ``gid`` (the default 4 shards, nothing trimmed:
    no processor runs)."""
    batches = []
    for shard in range(shards):
        entries: Any = await env.redis.xrange(env.keys.pipeline(shard))
        for _, fields in entries:
            if fields.get(b"gen") == gid.encode():
                batches.append([e["seq"] for e in json.loads(fields[b"events"])])
    return batches


async def redis_restart_empty(env: FaultEnv, seed: int) -> Outcome:
    """Redis is SIGKILLed mid-answer and comes back empty: every client of the 10 sessions
    (3 each) gets ``gap`` and its stream ends (the rest of the answer then ``end``, or
    ``error generation_lost`` where the producer could not go on) within
    :data:`EMPTY_BOUND_S`; every session held by the gateway is re-checked, none waits."""
    rng = random.Random(seed)
    gw = await env.node("gw", "--no-worker")
    await env.node("worker", worker_only=True)
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=None)) as http:
        runs = await _start_all(http, gw.url, rng, f"restart{seed}_", 10, 3, 1500, 200)
        recorders = [r for _, rs, _ in runs for r in rs]
        await until(lambda: min(len(r.events) for r in recorders) >= 10, 30)
        env.restart_redis()
        restarted = time.monotonic()
        try:
            async with asyncio.timeout(EMPTY_BOUND_S):
                await asyncio.gather(*(task for _, _, task in runs))
        except TimeoutError:
            pass  # counted below: the clients whose stream did not end
        finally:
            for _, _, task in runs:
                task.cancel()
        took = time.monotonic() - restarted
    gapped = sum(any(e.kind == "gap" for e in r.events) for r in recorders)
    last = [r.events[-1] for r in recorders if r.events]
    ended = [e.data.get("code", e.kind) for e in last if e.kind in ("end", "error")]
    figures = {"clients": len(recorders), "gap": gapped, "ended": len(ended),
               "ended_with": ",".join(sorted(set(ended))),
               "ends_within_s": round(took, 1)}  # fmt: skip
    return Outcome(gapped == len(recorders) and len(ended) == len(recorders), figures)


def _port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])
