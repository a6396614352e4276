"""Worker and pipeline faults: a worker SIGKILLed mid-answer, a processor SIGKILLed while
holding entries, a poison entry, entries trimmed while pending and before delivery."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import httpx

from benchmarks.faults.harness import FaultEnv, Outcome, Recorder, exact, start_generation, until
from tokenbridge.store.stats import read_pipeline_status, read_stats

__all__ = ["SlowProcessor", "poison_entry", "processor_kill", "trimmed_pending", "worker_kill"]

_SLOW = "benchmarks.faults.pipeline:SlowProcessor"


class SlowProcessor:
    """20 ms per entry (it stands for real work), so that a kill lands mid-way."""

    name = "slow"

    def __init__(self, context: Any) -> None:
        self.context = context

    async def process(self, batch: Any, entry_id: str) -> None:
        await asyncio.sleep(0.02)


def _entry(n: int, tokens: int = 1) -> dict[str, str]:
    """A valid pipeline entry holding a whole one-entry generation (start, tokens, end)."""
    gid = f"g_fault{n}"
    events: list[dict[str, Any]] = [{"kind": "start", "seq": 0, "ts": 1, "model": "demo"}]
    events += [{"kind": "token", "seq": i, "ts": 1 + i, "text": " w"} for i in range(1, tokens + 1)]
    events.append({"kind": "end", "seq": tokens + 1, "ts": 9, "reason": "stop", "tokens": tokens})
    return {"v": "1", "sid": f"s_fault{n % 7}", "gen": gid, "model": "demo",
            "events": json.dumps(events)}  # fmt: skip


async def _feed(env: FaultEnv, count: int, shard: int = 0, tokens: int = 1) -> None:
    async with env.redis.pipeline(transaction=False) as pipe:
        for n in range(count):
            pipe.xadd(env.keys.pipeline(shard), _entry(n, tokens))  # type: ignore[arg-type]
        await pipe.execute()


async def worker_kill(env: FaultEnv, seed: int) -> Outcome:
    """The worker running an answer is SIGKILLed: a survivor ends every stream right after
    the last event written (``worker_lost``), no seq twice, no client waiting forever."""
    rng = random.Random(seed)
    gw = await env.node("gw", "--no-worker")
    doomed = await env.node("worker-doomed", worker_only=True)
    async with httpx.AsyncClient(timeout=30) as http:
        started = await start_generation(http, gw.url, 10_000, 100, session_id=f"s_wk{seed}")
        gid = started["generation_id"]
        recorders = [Recorder(started["session_id"], lambda: [gw.url], rng) for _ in range(5)]
        follows = [asyncio.create_task(r.follow(http, gid)) for r in recorders]
        async with asyncio.timeout(60):
            await until(lambda: min(len(r.events) for r in recorders) >= 10, 30)
            doomed.kill()
            await env.node("worker-survivor", worker_only=True)
            await asyncio.gather(*follows)
    verdicts = [exact(r.of(gid)) for r in recorders]
    codes = {r.events[-1].data.get("code", r.events[-1].kind) for r in recorders}
    bad = [why for ok, why in verdicts if not ok]
    figures = {"clients": len(recorders), "ended_with": ",".join(sorted(codes)),
               "events": len(recorders[0].events)}  # fmt: skip
    return Outcome(not bad, figures, bad[0] if bad else "")


async def processor_kill(env: FaultEnv, seed: int) -> Outcome:
    """A processor process is SIGKILLed holding entries; a survivor takes them over and the
    analytics stay exact (every generation and token counted once)."""
    del seed
    entries, tokens = 500, 3
    proc = {"pipeline_shards": "1", "processors": "analytics", "processors_extra": _SLOW}
    args = ("--no-generations", "--processors")
    await _feed(env, entries, tokens=tokens)
    doomed = await env.node("proc-doomed", *args, worker_only=True, **proc)
    await until(lambda: _generations(env, lambda n: n >= 50), 60)
    pending = await _pending(env)
    doomed.kill()
    await env.node("proc-survivor", *args, worker_only=True, **proc)
    total = await until(lambda: _generations(env, lambda n: n >= entries), 60)
    await until(lambda: _no_pending(env), 30)
    stats = (await read_stats(env.redis, env.keys))["total"]
    figures = {"entries": entries, "pending_at_kill": pending,
               "generations": stats["generations"], "tokens": stats["tokens"]}  # fmt: skip
    ok = total and stats["generations"] == entries and stats["tokens"] == entries * tokens
    return Outcome(bool(ok) and pending > 0, figures, "" if ok else "analytics not exact")


async def _generations(env: FaultEnv, enough: Any) -> bool:
    return bool(enough((await read_stats(env.redis, env.keys))["total"]["generations"]))


async def _pending(env: FaultEnv) -> int:
    summary: Any = await env.redis.xpending(env.keys.pipeline(0), "processors")
    return int(summary["pending"])


async def _no_pending(env: FaultEnv) -> bool:
    return await _pending(env) == 0


async def poison_entry(env: FaultEnv, seed: int) -> Outcome:
    """An undecodable pipeline entry and an undecodable job are dead-lettered; the loops go
    on and the next answer is delivered and counted."""
    rng = random.Random(seed)
    gw = await env.node("gw", pipeline_shards="1")
    await env.redis.xadd(env.keys.pipeline(0), {"v": "1", "sid": "s_bad", "events": "["})
    await env.redis.xadd(env.keys.jobs, {"job": "{not json"})
    await until(lambda: env.redis.xlen(env.keys.dead_letters), 30)
    async with httpx.AsyncClient(timeout=30) as http:
        started = await start_generation(http, gw.url, 20, 0)
        rec = Recorder(started["session_id"], lambda: [gw.url], rng)
        async with asyncio.timeout(30):
            await rec.follow(http, started["generation_id"])
    await until(lambda: _generations(env, lambda n: n >= 1), 30)
    letters = await until(lambda: _at_least(env, 2), 30)
    ok, why = exact(rec.of(started["generation_id"]), 20)
    return Outcome(ok and letters >= 2, {"dead_letters": letters, "answer_exact": ok}, why)


async def _at_least(env: FaultEnv, n: int) -> int:
    length = int(await env.redis.xlen(env.keys.dead_letters))
    return length if length >= n else 0


async def trimmed_pending(env: FaultEnv, seed: int) -> Outcome:
    """Processors stalled past the pipeline cap, with entries pending on a dead consumer: each
    dropped entry is counted as lost, none silently; ``lag`` is 0 once caught up."""
    del seed
    added, cap = 400, 100
    await _feed(env, 100)
    await env.redis.xgroup_create(env.keys.pipeline(0), "processors", id="0")
    await env.redis.xreadgroup("processors", "dead", {env.keys.pipeline(0): ">"}, count=100)
    await _feed(env, added - 100)  # 100 pending on a dead consumer, 300 never delivered
    proc = {"pipeline_shards": "1", "processors": "analytics", "pipeline_max_len": str(cap)}
    await env.node("proc", "--no-generations", "--processors", worker_only=True, **proc)
    await until(lambda: _caught_up(env), 60)
    [row] = await read_pipeline_status(env.redis, env.keys, 1)
    counted = (await read_stats(env.redis, env.keys))["total"]["generations"]
    figures = {"added": added, "processed": counted, "lost": row["lost"], "lag": row["lag"],
               "pending": row["pending"]}  # fmt: skip
    ok = counted + row["lost"] >= added and counted <= added and row["lost"] > 0
    return Outcome(ok and row["lag"] == 0 and row["pending"] == 0, figures)


async def _caught_up(env: FaultEnv) -> bool:
    [row] = await read_pipeline_status(env.redis, env.keys, 1)
    return bool(row["lost"]) and row["lag"] == 0 and row["pending"] == 0
