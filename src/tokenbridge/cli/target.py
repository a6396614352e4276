"""Where the admin commands go: a gateway by URL and key, or Redis directly.

* ``--url`` / ``TOKENBRIDGE_URL`` with ``--api-key`` / ``TOKENBRIDGE_API_KEY``: the gateway's
  admin API (``/v1/admin/...``, ``/v1/stats``), from anywhere the gateway is reachable.
* ``--redis-url`` (or ``TOKENBRIDGE_REDIS_URL`` when no gateway URL is given): Redis directly,
  as the service itself reads it (for when no gateway runs).
* Neither: the local `tokenbridge serve`, at the URL and with the key its data directory keeps
  (``cli/local.py``), else ``http://127.0.0.1:8000``.

Both targets answer the same calls with the same JSON shapes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
import typer

from tokenbridge.cli.local import DataDir
from tokenbridge.exceptions import AuthError, ConfigurationError, InvalidRequest, RedisUnavailable
from tokenbridge.settings import Settings, load_settings
from tokenbridge.store.client import REDIS_DOWN_ERRORS, close_client, command_client
from tokenbridge.wire.keys import Keys

__all__ = ["API_KEY", "REDIS_URL", "URL", "GatewayTarget", "RedisTarget", "Target", "target"]

T = TypeVar("T")
DEFAULT_URL = "http://127.0.0.1:8000"

URL = typer.Option(
    None, "--url", envvar="TOKENBRIDGE_URL", help="Gateway URL (default: the local serve)."
)
API_KEY = typer.Option(
    None,
    "--api-key",
    envvar="TOKENBRIDGE_API_KEY",
    help="API key for the gateway (default: the one the local serve keeps).",
)
REDIS_URL = typer.Option(
    None, "--redis-url", help="Work on this Redis directly instead of through a gateway."
)


class GatewayTarget:
    """The admin API of one gateway."""

    def __init__(self, url: str, api_key: str | None) -> None:
        self.url = url.rstrip("/")
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}

    def call(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        query = {k: v for k, v in params.items() if v is not None}
        try:
            with httpx.Client(base_url=self.url, headers=self.headers, timeout=30) as client:
                response = client.request(method, path, json=body, params=query)
        except httpx.TransportError as exc:
            raise ConfigurationError(
                f"cannot reach the gateway at {self.url} ({exc or type(exc).__name__}). Is "
                "`tokenbridge serve` running? Set TOKENBRIDGE_URL and TOKENBRIDGE_API_KEY, or "
                "pass --redis-url (or set TOKENBRIDGE_REDIS_URL) to work on Redis directly"
            ) from None
        try:
            payload = response.json()
        except ValueError:
            payload = {}
        if response.is_success:
            return payload
        error = payload.get("error", {}) if isinstance(payload, dict) else {}
        code = str(error.get("code", "http_error"))
        message = f"{self.url}: {error.get('message', response.reason_phrase)}"
        if response.status_code == 401:
            raise AuthError(code, message + " (set TOKENBRIDGE_API_KEY or --api-key)", 401)
        raise InvalidRequest(code, message, response.status_code)


class RedisTarget:
    """Redis itself: each call opens a small client, runs, closes."""

    def __init__(self, url: str, settings: Settings) -> None:
        self.url = url
        self.settings = settings
        self.keys = Keys(settings.key_prefix)

    def run(self, make: Callable[[Any, Keys], Awaitable[T]]) -> T:
        async def go() -> T:
            redis = command_client(
                self.url,
                4,
                self.settings.redis_socket_timeout_s,
                cluster=self.settings.redis_cluster,
            )
            try:
                try:
                    await redis.ping()
                except REDIS_DOWN_ERRORS as exc:
                    raise RedisUnavailable(f"cannot reach Redis at --redis-url: {exc}") from None
                return await make(redis, self.keys)
            finally:
                await close_client(redis)

        return asyncio.run(go())


Target = GatewayTarget | RedisTarget


def target(url: str | None, api_key: str | None, redis_url: str | None) -> Target:
    """The target the options (and environment) name; see the module docstring."""
    settings = load_settings()
    if redis_url:
        return RedisTarget(redis_url, settings)
    if url:
        return GatewayTarget(url, api_key or DataDir(settings.data_dir).key())
    env_redis = settings.redis_url_value()
    if env_redis:
        return RedisTarget(env_redis, settings)
    local = DataDir(settings.data_dir)
    return GatewayTarget(local.url() or DEFAULT_URL, api_key or local.key())
