"""Time series of the analytics: the last 15 minutes in 10-second buckets, bounded.

Written by the analytics processor and the workers, read by the dashboard (``/v1/admin/...``).

The analytics processor adds each finished generation, once (in the same ``ApplyOnce`` script
as the totals, so redelivery changes nothing), to the hash of the bucket of its terminal event
(``<prefix>:{stats}:series:<bucket>``, expiring after the window): outcome counts, tokens, and
per model the generation count and two log-scale histograms, time to first token (ms) and
tokens/s, from which percentiles are read (each bin spans a factor of 1.25, so a percentile is
within about 12 % of the exact value). Generation workers add their running count
(``run:<node>``, the last value per bucket). Storage is bounded: 90 buckets of at most
(models x bins) fields, each expiring after the window.

:func:`read_series` turns the buckets into the arrays the dashboard draws.
"""

from __future__ import annotations

import math
from typing import Any

from redis.asyncio import Redis

from tokenbridge.wire.keys import Keys

__all__ = [
    "BUCKET_S",
    "WINDOW_S",
    "bin_of",
    "bucket_of",
    "outcome_class",
    "percentile",
    "read_series",
    "series_increments",
]

BUCKET_S = 10
WINDOW_S = 900
TTL_MS = (WINDOW_S + 3 * BUCKET_S) * 1000
_FACTOR = 1.25
_LOG_FACTOR = math.log(_FACTOR)
_MAX_BIN = 80  # 1.25^80 ~ 5.6e7: above any TTFT in ms or tokens/s
_MAX_MODELS_SHOWN = 8
_OUTCOMES = ("finished", "failed", "cancelled")


def bucket_of(ts_ms: int) -> int:
    return ts_ms // (BUCKET_S * 1000)


def outcome_class(outcome: str) -> str:
    """``stop``/``length`` -> finished, ``cancelled``, ``error:<code>`` -> failed."""
    if outcome.startswith("error:"):
        return "failed"
    return "cancelled" if outcome == "cancelled" else "finished"


def bin_of(value: float) -> int:
    if value <= 1:
        return 0
    return min(_MAX_BIN, int(math.log(value) / _LOG_FACTOR) + 1)


def _bin_value(index: int) -> float:
    """A bin's representative value: the geometric middle of its bounds."""
    return 1.0 if index == 0 else _FACTOR ** (index - 0.5)


def series_increments(
    model: str, outcome: str, tokens: int, ttft_ms: int | None, tokens_per_s: float | None
) -> dict[str, int | float]:
    """What one finished generation adds to its bucket's hash."""
    inc: dict[str, int | float] = {
        f"out:{outcome_class(outcome)}": 1,
        "tok": tokens,
        f"m:{model}:gen": 1,
    }
    if ttft_ms is not None:
        inc[f"m:{model}:ttft:{bin_of(ttft_ms)}"] = 1
    if tokens_per_s is not None:
        inc[f"m:{model}:tps:{bin_of(tokens_per_s)}"] = 1
    return inc


def percentile(histogram: dict[int, int], q: float) -> float | None:
    """The ``q`` quantile (0-1) of a log-bin histogram; None when it is empty."""
    total = sum(histogram.values())
    if not total:
        return None
    rank = q * total
    seen = 0
    for index in sorted(histogram):
        seen += histogram[index]
        if seen >= rank:
            return round(_bin_value(index), 1)
    return round(_bin_value(max(histogram)), 1)


class _Model:
    __slots__ = ("gen", "tps", "ttft")

    def __init__(self, buckets: int) -> None:
        self.gen = [0] * buckets
        self.ttft: list[dict[int, int]] = [{} for _ in range(buckets)]
        self.tps: list[dict[int, int]] = [{} for _ in range(buckets)]


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def read_series(redis: Redis, keys: Keys, now: int) -> dict[str, Any]:
    """The window ending at ``now`` (ms): per-second rates per bucket, percentiles per model."""
    last = bucket_of(now)
    buckets = list(range(last - WINDOW_S // BUCKET_S + 1, last + 1))
    async with redis.pipeline(transaction=False) as pipe:
        for bucket in buckets:
            pipe.hgetall(keys.stats_series(bucket))
        rows: list[Any] = await pipe.execute()
    n = len(buckets)
    outcomes = {name: [0] * n for name in _OUTCOMES}
    tokens = [0] * n
    running: list[int | None] = [None] * n
    models: dict[str, _Model] = {}
    for i, row in enumerate(rows):
        for raw_field, raw_value in row.items():
            field, value = _s(raw_field), int(float(_s(raw_value)))
            kind, _, rest = field.partition(":")
            if kind == "out" and rest in outcomes:
                outcomes[rest][i] += value
            elif kind == "tok":
                tokens[i] += value
            elif kind == "run":
                running[i] = (running[i] or 0) + value
            elif kind == "m":
                _add_model(models, n, i, rest, value)
    return _series_body(buckets, outcomes, tokens, running, models)


def _add_model(models: dict[str, _Model], n: int, i: int, rest: str, value: int) -> None:
    if rest.endswith(":gen"):
        models.setdefault(rest[:-4], _Model(n)).gen[i] += value
        return
    head, _, index = rest.rpartition(":")
    name, _, metric = head.rpartition(":")
    if not name or metric not in ("ttft", "tps") or not index.isdigit():
        return
    model = models.setdefault(name, _Model(n))
    histogram = (model.ttft if metric == "ttft" else model.tps)[i]
    histogram[int(index)] = histogram.get(int(index), 0) + value


def _merged(histograms: list[dict[int, int]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for histogram in histograms:
        for index, count in histogram.items():
            out[index] = out.get(index, 0) + count
    return out


def _quantiles(histograms: list[dict[int, int]]) -> dict[str, Any]:
    window = _merged(histograms)
    return {
        "p50": [percentile(h, 0.5) for h in histograms],
        "p95": [percentile(h, 0.95) for h in histograms],
        "window": {f"p{q}": percentile(window, q / 100) for q in (50, 95, 99)},
    }


def _series_body(
    buckets: list[int],
    outcomes: dict[str, list[int]],
    tokens: list[int],
    running: list[int | None],
    models: dict[str, _Model],
) -> dict[str, Any]:
    shown = sorted(models, key=lambda m: -sum(models[m].gen))[:_MAX_MODELS_SHOWN]
    per_s = 1 / BUCKET_S
    return {
        "bucket_s": BUCKET_S,
        "window_s": WINDOW_S,
        "t_ms": [b * BUCKET_S * 1000 for b in buckets],
        "generations_per_s": {
            name: [round(v * per_s, 2) for v in values] for name, values in outcomes.items()
        },
        "generations": {name: sum(values) for name, values in outcomes.items()},
        "running": running,
        "tokens_per_s": [round(v * per_s, 1) for v in tokens],
        "tokens": sum(tokens),
        "models": {
            name: {
                "generations": sum(models[name].gen),
                "ttft_ms": _quantiles(models[name].ttft),
                "tokens_per_s": _quantiles(models[name].tps),
            }
            for name in shown
        },
    }
