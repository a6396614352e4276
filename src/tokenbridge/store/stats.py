"""What the processors report, read from Redis: analytics figures, processor stats, lag.

Every reader here is read-only and sees what all processes wrote: the analytics counters
(``processors/analytics.py``), the per-process processor stats that each StreamProcessor
publishes (``<prefix>:processors``), and each pipeline shard's length, pending count and lag
in the ``processors`` group. ``GET /v1/stats``, ``GET /v1/sessions/{id}/stats`` and
``tokenbridge stats`` show them.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from typing import Any

from redis.asyncio import Redis

from tokenbridge.text import as_text
from tokenbridge.wire.keys import PROCESSOR_GROUP, Keys

__all__ = [
    "read_pipeline_status",
    "read_processor_stats",
    "read_session_stats",
    "read_stats",
    "summarize",
]


def _n(value: Any) -> int | None:
    text = as_text(value)
    return int(text) if text else None


def summarize(counters: Mapping[Any, Any]) -> dict[str, Any]:
    """Counters of one scope (hash) -> the figures the API shows."""
    c = {as_text(k): int(float(as_text(v))) for k, v in counters.items()}

    def avg(total: str, n: str) -> float | None:
        return round(c[total] / c[n], 3) if c.get(n) else None

    return {
        "generations": c.get("generations", 0),
        "tokens": c.get("tokens", 0),
        "prompt_tokens": c.get("prompt_tokens", 0),
        "errors": c.get("errors", 0),
        "errors_by_code": {
            k.removeprefix("error:"): v for k, v in sorted(c.items()) if k.startswith("error:")
        },
        "cancels": c.get("cancels", 0),
        "cached": c.get("cached", 0),
        "ttft_ms_avg": avg("ttft_ms_sum", "ttft_n"),
        "duration_ms_avg": avg("duration_ms_sum", "duration_n"),
        "tokens_per_s": round(c["rate_tokens"] * 1000 / c["rate_ms"], 3)
        if c.get("rate_ms")
        else None,
    }


async def read_stats(redis: Redis, keys: Keys) -> dict[str, Any]:
    """Totals and per-model figures, as every process sees them."""
    k = keys
    total: Any = await redis.hgetall(k.stats_total)
    names: Any = await redis.hkeys(k.stats_models)
    models = sorted(as_text(n) for n in names)
    per_model: dict[str, Any] = {}
    if models:
        async with redis.pipeline(transaction=False) as pipe:
            for name in models:
                pipe.hgetall(k.stats_model(name))
            rows = await pipe.execute()
        per_model = {name: summarize(row) for name, row in zip(models, rows, strict=True)}
    return {"total": summarize(total), "models": per_model}


async def read_session_stats(
    redis: Redis, keys: Keys, session_id: str, limit: int = 100
) -> dict[str, Any] | None:
    """One session's figures and its newest ``limit`` generations; None if none recorded."""
    k = keys
    counters: Any = await redis.hgetall(k.session_stats(session_id))
    ids: Any = await redis.zrevrange(k.session_stats_generations(session_id), 0, limit - 1)
    if not counters and not ids:
        return None
    generations = []
    if ids:
        async with redis.pipeline(transaction=False) as pipe:
            for gid in ids:
                pipe.hgetall(k.generation_stats(session_id, as_text(gid)))
            rows = await pipe.execute()
        generations = [_generation(as_text(gid), row) for gid, row in zip(ids, rows, strict=True)]
    return {"session_id": session_id, "total": summarize(counters), "generations": generations}


def _generation(generation_id: str, row: Mapping[Any, Any]) -> dict[str, Any]:
    h = {as_text(k): as_text(v) for k, v in row.items()}
    finished = h.get("applied") == "1"
    tokens = int(h["tokens"]) if finished else int(h.get("token_events", 0) or 0)
    rate_ms = _n(h.get("rate_ms"))
    return {
        "generation_id": generation_id,
        "model": h.get("model", ""),
        "finished": finished,
        "outcome": h.get("outcome") or None,
        "tokens": tokens,
        "cached": h.get("cached") == "1",
        "start_ms": _n(h.get("start_ts")),
        "ttft_ms": _n(h.get("ttft_ms")),
        "duration_ms": _n(h.get("duration_ms")),
        "tokens_per_s": round(tokens * 1000 / rate_ms, 3) if rate_ms else None,
    }


async def read_processor_stats(redis: Redis, keys: Keys) -> dict[str, Any]:
    """Every process's published processor stats, and their sums per processor."""
    raw: Any = await redis.hgetall(keys.processor_stats)
    processes: list[dict[str, Any]] = []
    for value in raw.values():
        with contextlib.suppress(ValueError, TypeError):
            processes.append(json.loads(value))
    processes.sort(key=lambda p: str(p.get("name", "")))
    totals: dict[str, dict[str, Any]] = {}
    for process in processes:
        for name, figures in _mapping(process.get("processors")).items():
            total = totals.setdefault(
                name, {"processed": 0, "failed": 0, "dead_lettered": 0, "time_spent_s": 0.0}
            )
            for key in ("processed", "failed", "dead_lettered", "time_spent_s"):
                total[key] += figures.get(key, 0)
            if figures.get("last_error_ms", 0) > total.get("last_error_ms", 0):
                total["last_error"] = figures.get("last_error", "")
                total["last_error_ms"] = figures["last_error_ms"]
    return {"processors": totals, "processes": processes}


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


async def read_pipeline_status(redis: Redis, keys: Keys, shards: int) -> list[dict[str, Any]]:
    """Per pipeline shard: entries kept, the processors group's pending count and lag (what
    really waits), and entries lost to the cap (``processors/pipeline_trim.py``)."""
    out: list[dict[str, Any]] = []
    lost: Any = await redis.hgetall(keys.pipeline_lost)
    for shard in range(shards):
        key = keys.pipeline(shard)
        row: dict[str, Any] = {"stream": key, "length": 0, "pending": 0, "lag": 0}
        row["lost"] = int(lost.get(str(shard).encode(), 0))
        async with redis.pipeline(transaction=False) as pipe:
            pipe.exists(key)
            pipe.xlen(key)
            exists, row["length"] = await pipe.execute()
        if exists:
            groups: Any = await redis.xinfo_groups(key)
            for group in groups:
                name = group["name"]
                if as_text(name) == PROCESSOR_GROUP:
                    row["pending"] = int(group["pending"])
                    row["lag"] = group.get("lag")
        out.append(row)
    return out
