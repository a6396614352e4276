"""The processor pipeline's processes (``python -m benchmarks.pipeline feed|drain``).

``feed``: a generation worker (the real ``GenerationWorker`` and ``Producer``, processors off)
runs ``--generations`` ``demo`` generations of ``--tokens`` tokens at ``--rate`` tokens/s each
(0: unpaced), submitted as jobs with an identity (so the rate limiter tracks them), and returns
once the pipeline streams hold every generation's terminal event (read with ``XREAD BLOCK``).
It prints one JSON line: generations, tokens, pipeline entries.

``drain``: a ``StreamProcessor`` with the processors the settings switch on (by default all
four: analytics, logging, cache, rate_limit) reads that backlog in burst mode. It prints
``processors ready``, waits for a line on stdin (the bench opens its window), drains, and
prints one JSON line: entries acked, the time from go to the last handler's end, its CPU time,
each processor's figures, and the analytics totals (to check that they are exact).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from typing import Any

from benchmarks.processes import new_runner
from tokenbridge.processors.stream_processor import StreamProcessor
from tokenbridge.producer.jobs import GenerationJob, Message, submit_job
from tokenbridge.producer.models.base import GenerationParams
from tokenbridge.runtime import Runtime
from tokenbridge.settings import load_settings
from tokenbridge.store.stats import read_stats
from tokenbridge.wire.keys import new_generation_id
from tokenbridge.wire.pipeline import PipelineBatch

__all__ = ["READY", "run_drain", "run_feed"]

READY = "processors ready"


async def run_feed(generations: int, tokens: int, rate: float) -> dict[str, Any]:
    """Run the generations through a real worker; return once the pipeline holds them all."""
    settings = load_settings()
    async with Runtime(settings, worker=True, processors=False) as runtime:
        keys = runtime.keys
        streams: dict[Any, Any] = {keys.pipeline(n): "0-0" for n in range(settings.pipeline_shards)}
        for i in range(generations):
            job = GenerationJob(
                generation_id=new_generation_id(),
                session_id=f"bench-pipeline-{i % 50}",
                model="demo",
                messages=[Message(role="user", content=f"pipeline benchmark prompt {i}")],
                params=GenerationParams(max_tokens=tokens, rate=rate),
                identity="bench",
                background=True,  # nobody reads these streams: exempt from orphan_grace_s
            )
            await submit_job(runtime.redis, keys, job, settings.jobs_max_len, 3600)
        ended = entries = written = 0
        while ended < generations:  # blocks on the streams: no polling
            reply: Any = await runtime.redis.xread(streams, count=1000, block=5000)
            for stream, rows in reply or ():
                streams[stream.decode()] = rows[-1][0]
                for _, fields in rows:
                    batch = PipelineBatch.from_fields(fields)
                    entries += 1
                    written += batch.token_count
                    ended += batch.terminal is not None
    return {"generations": generations, "tokens": written, "entries": entries}


async def run_drain() -> dict[str, Any]:
    """Drain the pipeline backlog once with every configured processor; figures as JSON."""
    settings = load_settings()
    async with Runtime(settings, worker=False, processors=False) as runtime:
        processor = StreamProcessor.from_settings(
            runtime.redis, runtime.consumers, runtime.keys, settings, runtime.dead_letters
        )
        print(READY, flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        cpu, started = time.process_time(), time.time()
        await processor.run(burst=True)
        cpu = time.process_time() - cpu
        last = max(c.stats.last_activity for c in processor.consumers)
        acked = sum(c.stats.acked for c in processor.consumers)
        analytics = await read_stats(runtime.redis, runtime.keys)
        await processor.aclose()
    return {
        "entries": acked,
        "duration_s": max(last - started, 1e-9),
        "cpu_s": cpu,
        "groups": processor.status()["groups"],
        "processors": {
            name: {"processed": s.processed, "failed": s.failed, "time_spent_s": s.time_spent_s}
            for name, s in processor.stats.items()
        },
        "analytics_tokens": analytics["total"]["tokens"],
        "analytics_generations": analytics["total"]["generations"],
    }


def _main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pipeline")
    modes = parser.add_subparsers(dest="mode", required=True)
    feed = modes.add_parser("feed", help="run generations into the pipeline (processors off)")
    feed.add_argument("--generations", type=int, required=True)
    feed.add_argument("--tokens", type=int, required=True)
    feed.add_argument("--rate", type=float, required=True)
    modes.add_parser("drain", help="drain the pipeline once with every configured processor")
    args = parser.parse_args()
    if args.mode == "feed":
        work = run_feed(args.generations, args.tokens, args.rate)
    else:
        work = run_drain()
    with new_runner() as runner, contextlib.suppress(KeyboardInterrupt):
        print(json.dumps(runner.run(work)), flush=True)


if __name__ == "__main__":
    _main()
