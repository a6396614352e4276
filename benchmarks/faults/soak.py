"""The soak: steady load with short retention; keys, Redis memory and the gateway's RSS must
level off, and no key may outlive its documented TTL."""

from __future__ import annotations

import asyncio
import random
import re
import time
from typing import Any

import httpx

from benchmarks.faults.harness import FaultEnv, Outcome, start_generation, until
from benchmarks.processes import process_rss_bytes

__all__ = ["soak"]

RETENTION_S = 5
MAX_GENERATION_S = 10
_BOUND_S = MAX_GENERATION_S + RETENTION_S  # the longest documented TTL of these settings
_GLOBAL = (
    r"jobs|workers|running|dlq|log|processors|pipeline:\d+|pipeline:lost|auth:secret|auth:keys"
    r"|cache:lru|\{stats\}:total|\{stats\}:models|\{stats\}:model:[^:]+|wake:[0-9a-f]+:\d+"
    r"|\{stats\}:series:\d+|proc:[0-9a-f]+|procs"
)
_SHORT = {
    "stream_retention_s": str(RETENTION_S),
    "stream_max_generation_s": str(MAX_GENERATION_S),
    "analytics_retention_s": str(RETENTION_S),
    "processors_once_ttl_s": str(RETENTION_S),
    "cache_ttl_s": str(RETENTION_S),
}


async def soak(env: FaultEnv, seed: int, duration_s: float = 60.0, rate: float = 10.0) -> Outcome:
    """``rate`` generations/s for ``duration_s``; samples every 2 s; then the load stops and
    every per-generation key must be gone within the longest TTL."""
    rng = random.Random(seed)
    gw = await env.node("gw", **_SHORT)
    samples: list[tuple[float, int, int, int]] = []  # (t, keys, used_memory, gateway rss)
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=30) as http:
        sampler = asyncio.create_task(_sample(env, gw.pid, samples))
        try:
            while time.monotonic() - started < duration_s:
                prompt = f"soak {rng.randrange(50)}"  # repeats: some answers from the cache
                await start_generation(http, gw.url, rng.randrange(5, 40), 0, prompt=prompt)
                await asyncio.sleep(1 / rate)  # the load's pace
        finally:
            sampler.cancel()
    over_ttl = await _keys_over_ttl(env)
    leftover = await until(lambda: _only_globals(env), _BOUND_S + 10, every_s=0.5)
    third = max(1, len(samples) // 3)
    figures: dict[str, Any] = {"duration_s": duration_s, "samples": len(samples)}
    ok = not over_ttl and leftover
    for column, name in ((1, "keys"), (2, "used_memory"), (3, "gateway_rss")):
        middle = max(s[column] for s in samples[third : 2 * third]) or 1
        last = max(s[column] for s in samples[2 * third :])
        figures[f"{name} mid/last"] = f"{middle}/{last}"
        ok = ok and last <= middle * 1.25  # levelled off: the last third no higher than +25 %
    figures["keys_over_ttl"] = len(over_ttl)
    return Outcome(bool(ok), figures, ", ".join(over_ttl[:3]))


async def _sample(
    env: FaultEnv, pid: int | None, samples: list[tuple[float, int, int, int]]
) -> None:
    while True:
        info: Any = await env.redis.info("memory")
        keys = int(await env.redis.dbsize())
        rss = process_rss_bytes(pid) or 0
        samples.append((time.monotonic(), keys, int(info["used_memory"]), rss))
        await asyncio.sleep(2)  # a sampling period, not a sync


def _global(prefix: str, name: str) -> bool:
    return re.fullmatch(rf"{prefix}:(?:{_GLOBAL})", name) is not None


async def _keys_over_ttl(env: FaultEnv) -> list[str]:
    """Keys that are neither bounded globals nor expiring within the longest documented TTL."""
    bad = []
    async for raw in env.redis.scan_iter(count=1000):
        name = raw.decode()
        if not name.startswith(f"{env.prefix}:"):
            bad.append(name)  # every key starts with the prefix
        elif not _global(env.prefix, name):
            ttl = await env.redis.pttl(name)
            if ttl == -1 or ttl > _BOUND_S * 1000:
                bad.append(f"{name} ttl={ttl}")
    return bad


async def _only_globals(env: FaultEnv) -> bool:
    async for raw in env.redis.scan_iter(count=1000):
        if not _global(env.prefix, raw.decode()):
            return False
    return True
