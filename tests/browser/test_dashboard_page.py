"""The dashboard in a real browser: the whole deployment's numbers (two gateway processes)
match each node's /v1/status and /metrics; dead letters replay and purge; keys are created
(shown once) and revoked from the page; it fits a phone and follows dark mode."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Page, expect

from tests.servers import Gateway, GatewayProcess, RedisServer
from tests.sse_client import read_events
from tokenbridge.consumers.dead_letters import DeadLetters
from tokenbridge.exceptions import AuthError

FAST = {
    "TOKENBRIDGE_PRESENCE_HEARTBEAT_S": "0.2",
    "TOKENBRIDGE_DASHBOARD_UPDATE_S": "0.2",
    "TOKENBRIDGE_CONSUMER_HEARTBEAT_S": "0.5",  # processors publish their stats this often
}
README_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "images" / "dashboard.png"


@pytest.fixture
async def two_gateways(
    redis_server: RedisServer,
) -> AsyncIterator[tuple[list[GatewayProcess], str]]:
    key = "tbk_dash_" + secrets.token_hex(8)
    env = {
        "TOKENBRIDGE_REDIS_URL": redis_server.url,
        "TOKENBRIDGE_KEY_PREFIX": "d" + secrets.token_hex(4),
        "TOKENBRIDGE_AUTH_DISABLED": "false",
        "TOKENBRIDGE_API_KEYS": key,
        "TOKENBRIDGE_CACHE_ENABLED": "false",
        **FAST,
    }
    gateways = [GatewayProcess(env, ["serve", "--log-level", "warning"]) for _ in range(2)]
    for gateway in gateways:
        gateway.args += ["--port", str(gateway.port)]
        gateway.start()
    try:
        await asyncio.gather(*(g.wait_ready() for g in gateways))
        yield gateways, key
    finally:
        for gateway in gateways:
            gateway.stop()


async def generate(http: httpx.AsyncClient, max_tokens: int) -> int:
    """One generation on this gateway, read to its end over SSE there; its token count."""
    started = await http.post(
        "/v1/generations",
        json={"model": "demo", "prompt": f"n{max_tokens}", "params": {"max_tokens": max_tokens}},
    )
    assert started.status_code == 202, started.text
    tokens = 0
    async with contextlib.aclosing(read_events(http, started.json()["events_url"])) as events:
        async for event in events:
            tokens += event.event == "token"
            if event.event in ("end", "error"):
                assert event.event == "end"
                break
    return tokens


async def readme_screenshot(page: Page, clients: list[httpx.AsyncClient]) -> None:
    """The README's picture: the same deployment with two answers streaming, one per node."""
    body = {"model": "demo", "prompt": "slow", "params": {"max_tokens": 400, "rate": 20}}
    streams = []
    async with contextlib.AsyncExitStack() as stack:
        for http in clients:
            started = (await http.post("/v1/generations", json=body)).json()
            events = read_events(http, started["events_url"])
            stack.push_async_callback(events.aclose)
            await anext(events)  # the stream is open: it counts as a connection
            streams.append(events)
        await expect(page.locator('[data-k="connections"]')).to_have_text("2")
        await expect(page.locator('[data-k="running"]')).to_have_text("2")
        await page.screenshot(path=str(README_SCREENSHOT), full_page=True)


def metric(text: str, name: str) -> int:
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert found, name
    return int(float(found.group(1)))


async def test_dashboard_matches_status_and_metrics_of_two_gateways(
    two_gateways: tuple[list[GatewayProcess], str], page: Page
) -> None:
    gateways, key = two_gateways
    auth = {"authorization": f"Bearer {key}"}
    clients = [httpx.AsyncClient(base_url=g.url, headers=auth, timeout=30) for g in gateways]
    try:
        sizes = [5, 6, 7, 8, 9, 10]  # a known workload: 6 generations, 3 read on each node
        counts = [await generate(clients[i % 2], n) for i, n in enumerate(sizes)]
        assert counts == sizes

        await page.goto(gateways[0].url + "/dashboard")
        await page.fill("#login-key", key)  # the same sign-in as the chat page: a form
        await page.click("#login button[type=submit]")
        await expect(page.locator('[data-k="generations"]')).to_have_text(str(len(sizes)))
        await expect(page.locator('[data-k="tokens"]')).to_have_text(str(sum(sizes)))
        await expect(page.locator('[data-k="processes"]')).to_have_text("2")

        total_sent = 0
        for http in clients:
            status = (await http.get("/v1/status")).json()
            exposition = (await http.get("/metrics")).text
            sent = status["connections"]["events_sent"]
            assert sent == metric(exposition, "tokenbridge_events_sent_total") > 0
            assert status["connections"]["closed"] == {"client_gone": 3}
            row = page.locator(f'tr[data-node="{status["fanout"]["node_id"]}"]')
            await expect(row.locator('[data-k="events-sent"]')).to_have_text(f"{sent:,}")
            total_sent += sent
        total = page.locator('tr[data-node="total"] [data-k="events-sent"]')
        await expect(total).to_have_text(f"{total_sent:,}")
        await expect(page.locator("#t-generations tr[data-model=demo]")).to_contain_text("45")
        await expect(page.locator("#l-ttft")).to_contain_text("demo p50")
        # The processors' figures, summed over both processes: every pipeline entry once.
        stats = (await clients[1].get("/v1/stats")).json()
        entries = sum(row["length"] for row in stats["pipeline"])
        processed = page.locator('[data-k="processed-analytics"]')
        await expect(processed).to_have_text(f"{entries:,}")
        if os.environ.get("TOKENBRIDGE_README_SCREENSHOT"):
            await readme_screenshot(page, clients)

        # Usable at phone width (nothing wider than the screen) and in dark mode.
        await page.set_viewport_size({"width": 390, "height": 844})
        width = await page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390
        await page.emulate_media(color_scheme="dark")
        background = await page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(18, 21, 27)"
    finally:
        for http in clients:
            await http.aclose()


@pytest.fixture
async def gateway(settings_factory: Any) -> AsyncIterator[Gateway]:
    settings = settings_factory(presence_heartbeat_s=0.2, dashboard_update_s=0.2)
    async with Gateway(settings) as gw:
        yield gw


async def dead_letter(gw: Gateway, n: int) -> tuple[str, str]:
    """A real dead letter of a source stream; returns (its dlq id, the source stream)."""
    redis, keys = gw.runtime.redis, gw.runtime.keys
    source = f"{keys.prefix}:src"
    with contextlib.suppress(Exception):
        await redis.xgroup_create(source, "g", id="0", mkstream=True)
    entry_id = (await redis.xadd(source, {"n": str(n)})).decode()
    await redis.xreadgroup("g", "c", {source: ">"})
    dlq = DeadLetters(redis, keys.dead_letters)
    dlq_id = await dlq.move(source, "g", entry_id, {b"n": str(n).encode()}, "boom", 5, "c")
    return dlq_id, source


async def test_replay_and_purge_dead_letters_from_the_page(gateway: Gateway, page: Page) -> None:
    redis = gateway.runtime.redis
    dlq_id, source = await dead_letter(gateway, 1)
    await page.goto(gateway.url + "/dashboard")
    row = page.locator(f'tr[data-dlq="{dlq_id}"]')
    await expect(row).to_contain_text("boom")
    await row.get_by_role("button", name="Replay").click()
    await expect(row).to_have_count(0)
    assert await gateway.runtime.dead_letters.count() == 0
    tail: Any = await redis.xrevrange(source, count=1)
    assert tail[0][1] == {b"n": b"1"}  # back in its source stream, as a new entry

    for n in (2, 3):
        await dead_letter(gateway, n)
    await expect(page.locator('[data-k="dead-letters"]')).to_have_text("2")
    await page.click("#dlq-purge-all")
    await expect(page.locator("#dlq-confirm")).to_contain_text("Delete all 2 dead letter(s)")
    assert await gateway.runtime.dead_letters.count() == 2  # nothing yet: it asks first
    await page.click("#dlq-purge-yes")
    await expect(page.locator("#dlq-result")).to_have_text("purged 2")
    assert await gateway.runtime.dead_letters.count() == 0


async def test_create_and_revoke_a_key_from_the_page(gateway: Gateway, page: Page) -> None:
    auth = gateway.app.state.gateway.auth
    await page.goto(gateway.url + "/dashboard")
    await page.fill("#key-name", "from-the-page")
    await page.click("#key-form button[type=submit]")
    secret = page.locator("#key-secret")
    await expect(secret).to_have_text(re.compile(r"^tbk_\S{20,}$"))
    key = await secret.inner_text()
    key_id = await secret.get_attribute("data-id")
    assert (await auth.check_key(key)).key_id == key_id
    row = page.locator(f'tr[data-key="{key_id}"]')
    await expect(row).to_contain_text("from-the-page")
    await row.get_by_role("button", name="Revoke").click()
    await expect(row).to_have_count(0)
    with pytest.raises(AuthError):
        await auth.check_key(key)
