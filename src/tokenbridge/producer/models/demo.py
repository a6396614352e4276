"""DemoModel: a deterministic, network-free model for demos, tests and benchmarks.

The text is derived from the prompt alone: a ``random.Random`` seeded with a sha256 of the
messages (and ``params.seed`` when set) draws words from a fixed vocabulary, so the same
request always yields the same tokens. Each token is one word; every token but the first has
a leading space. Pacing follows absolute deadlines on the event loop's clock, so a slow
consumer or a busy loop never makes the rate drift: a model behind schedule yields the
overdue tokens at once.

Function calling, for demos and tests without a provider: when ``params.tool_choice`` is
``required`` or names a function, the answer is one call of that function (else the first
tool) instead of text, its arguments an object with a drawn word per property of the tool's
``parameters``, streamed in fragments of at most 8 characters at ``rate``; it finishes with
``"tool_calls"``. With ``auto`` (or no choice) the demo answers in words as usual.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from collections.abc import AsyncGenerator

from tokenbridge.model_config import ModelConfig
from tokenbridge.producer.models.base import ChatRequest, Delta, Finish, ToolCallDelta

__all__ = ["DEFAULT_MAX_TOKENS", "DEFAULT_RATE", "DemoModel"]

DEFAULT_MAX_TOKENS = 40
DEFAULT_RATE = 20.0
_BATCH = 256  # tokens drawn at once; also how often an unpaced stream lets other tasks run

_WORDS = (
    "the", "a", "stream", "token", "redis", "bridge", "reader", "writer", "entry", "event",
    "session", "gateway", "worker", "model", "prompt", "answer", "quick", "steady", "bright",
    "quiet", "river", "signal", "packet", "byte", "line", "cloud", "light", "north", "south",
    "resume", "replay", "cursor", "offset", "window", "buffer", "queue", "batch", "flush",
    "and", "then", "of", "to", "in", "on", "with", "while", "every", "each", "some", "many",
    "carries", "reads", "writes", "waits", "keeps", "sends", "joins", "ends", "starts", "flows",
    "fast", "slow", "again", ".",
)  # fmt: skip
_SPACED = tuple(" " + word for word in _WORDS)


class DemoModel:
    """Deterministic words at ``params.rate`` tokens/s (default 20; 0 means unpaced).

    Length and finish reason: the demo has no natural end of its own. Without
    ``params.max_tokens`` it writes :data:`DEFAULT_MAX_TOKENS` words, which is its whole
    answer, and finishes with ``"stop"``; with ``params.max_tokens`` it writes exactly that many
    words and finishes with ``"length"``, because the cap is what ended it. Usage counts the
    prompt's whitespace-separated words as ``prompt_tokens``. ``temperature``, ``top_p`` and
    ``stop`` are accepted and ignored. Never raises a provider error; cancel it by closing the
    generator.
    """

    def __init__(self, name: str = "demo", config: ModelConfig | None = None) -> None:
        self.name = name
        self.config = config or ModelConfig(adapter="demo")

    def __repr__(self) -> str:
        return f"DemoModel(name={self.name!r})"

    async def stream(
        self, request: ChatRequest
    ) -> AsyncGenerator[Delta | ToolCallDelta | Finish, None]:
        """Yield exactly the requested number of tokens (or one forced call), then one Finish."""
        params = request.params
        if _forced_function(request) is not None:
            async for item in _call(request):
                yield item
            return
        capped = params.max_tokens is not None
        total = params.max_tokens if params.max_tokens is not None else DEFAULT_MAX_TOKENS
        rate = params.rate if params.rate is not None else DEFAULT_RATE
        rng = random.Random(_seed(request))
        loop = asyncio.get_running_loop()
        start = loop.time()
        sent = 0
        while sent < total:
            if rate > 0:
                now = loop.time()
                # Token i is due at start + i / rate: the first one at once.
                due = min(total, int((now - start) * rate) + 1)
                if due <= sent:
                    await asyncio.sleep(start + sent / rate - now)
                    continue
            else:
                due = total
            batch = min(due - sent, _BATCH)
            words = rng.choices(_SPACED, k=batch)
            if sent == 0:
                words[0] = words[0][1:]
            for word in words:
                yield Delta(word)
            sent += batch
            if batch == _BATCH:
                await asyncio.sleep(0)  # unpaced or far behind: let other tasks run
        prompt_tokens = sum(len(m.get("content", "").split()) for m in request.messages)
        yield Finish(
            "length" if capped else "stop",
            usage={
                "prompt_tokens": prompt_tokens,
                "completion_tokens": total,
                "total_tokens": prompt_tokens + total,
            },
        )

    async def aclose(self) -> None:
        """Nothing to release."""


def _seed(request: ChatRequest) -> int:
    payload = json.dumps(
        [request.messages, request.params.seed], sort_keys=True, separators=(",", ":")
    )
    return int.from_bytes(hashlib.sha256(payload.encode()).digest()[:8], "big")


def _forced_function(request: ChatRequest) -> str | None:
    """The function ``tool_choice`` makes the demo call, if it forces one."""
    params = request.params
    choice = params.tool_choice
    if not params.tools or choice is None or choice in ("auto", "none"):
        return None
    if isinstance(choice, str):  # required: the first tool
        return params.tools[0].function.name
    return choice.function.name


async def _call(request: ChatRequest) -> AsyncGenerator[ToolCallDelta | Finish, None]:
    """One call of the forced function, its arguments drawn like the words of an answer."""
    name = _forced_function(request)
    assert name is not None and request.params.tools
    rng = random.Random(_seed(request))
    spec = next((t.function for t in request.params.tools if t.function.name == name), None)
    schema = spec.parameters if spec is not None and spec.parameters else {}
    properties = schema.get("properties")
    fields = sorted(properties) if isinstance(properties, dict) else []
    arguments = json.dumps({field: rng.choice(_WORDS) for field in fields})
    pieces = [arguments[i : i + 8] for i in range(0, len(arguments), 8)]
    call_id = f"call_{rng.getrandbits(64):016x}"
    rate = request.params.rate if request.params.rate is not None else DEFAULT_RATE
    yield ToolCallDelta(0, call_id=call_id, name=name)
    for piece in pieces:
        if rate > 0:
            await asyncio.sleep(1 / rate)
        yield ToolCallDelta(0, arguments=piece)
    prompt_tokens = sum(len(m.get("content", "").split()) for m in request.messages)
    yield Finish(
        "tool_calls",
        usage={
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(pieces),
            "total_tokens": prompt_tokens + len(pieces),
        },
    )
