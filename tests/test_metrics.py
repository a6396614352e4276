"""GET /metrics: Prometheus text with this process's counters."""

from __future__ import annotations

import asyncio

import httpx

from tests.servers import Gateway
from tests.test_token_path import collect_until_end, start


async def test_metrics_after_a_generation(gateway: Gateway, http: httpx.AsyncClient) -> None:
    started = await start(http, params={"max_tokens": 7, "rate": 0})
    async with asyncio.timeout(20):
        await collect_until_end(http, started["events_url"], started["generation_id"])
    response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert "tokenbridge_events_sent_total" in text
    assert "tokenbridge_fanout_read_total" in text
    assert 'tokenbridge_consumer_acked_total{consumer="' in text
    sent = next(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("tokenbridge_events_sent_total")
    )
    assert sent >= 9  # start, 7 tokens, end
