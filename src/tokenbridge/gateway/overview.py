"""The whole deployment in one picture: what the dashboard, the admin API and CLI show.

Everything comes from Redis, so any gateway answers the same: the processes' presence records
(``presence.py``: roles, heartbeats, connections, counters), the consumer groups of the job
and pipeline streams (``XINFO``, ``XPENDING``), the dead letters, the analytics totals and
their last 15 minutes (``store/series.py``), and the processors' published stats.
Every read is bounded (processes, letters, shards) and no command spans two keys.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from redis.asyncio import Redis

from tokenbridge.consumers.dead_letters import DeadLetters
from tokenbridge.consumers.stream_consumer_service import group_status
from tokenbridge.presence import list_processes
from tokenbridge.store.series import read_series
from tokenbridge.store.stats import read_pipeline_status, read_processor_stats, read_stats
from tokenbridge.wire.events import now_ms
from tokenbridge.wire.keys import Keys

__all__ = ["consumer_groups", "deployment", "overview"]

_LETTERS_SHOWN = 50


def _entry_ms(entry_id: Any) -> int | None:
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id or "")
    head = text.partition("-")[0]
    return int(head) if head.isdigit() else None


async def consumer_groups(redis: Redis, keys: Keys, shards: int) -> list[dict[str, Any]]:
    """Groups of the job stream and the pipeline shards: consumers, pending, lag, and the
    age of the oldest pending entry (``XPENDING`` summary)."""
    now = now_ms()
    out: list[dict[str, Any]] = []
    for stream in (keys.jobs, *(keys.pipeline(i) for i in range(shards))):
        for group in await group_status(redis, stream):
            oldest_ms = None
            if group["pending"]:
                summary: Any = await redis.xpending(stream, group["group"])
                first = _entry_ms(summary.get("min"))
                oldest_ms = None if first is None else max(0, now - first)
            out.append({**group, "oldest_pending_ms": oldest_ms})
    return out


def _connections(processes: list[dict[str, Any]]) -> dict[str, Any]:
    """Connections per gateway node and in total, from the presence records."""
    nodes = []
    total: Counter[str] = Counter()
    by_transport: Counter[str] = Counter()
    for p in processes:
        conns = p.get("counters", {}).get("connections")
        if not isinstance(conns, dict):
            continue
        fanout = p.get("counters", {}).get("fanout") or {}
        row = {
            "node_id": p["node_id"],
            "host": p.get("host"),
            "pid": p.get("pid"),
            "draining": p.get("draining", False),
            "open": conns.get("total", 0),
            "by_transport": conns.get("by_transport", {}),
            "sessions": conns.get("sessions", 0),
            "live_sessions": fanout.get("sessions", 0),
            "events_sent": conns.get("events_sent", 0),
            "slow_client_closed": conns.get("slow_client_closed", 0),
            "closed": conns.get("closed", {}),
        }
        nodes.append(row)
        by_transport.update(row["by_transport"])
        for name in ("open", "sessions", "live_sessions", "events_sent", "slow_client_closed"):
            total[name] += row[name]
    return {"nodes": nodes, "total": {**total, "by_transport": dict(by_transport)}}


def _sum(processes: list[dict[str, Any]], source: str, field: str) -> int:
    total = 0
    for p in processes:
        part = p.get("counters", {}).get(source)
        if isinstance(part, dict):
            total += int(part.get(field, 0) or 0)
    return total


async def deployment(redis: Redis, keys: Keys) -> dict[str, Any]:
    """The processes and their connections (the cheap half of :func:`overview`)."""
    processes = await list_processes(redis, keys)
    return {
        "now_ms": now_ms(),
        "processes": processes,
        "connections": _connections(processes),
    }


async def overview(redis: Redis, keys: Keys, shards: int) -> dict[str, Any]:
    """Everything the dashboard shows, as of now."""
    body = await deployment(redis, keys)
    processes = body["processes"]
    dlq = DeadLetters(redis, keys.dead_letters)
    processors = await read_processor_stats(redis, keys)
    hits, misses = _sum(processes, "cache", "hits"), _sum(processes, "cache", "misses")
    body.update(
        {
            "generations": await read_stats(redis, keys),
            "series": await read_series(redis, keys, body["now_ms"]),
            "running": _sum(processes, "worker", "running"),
            "consumers": await consumer_groups(redis, keys, shards),
            "dead_letters": {
                "count": await dlq.count(),
                "letters": [lt.as_dict() for lt in await dlq.letters(_LETTERS_SHOWN)],
            },
            "processors": {
                "processors": processors["processors"],
                "pipeline": await read_pipeline_status(redis, keys, shards),
                "cache": {
                    "hits": hits,
                    "misses": misses,
                    "hit_ratio": round(hits / (hits + misses), 4) if hits + misses else None,
                },
                "rate_limit_refused": _sum(processes, "rate_limit", "refused"),
            },
        }
    )
    return body
