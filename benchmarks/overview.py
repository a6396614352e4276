"""What one dashboard picture costs: ``GET /v1/admin/overview`` on a gateway with history.

``python -m benchmarks.overview [--generations N] [--requests N]`` starts an embedded Redis and
a gateway (uvicorn, real sockets, auth off), runs N demo generations so that every part of the
overview has something to read, then times sequential overview requests (mean, and the size of
the answer). A dashboard stream sends one such picture every ``dashboard_update_s``, shared by
the streams of one process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from typing import Any

import httpx
import uvicorn

from tokenbridge.gateway.app import create_app
from tokenbridge.settings import Settings
from tokenbridge.store.embedded import EmbeddedRedis
from tokenbridge.store.series import WINDOW_S


async def _generate(http: httpx.AsyncClient, n: int) -> None:
    for i in range(n):
        body = {"model": "demo", "prompt": f"p{i}", "params": {"max_tokens": 10, "rate": 0}}
        started = (await http.post("/v1/generations", json=body)).json()
        async with http.stream("GET", started["events_url"]) as response:
            async for line in response.aiter_lines():
                if line in ("event: end", "event: error"):
                    break


class _Server(uvicorn.Server):
    """uvicorn that says when it serves (an event, not a poll)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        self.ready.set()


async def run(generations: int, requests: int) -> dict[str, Any]:
    with EmbeddedRedis() as redis:
        settings = Settings(redis_url=redis.url, auth_disabled=True, consumer_heartbeat_s=0.5)
        config = uvicorn.Config(create_app(settings), port=0, log_level="warning")
        server = _Server(config)
        task = asyncio.create_task(server.serve())
        try:
            async with asyncio.timeout(20):
                await server.ready.wait()
            port = server.servers[0].sockets[0].getsockname()[1]
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
                await _generate(http, generations)
                for _ in range(5):  # warm up
                    await http.get("/v1/admin/overview")
                start = time.perf_counter()
                for _ in range(requests):
                    answer = await http.get("/v1/admin/overview")
                elapsed = time.perf_counter() - start
        finally:
            server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return {
        "generations": generations,
        "requests": requests,
        "mean_ms": round(elapsed / requests * 1000, 1),
        "bytes": len(answer.content),
        "window_s": WINDOW_S,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=50)
    parser.add_argument("--requests", type=int, default=100)
    args = parser.parse_args()
    result = asyncio.run(run(args.generations, args.requests))
    print(
        f"GET /v1/admin/overview after {result['generations']} generations: "
        f"{result['mean_ms']} ms per request (mean of {result['requests']}), "
        f"{result['bytes']} bytes"
    )


if __name__ == "__main__":
    main()
