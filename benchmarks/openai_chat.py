"""7. ``openai-chat``: the Chat Completions encoding beside native SSE, in the same run.

The same demo generation (``max_tokens`` tokens, unpaced, response cache off) is run by a
separate worker process and delivered twice by the gateway: through ``POST /v1/generations``
then ``GET /v1/sessions/{id}/events`` (native SSE), and through ``POST /v1/chat/completions``
with ``stream: true`` (one ``chat.completion.chunk`` per token). Each is measured in its own
window (gateway CPU over it, tokens received by a raw-socket client); the figure that matters
is gateway CPU per delivered token, chat over native (target: within 1.5x). Rounds alternate
the two; rates are medians, CPU per token is over all rounds of a kind. A generation stays
under ``stream_max_len`` (10,000 entries), so that a client cut as slow can resume without a
gap.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from benchmarks.processes import Child, process_cpu_s
from benchmarks.scenarios import Bench, Figure, ScenarioResult
from benchmarks.sse_client import _SSEProtocol

__all__ = ["openai_chat"]

_CHAT_TOKEN = b'"delta":{"content":'
_NATIVE_TOKEN = b"\nevent: token\n"


@dataclass(eq=False)
class _Tally:
    """Tokens received on one stream; ends at ``[DONE]`` (chat) or ``event: end`` (native)."""

    chat: bool
    tokens: int = 0
    first_token_at: float | None = None
    end_at: float | None = None
    last_event_id: str | None = None
    completion_id: str | None = None
    reconnects: int = 0
    closed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)
    session_id: str = ""

    @property
    def resume_path(self) -> str:
        if self.chat:
            return f"/v1/chat/completions/{self.completion_id}/stream"
        return f"/v1/sessions/{self.session_id}/events"

    def feed(self, block: bytes, now: float, wall_ns: int) -> None:
        self.subscribed.set()  # native: the retry: preamble came first
        text = b"\n" + block
        at = text.rfind(b"\nid: ")
        if at >= 0:
            self.last_event_id = text[at + 5 : text.index(b"\n", at + 5)].decode()
        if self.chat and self.completion_id is None and (at := text.find(b'"id":"')) >= 0:
            self.completion_id = text[at + 6 : text.index(b'"', at + 6)].decode()
        if (at := text.find(b"\n: closed ")) >= 0:
            self.closed.append(text[at + 11 : text.index(b"\n", at + 11)].decode())
        tokens = text.count(_CHAT_TOKEN if self.chat else _NATIVE_TOKEN)
        if tokens and self.first_token_at is None:
            self.first_token_at = now
        self.tokens += tokens
        if b'{"error":' in text or b"\nevent: error\n" in text:
            self.errors.append(text[:300].decode(errors="replace"))
        if (b"data: [DONE]" in text) if self.chat else (b"\nevent: end\n" in text):
            self.end_at = now
            self.ended.set()


async def _stream(host: str, port: int, request: bytes, tally: _Tally) -> None:
    """Read until the end; a stream the gateway cuts (a slow client: this one cannot keep up
    with an unpaced model) is resumed from its last id, as a client would."""
    loop = asyncio.get_running_loop()
    while True:
        _, protocol = await loop.create_connection(lambda: _SSEProtocol(tally), host, port)  # type: ignore[arg-type]
        assert protocol.transport is not None
        protocol.transport.write(request)
        try:
            await protocol.lost
        finally:
            protocol.transport.close()
        if tally.ended.is_set():
            return
        if tally.errors or tally.last_event_id is None or tally.reconnects >= 100:
            raise RuntimeError(f"stream ended early ({tally.tokens} tokens): {tally.errors[:1]}")
        tally.reconnects += 1
        request = _resume(host, tally)


def _resume(host: str, tally: _Tally) -> bytes:
    path = tally.resume_path
    head = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nLast-Event-ID: {tally.last_event_id}\r\n"
    return (head + "\r\n").encode()


def _post(host: str, path: str, body: dict[str, Any]) -> bytes:
    payload = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    return (head + f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload


async def _one(bench: Bench, worker: Child, chat: bool, tokens: int, n: int) -> dict[str, float]:
    """One generation delivered one way: its rate and costs."""
    gw = bench.gateway
    prompt = f"openai-chat bench {bench.tag} round {n} {'chat' if chat else 'native'}"
    params = {"max_tokens": tokens, "rate": 0, "cache": False}
    tally = _Tally(chat)
    cpu_before = process_cpu_s(gw.pid) or 0.0
    worker_before = process_cpu_s(worker.pid) or 0.0
    started = time.perf_counter()
    if chat:
        body = {"model": "demo", "messages": [{"role": "user", "content": prompt}]}
        request = _post(gw.host, "/v1/chat/completions", {**body, **params, "stream": True})
        await _stream(gw.host, gw.port, request, tally)
    else:  # subscribed first, as a page does, so that every token is delivered live
        tally.session_id = f"bench-{bench.tag}-openai-{n}"
        request = f"GET {tally.resume_path} HTTP/1.1\r\nHost: {gw.host}\r\n\r\n".encode()
        reading = asyncio.ensure_future(_stream(gw.host, gw.port, request, tally))
        try:
            await tally.subscribed.wait()
            job = {"model": "demo", "prompt": prompt, "params": params}
            async with httpx.AsyncClient(base_url=f"http://{gw.host}:{gw.port}") as http:
                answer = await http.post(
                    "/v1/generations", json={**job, "session_id": tally.session_id}
                )
                answer.raise_for_status()
            await reading
        finally:
            reading.cancel()
    wall = time.perf_counter() - started
    cpu_s = (process_cpu_s(gw.pid) or 0.0) - cpu_before
    assert tally.first_token_at is not None and tally.end_at is not None
    if tally.tokens != tokens:
        raise RuntimeError(f"{'chat' if chat else 'native'}: {tally.tokens} of {tokens} tokens")
    return {
        "reconnects": tally.reconnects,
        "rate": tally.tokens / max(tally.end_at - tally.first_token_at, 1e-9),
        "cpu_us": 1e6 * cpu_s / tally.tokens,
        "gateway_pct": 100 * cpu_s / wall,
        "worker_pct": 100 * ((process_cpu_s(worker.pid) or 0.0) - worker_before) / wall,
    }


async def openai_chat(bench: Bench, tokens: int, rounds: int, timeout_s: float) -> ScenarioResult:
    """Native SSE vs Chat Completions chunks for the same generations, alternating."""
    result = ScenarioResult(f"7. OpenAI chat encoding vs native SSE, {tokens:,} tokens x {rounds}")
    argv = [sys.executable, "-m", "tokenbridge", "worker", "--no-processors"]
    worker = Child("worker", [*argv, "--log-level", "warning"], bench.env, ready_marker="ready")
    runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    try:
        worker.start()
        await worker.wait_ready(30)
        async with asyncio.timeout(timeout_s):
            await _one(bench, worker, True, min(tokens, 1000), -1)  # warm the chat path
            for n in range(rounds):
                for chat in (False, True):
                    runs[chat].append(await _one(bench, worker, chat, tokens, n))
    finally:
        worker.stop()

    def median(chat: bool, key: str) -> float:
        return statistics.median(run[key] for run in runs[chat])

    def cpu_us(chat: bool) -> float:  # over all rounds: /proc counts CPU in 10 ms ticks
        return sum(run["cpu_us"] for run in runs[chat]) / len(runs[chat])

    ratio = cpu_us(True) / cpu_us(False)
    result.tokens_delivered = tokens * rounds * 2
    result.figures = [
        Figure("native SSE: delivered", median(False, "rate"), "tokens/s"),
        Figure("chat chunks: delivered", median(True, "rate"), "tokens/s"),
        Figure("native SSE: gateway CPU per token", cpu_us(False), "us"),
        Figure("chat chunks: gateway CPU per token", cpu_us(True), "us"),
        Figure("chat / native gateway CPU per token", ratio, "x", "≤ 1.5", ratio <= 1.5),
    ]
    result.cpu = {"gateway": median(True, "gateway_pct"), "producer": median(True, "worker_pct")}
    for chat, name in ((False, "native"), (True, "chat")):
        cuts = sum(run["reconnects"] for run in runs[chat])
        if cuts:
            result.notes.append(f"{name}: {cuts:.0f} resumes after slow_client cuts")
    result.notes.append(
        "CPU row: the chat rounds; the producer is one worker process (demo model, unpaced)"
    )
    return result
