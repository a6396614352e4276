"""ResilientModel: a model call as a good proxy makes it: retries, fallbacks, safe messages.

Wraps the adapter of a public model name (and the adapters of its ``fallbacks``):

* a failure **before the first token** that is worth another try (connection refused or
  broken, connect timeout, HTTP 429 or 5xx: ``ModelError.retryable``) is retried up to
  ``provider_max_retries`` times, after an exponential backoff with jitter, or after the
  provider's ``Retry-After`` when it sent one; a ``Retry-After`` longer than
  ``provider_retry_max_wait_s`` ends the retries;
* then each fallback model is tried in turn, with the same retries;
* a failure **after the first token** ends the generation (an ``error`` event): the tokens
  already sent cannot be taken back, so there is no silent restart;
* the error that reaches clients names the model and the error class and code, never the
  provider's URL, host or key; the full detail goes to the server log.

Counters (``ProviderStats``) feed ``/metrics``: ``tokenbridge_provider_retries``,
``tokenbridge_provider_fallbacks``, ``tokenbridge_provider_failures``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections import Counter
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field

from tokenbridge.exceptions import ModelError
from tokenbridge.producer.models.base import ChatModel, ChatRequest, Delta, Finish, ToolCallDelta

ModelItem = Delta | ToolCallDelta | Finish

__all__ = ["ProviderStats", "ResilientModel", "RetryPolicy", "public_error", "scrub"]

log = logging.getLogger(__name__)

_WHAT = {
    "provider_unauthorized": "the provider refused the credentials",
    "provider_rate_limited": "the provider is rate limiting requests",
    "provider_http_4xx": "the provider rejected the request",
    "provider_http_5xx": "the provider failed",
    "provider_unreachable": "the provider cannot be reached",
    "provider_disconnected": "the connection to the provider broke",
    "provider_timeout": "the provider did not answer in time",
    "provider_bad_response": "the provider sent an answer that cannot be read",
    "provider_error": "the provider reported an error",
}


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how long to wait before retrying a call that failed before its first
    token (settings ``provider_max_retries``, ``provider_retry_base_s``,
    ``provider_retry_max_wait_s``)."""

    max_retries: int = 3
    base_s: float = 0.5
    max_wait_s: float = 30.0

    def delay(self, error: ModelError, retries_done: int) -> float | None:
        """Seconds to wait before the next try of ``error``'s call, or None: do not retry."""
        if not error.retryable or retries_done >= self.max_retries:
            return None
        if error.retry_after_s is not None:
            return error.retry_after_s if error.retry_after_s <= self.max_wait_s else None
        backoff: float = min(self.max_wait_s, self.base_s * 2.0**retries_done)
        return backoff * random.uniform(0.5, 1.0)  # jitter: clients do not retry in step


@dataclass(slots=True)
class ProviderStats:
    """What one public model's calls went through, for ``/metrics``."""

    retried: int = 0
    fell_back: int = 0
    failed: Counter[str] = field(default_factory=Counter)


_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")
_HOST_PORT = re.compile(
    r"\b(?:\d{1,3}(?:\.\d{1,3}){3}|localhost|(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,})(?::\d+)?\b"
    r"|\[[0-9a-fA-F:]+\](?::\d+)?|\b[\w.-]+:\d{2,5}\b"
)


def scrub(text: str) -> str:
    """``text`` without URLs, addresses or host names (``<url>``, ``<host>``)."""
    return _HOST_PORT.sub("<host>", _URL.sub("<url>", text))


def _detail(error: ModelError) -> str:
    """The provider's own words, when it gave some, scrubbed of URLs and hosts."""
    if error.detail:
        return scrub(error.detail)
    if error.code == "provider_error":  # "model 'x': the provider reported an error ...: ..."
        return scrub(str(error).partition(": ")[2].partition(": ")[2])
    return ""


def public_error(model: str, error: ModelError, tried: list[str], retries: int) -> ModelError:
    """The error clients see: model, error class and code, the provider's own message
    scrubbed; never its URL, host or key."""
    what = _WHAT.get(error.code, "the model call failed")
    if detail := _detail(error):
        what = f"{what}: {detail.rstrip('.')}"
    extra = []
    if retries:
        extra.append(f"{retries} retr{'y' if retries == 1 else 'ies'}")
    if len(tried) > 1:
        extra.append("tried " + ", ".join(repr(name) for name in tried))
    more = f"; {', '.join(extra)}" if extra else ""
    message = (
        f"model {model!r}: {what} ({type(error).__name__} {error.code}{more}); "
        "the server log has the details"
    )
    try:
        return type(error)(message, code=error.code)
    except TypeError:  # a subclass with its own constructor: the base class says the same
        return ModelError(message, code=error.code)


class ResilientModel:
    """The model a generation runs on: ``chain`` is the model itself, then its fallbacks."""

    def __init__(self, name: str, chain: list[tuple[str, ChatModel]], policy: RetryPolicy) -> None:
        self.name = name
        self.chain = chain
        self.policy = policy
        self.stats = ProviderStats()

    def __repr__(self) -> str:
        names = [name for name, _ in self.chain]
        return f"ResilientModel({self.name!r}, chain={names}, stats={self.stats})"

    async def aclose(self) -> None:
        """Close this model's own adapter; each fallback is closed by its own wrapper."""
        await self.chain[0][1].aclose()

    async def stream(self, request: ChatRequest) -> AsyncGenerator[ModelItem, None]:
        """The first model of the chain that gets to its first token streams the answer."""
        tried: list[str] = []
        retries = 0
        failure: ModelError | None = None
        for name, model in self.chain:
            if tried:
                self.stats.fell_back += 1
                log.warning("model %r: falling back to %r", self.name, name)
            tried.append(name)
            done = 0
            while True:
                yielded = False
                try:
                    async with aclosing(model.stream(request)) as items:
                        async for item in items:
                            yielded = True
                            yield item
                    return
                except ModelError as exc:
                    log.warning("model %r (%r) failed: %s", self.name, name, exc)
                    if yielded:  # tokens were sent: no silent restart
                        self.stats.failed[exc.code] += 1
                        raise public_error(self.name, exc, tried, retries) from None
                    failure = exc
                    delay = self.policy.delay(exc, done)
                    if delay is None:
                        break
                done += 1
                retries += 1
                self.stats.retried += 1
                log.info("model %r (%r): retry %d in %.2f s", self.name, name, done, delay)
                await asyncio.sleep(delay)
        assert failure is not None
        self.stats.failed[failure.code] += 1
        raise public_error(self.name, failure, tried, retries)
