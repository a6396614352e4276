"""Fixtures: a real Redis per test session, fresh key prefixes, gateways on real sockets."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from tests.servers import Gateway, RedisServer
from tokenbridge.settings import Settings


@pytest.fixture(scope="session", autouse=True)
def _private_data_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """`serve` without a Redis URL keeps its data in the user data directory: never the real
    one from a test (platformdirs follows XDG_DATA_HOME, which subprocesses inherit)."""
    before = os.environ.get("XDG_DATA_HOME")
    os.environ["XDG_DATA_HOME"] = str(tmp_path_factory.mktemp("data-home"))
    yield
    if before is None:
        os.environ.pop("XDG_DATA_HOME", None)
    else:
        os.environ["XDG_DATA_HOME"] = before


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def settings_factory(redis_server: RedisServer) -> Any:
    prefix = "t" + secrets.token_hex(4)

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "redis_url": redis_server.url,
            "key_prefix": prefix,
            "consumer_heartbeat_s": 0.5,
            "consumer_claim_idle_ms": 2000,
            "fanout_block_ms": 2000,
            "consumer_block_ms": 2000,
            # Most tests are about delivery; tests/test_auth.py runs with auth on.
            "auth_disabled": True,
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def settings(settings_factory: Any) -> Settings:
    return settings_factory()  # type: ignore[no-any-return]


@pytest.fixture
async def gateway(settings: Settings) -> AsyncIterator[Gateway]:
    async with Gateway(settings) as gw:
        yield gw


@pytest.fixture
async def http(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        yield client
