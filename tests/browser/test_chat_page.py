"""The chat page in a real browser: it streams, and a reload or a network cut mid-answer ends
with exactly the text of the uninterrupted stream (no gap, no duplicate)."""

from __future__ import annotations

import contextlib
import re
import secrets
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from playwright.async_api import Page, expect

from tests.servers import Gateway
from tests.sse_client import read_events
from tokenbridge.model_config import ModelConfig

# The cache would replay a repeated prompt at once: these tests need answers that take time.
SLOW = {"cache_enabled": False}
MID_ANSWER = re.compile(r"\S.{20,}", re.DOTALL)  # some text shown, far from all of it


@pytest.fixture
async def chat(settings_factory: Any) -> AsyncIterator[Gateway]:
    async with Gateway(settings_factory(**SLOW)) as gateway:
        yield gateway


@pytest.fixture
async def short_chat(settings_factory: Any) -> AsyncIterator[Gateway]:
    """Session streams trimmed to about 10 entries, and a model that cannot be reached."""
    broken = ModelConfig(adapter="openai", base_url="http://127.0.0.1:1/v1", timeout_s=5)
    models = {"demo": ModelConfig(adapter="demo"), "broken": broken}
    # By count only (stream_history_s=0): the last 10 entries, however young.
    settings = settings_factory(models=models, stream_max_len=10, stream_history_s=0, **SLOW)
    async with Gateway(settings) as gateway:
        yield gateway


async def stream_text(gateway: Gateway, session_id: str) -> dict[str, str]:
    """Every generation's text of the session, read from the start over SSE (the truth)."""
    texts: dict[str, str] = {}
    url = f"/v1/sessions/{session_id}/events"
    async with (
        httpx.AsyncClient(base_url=gateway.url, timeout=30) as http,
        contextlib.aclosing(read_events(http, url)) as events,
    ):
        async for event in events:
            gid = event.data["generation_id"]
            if event.event == "token":
                texts[gid] = texts.get(gid, "") + event.data["text"]
            if event.event in ("end", "error"):
                break
    return texts


async def ask(page: Page, prompt: str, max_tokens: int, rate: float) -> None:
    await page.fill("#max-tokens", str(max_tokens))
    await page.fill("#rate", str(rate))
    await page.fill("#prompt", prompt)
    await page.press("#prompt", "Enter")


def session_of(page: Page) -> str:
    found = re.search(r"#s=([A-Za-z0-9_-]+)", page.url)
    assert found, page.url
    return found.group(1)


async def answer(page: Page) -> str:
    """The answer's text once the page shows its end figures."""
    await expect(page.locator(".gen .figs")).to_contain_text("tokens")
    return await page.locator(".gen .txt").inner_text()


async def test_page_streams_an_answer_and_sends_the_conversation(chat: Gateway, page: Page) -> None:
    await page.goto(chat.url)
    await expect(page.locator("#rate-label")).to_be_visible()  # demo model: rate is offered
    await ask(page, "hello browser", 12, 200)
    await expect(page.locator(".gen .figs")).to_contain_text("12 tokens")
    texts = await stream_text(chat, session_of(page))
    assert [await page.locator(".gen .txt").inner_text()] == list(texts.values())

    # The second turn carries the first as messages (the demo model echoes what it got).
    await ask(page, "and again", 5, 200)
    await expect(page.locator(".gen .figs").nth(1)).to_contain_text("5 tokens")
    job: Any = await chat.runtime.redis.xrevrange(chat.runtime.keys.jobs, count=1)
    sent = job[0][1][b"job"].decode()
    assert "hello browser" in sent and "and again" in sent and '"assistant"' in sent


async def test_reload_mid_answer_ends_with_the_uninterrupted_text(
    chat: Gateway, page: Page
) -> None:
    await page.goto(chat.url)
    await ask(page, "tell me a long story", 80, 40)
    await expect(page.locator(".gen .txt")).to_have_text(MID_ANSWER)
    await page.reload()
    shown = await answer(page)
    texts = await stream_text(chat, session_of(page))
    assert [shown] == list(texts.values())
    assert await page.locator(".gen").count() == 1
    assert await page.locator(".notice.gap").count() == 0


async def test_network_cut_mid_answer_recovers(chat: Gateway, page: Page) -> None:
    await page.goto(chat.url)
    await ask(page, "a story across a network cut", 80, 40)
    await expect(page.locator(".gen .txt")).to_have_text(MID_ANSWER)
    await page.context.set_offline(True)
    await expect(page.locator("#status")).to_contain_text("offline")
    cut_at = await page.locator(".gen .txt").inner_text()
    await page.context.set_offline(False)
    shown = await answer(page)
    texts = await stream_text(chat, session_of(page))
    assert [shown] == list(texts.values())
    assert len(cut_at) < len(shown)  # the cut came mid-answer: the rest came after it
    assert await page.locator(".notice.gap").count() == 0


async def wait_for_end(gateway: Gateway, session_id: str) -> None:
    """Until the session's stream has its terminal event (whatever was trimmed before it)."""
    url = f"/v1/sessions/{session_id}/events"
    async with (
        httpx.AsyncClient(base_url=gateway.url, timeout=30) as http,
        contextlib.aclosing(read_events(http, url)) as events,
    ):
        async for event in events:
            if event.event in ("end", "error"):
                return


async def test_gap_and_error_events_are_shown(short_chat: Gateway, page: Page) -> None:
    chat = short_chat
    await page.goto(chat.url)
    # Offline while the stream runs on and is trimmed (stream_max_len=10) past the page's
    # last id: back online, the page resumes from that id and says what is missing.
    await ask(page, "more than the stream keeps", 600, 300)
    await expect(page.locator(".gen .txt")).to_have_text(MID_ANSWER)
    await page.context.set_offline(True)
    await expect(page.locator("#status")).to_contain_text("offline")
    await wait_for_end(chat, session_of(page))
    await page.context.set_offline(False)
    await expect(page.locator(".notice.gap")).to_contain_text("trimmed")
    await expect(page.locator(".gen .figs")).to_contain_text("600 tokens")

    # A model that fails: the error event, with its code, where the answer would be; and the
    # rate field is offered for the demo model only.
    await page.select_option("#model", "broken")
    await expect(page.locator("#rate-label")).to_be_hidden()
    await page.fill("#prompt", "this will fail")
    await page.press("#prompt", "Enter")
    await expect(page.locator(".gerr")).to_contain_text("provider_unreachable")


async def test_sign_in_with_a_key_in_a_form_then_chat_and_dashboard(
    settings_factory: Any, page: Page
) -> None:
    key = "tbk_browser_" + secrets.token_hex(8)
    settings = settings_factory(auth_disabled=False, api_keys=[key], **SLOW)
    async with Gateway(settings) as gateway:
        await page.goto(gateway.url)
        form = page.locator("#login")
        await expect(form).to_be_visible()  # the API answered 401: a form, not window.prompt
        await page.fill("#login-key", "tbk_wrong")
        await page.click("#login button[type=submit]")
        await expect(page.locator("#login-error")).to_contain_text("not accepted")
        await page.fill("#login-key", key)
        await page.click("#login button[type=submit]")
        await expect(form).to_be_hidden()
        await ask(page, "signed in", 6, 200)
        await expect(page.locator(".gen .figs")).to_contain_text("6 tokens")

        # The same cookie signs in the dashboard; its state changes pass the origin check.
        await page.goto(gateway.url + "/dashboard")
        await expect(page.locator("#main")).to_be_visible()
        await page.fill("#key-name", "made-with-the-cookie")
        await page.click("#key-form button[type=submit]")
        await expect(page.locator("#key-secret")).to_have_text(re.compile(r"^tbk_"))
