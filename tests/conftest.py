"""Fixtures: a real Redis per test session, fresh key prefixes, gateways on real sockets."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from tests.servers import Gateway, RedisCluster, RedisServer
from tokenbridge.settings import Settings

pytest_plugins = ["tests.leak_origins"]  # where a leaked socket came from (see there)


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


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """One real cluster (3 primaries, 3 replicas) for the whole test session."""
    with RedisCluster() as cluster:
        yield cluster


@pytest.fixture(params=["standalone", "cluster"])
def redis_url(request: pytest.FixtureRequest) -> str:
    """The URL of standalone Redis, then of the cluster: tests that take it run on both."""
    if request.param == "cluster":
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        return cluster.url
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


BOTH = pytest.mark.parametrize("backend", ["standalone", "cluster"], indirect=True)
"""Run a test on standalone Redis and on the cluster: ``@BOTH`` (or ``pytestmark = BOTH``)."""


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """Which Redis the settings point at: ``standalone`` unless the test is marked ``BOTH``."""
    return str(getattr(request, "param", "standalone"))


@pytest.fixture
def backend_url(request: pytest.FixtureRequest, backend: str) -> str:
    if backend == "cluster":
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        return cluster.url
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


@pytest.fixture
def settings_factory(backend_url: str) -> Any:
    prefix = "t" + secrets.token_hex(4)

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "redis_url": backend_url,
            "key_prefix": prefix,
            "consumer_heartbeat_s": 0.5,
            "consumer_claim_idle_ms": 2000,
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
