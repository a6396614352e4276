"""Admin over HTTP (API key or console cookie): the deployment, consumers, dead letters, keys.

* ``GET /v1/admin/overview``: everything the dashboard shows (``gateway/overview.py``), read
  from Redis, so any gateway answers for the whole deployment.
* ``GET /v1/admin/dashboard/events``: the same picture as an SSE stream (event ``overview``),
  one every ``dashboard_update_s``; the page at ``/dashboard`` draws it. At most
  ``_MAX_STREAMS`` per process (429 ``too_many_dashboards``); ends when the process drains.
* ``GET /v1/admin/processes``, ``GET /v1/admin/consumers``.
* ``GET /v1/admin/dead-letters``; ``POST .../replay`` and ``POST .../purge`` with
  ``{"ids": [...]}``, ``{"stream": "..."}`` or ``{"all": true}`` (nothing is implied).
* ``GET /v1/admin/keys``, ``POST /v1/admin/keys`` (the key is in this answer only),
  ``DELETE /v1/admin/keys/{key_id}``.
* ``POST /v1/admin/login-link``: a fresh one-time console link (`tokenbridge login-link`).

State-changing calls with the cookie must come from the same origin (``key_principal``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tokenbridge.consumers.dead_letters import DeadLetters
from tokenbridge.exceptions import InvalidRequest, LimitExceeded
from tokenbridge.gateway.auth import key_principal
from tokenbridge.gateway.overview import consumer_groups, deployment, overview
from tokenbridge.gateway.request_body import read_body
from tokenbridge.gateway.state import Gateway
from tokenbridge.store.client import REDIS_DOWN_ERRORS

__all__ = ["DeadLetterSelection", "KeyCreate", "routes"]

log = logging.getLogger(__name__)

_MAX_STREAMS = 32
ENTRY_ID_PATTERN = r"^[0-9]{1,19}-[0-9]{1,19}$"  # both parts below 2**64
KEY_ID_PATTERN = r"^[0-9a-f]{12}$"
_MAX_BODY = 64 * 1024
_LOGIN_TTL_S = 600


class DeadLetterSelection(BaseModel):
    """Which dead letters to replay or purge: ``ids``, those of ``stream``, or ``all``."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "oneOf": [
                {"required": ["ids"]},
                {"required": ["stream"]},
                {"required": ["all"], "properties": {"all": {"const": True}}},
            ]
        },
    )

    ids: list[Annotated[str, StringConstraints(pattern=ENTRY_ID_PATTERN)]] | None = Field(
        default=None, min_length=1, max_length=1000
    )
    stream: str | None = Field(default=None, min_length=1, max_length=256)
    all: bool = Field(default=False, description="Every dead letter: must be said explicitly.")

    @model_validator(mode="before")
    @classmethod
    def _no_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(value is None for value in data.values()):
            raise ValueError("leave a field out rather than send null")
        return data

    @model_validator(mode="after")
    def _one_selector(self) -> DeadLetterSelection:
        chosen = (self.ids is not None) + (self.stream is not None) + self.all
        if chosen != 1:
            raise ValueError("give exactly one of 'ids', 'stream' or 'all': true")
        return self


class KeyCreate(BaseModel):
    """Body of ``POST /v1/admin/keys``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(default="dashboard", min_length=1, max_length=64)


async def _admin(request: Request, unsafe: bool = False) -> Gateway:
    gateway: Gateway = request.state.gateway
    await key_principal(gateway.auth, request, unsafe=unsafe)
    return gateway


async def _body(request: Request, model: type[BaseModel]) -> Any:
    raw = await read_body(request, _MAX_BODY)
    if not raw.strip():
        raise InvalidRequest("invalid_request", "send a JSON object as the body", 422)
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidRequest("invalid_request", f"{where}: {first['msg']}", 422) from None


async def get_overview(request: Request) -> Response:
    """Everything the dashboard shows, once."""
    gateway = await _admin(request)
    shards = gateway.settings.pipeline_shards
    return JSONResponse(await overview(gateway.redis, gateway.keys, shards))


async def get_processes(request: Request) -> Response:
    """Every live process (presence records) and the connections per gateway node."""
    gateway = await _admin(request)
    return JSONResponse(await deployment(gateway.redis, gateway.keys))


async def get_consumers(request: Request) -> Response:
    gateway = await _admin(request)
    shards = gateway.settings.pipeline_shards
    return JSONResponse({"groups": await consumer_groups(gateway.redis, gateway.keys, shards)})


def _dead_letters(gateway: Gateway) -> DeadLetters:
    return DeadLetters(gateway.redis, gateway.keys.dead_letters, gateway.settings.dlq_max_len)


async def list_dead_letters(request: Request) -> Response:
    """The oldest dead letters (``?limit=``, default 100; ``?stream=`` filters)."""
    gateway = await _admin(request)
    raw_limit = request.query_params.get("limit", "100")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 1000:
        raise InvalidRequest("invalid_limit", "limit must be an integer from 1 to 1000")
    stream = request.query_params.get("stream") or None
    if stream is not None and len(stream) > 256:
        raise InvalidRequest("invalid_stream", "stream names at most 256 characters")
    dlq = _dead_letters(gateway)
    letters = await dlq.letters(int(raw_limit), stream)
    return JSONResponse(
        {"count": await dlq.count(), "letters": [letter.as_dict() for letter in letters]}
    )


async def replay_dead_letters(request: Request) -> Response:
    """Append the chosen dead letters to their source streams, then drop them from the DLQ."""
    gateway = await _admin(request, unsafe=True)
    chosen: DeadLetterSelection = await _body(request, DeadLetterSelection)
    replayed = await _dead_letters(gateway).replay(chosen.ids, chosen.stream)
    return JSONResponse({"replayed": replayed})


async def purge_dead_letters(request: Request) -> Response:
    """Delete the chosen dead letters for good."""
    gateway = await _admin(request, unsafe=True)
    chosen: DeadLetterSelection = await _body(request, DeadLetterSelection)
    purged = await _dead_letters(gateway).purge(chosen.ids, chosen.stream)
    log.info("dead letters purged count=%d", purged)
    return JSONResponse({"purged": purged})


async def keys(request: Request) -> Response:
    """``GET`` lists, ``POST`` creates (one route: a 405 then lists both in ``Allow``)."""
    return await (create_key(request) if request.method == "POST" else list_keys(request))


async def list_keys(request: Request) -> Response:
    gateway = await _admin(request)
    return JSONResponse({"keys": await gateway.auth.list_keys()})


async def create_key(request: Request) -> Response:
    """A new API key; the answer is the only place it is ever shown."""
    gateway = await _admin(request, unsafe=True)
    body: KeyCreate = await _body(request, KeyCreate)
    key_id, key = await gateway.auth.create_key(body.name)
    return JSONResponse(
        {"id": key_id, "name": body.name, "key": key},
        status_code=201,
        headers={"cache-control": "no-store"},
    )


async def revoke_key(request: Request) -> Response:
    gateway = await _admin(request, unsafe=True)
    key_id = request.path_params["key_id"]
    if not re.fullmatch(KEY_ID_PATTERN, key_id):
        raise InvalidRequest("invalid_key_id", "a key id is 12 hex digits (see GET /v1/admin/keys)")
    if not await gateway.auth.revoke_key(key_id):
        raise InvalidRequest("key_not_found", f"no stored key with id {key_id}", 404)
    return JSONResponse({"id": key_id, "revoked": True})


async def create_login_link(request: Request) -> Response:
    """A one-time console login link (``/?login=<code>``, valid 10 minutes)."""
    gateway = await _admin(request, unsafe=True)
    code = await gateway.auth.login_code(_LOGIN_TTL_S)
    base = str(request.base_url)
    return JSONResponse(
        {"url": f"{base}?login={code}", "expires_in_s": _LOGIN_TTL_S},
        status_code=201,
        headers={"cache-control": "no-store"},
    )


async def dashboard_events(request: Request) -> Response:
    """SSE: the overview every ``dashboard_update_s`` until the client leaves or we drain."""
    gateway = await _admin(request)
    connections = gateway.connections
    connections.ensure_accepting()
    state = request.app.state
    open_streams = getattr(state, "dashboard_streams", 0)
    if open_streams >= _MAX_STREAMS:
        raise LimitExceeded(
            "too_many_dashboards",
            f"this gateway already streams {open_streams} dashboards; close one",
            retry_after_s=5.0,
        )
    return StreamingResponse(
        _frames(request, gateway, connections),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )


class _SharedFrame:
    """The latest overview frame of this process, shared by its dashboard streams: one
    computation per half period, however many pages watch (``_MAX_STREAMS`` at most)."""

    def __init__(self) -> None:
        self.frame = ""
        self.made = -math.inf
        self.lock = asyncio.Lock()

    async def get(self, gateway: Gateway) -> str:
        settings = gateway.settings
        async with self.lock:  # the others wait for this one's answer, then share it
            if time.monotonic() - self.made < settings.dashboard_update_s / 2:
                return self.frame
            try:
                body = await overview(gateway.redis, gateway.keys, settings.pipeline_shards)
                data = json.dumps(body, separators=(",", ":"))
                self.frame = f"event: overview\ndata: {data}\n\n"
            except REDIS_DOWN_ERRORS as exc:
                error = {"code": "redis_unavailable", "message": f"Redis does not answer: {exc}"}
                self.frame = f"event: error\ndata: {json.dumps(error)}\n\n"
            self.made = time.monotonic()
            return self.frame


async def _frames(request: Request, gateway: Gateway, connections: Any) -> AsyncIterator[str]:
    state = request.app.state
    shared = getattr(state, "dashboard_frame", None)
    if shared is None:
        shared = state.dashboard_frame = _SharedFrame()
    state.dashboard_streams = getattr(state, "dashboard_streams", 0) + 1
    try:
        yield "retry: 2000\n\n"
        while not connections.draining:
            yield await shared.get(gateway)
            # The stream's period (a push to the page, not a wait for a condition).
            await asyncio.sleep(gateway.settings.dashboard_update_s)
    finally:
        state.dashboard_streams -= 1


routes: list[Route] = [
    Route("/v1/admin/overview", get_overview, methods=["GET"]),
    Route("/v1/admin/dashboard/events", dashboard_events, methods=["GET"]),
    Route("/v1/admin/processes", get_processes, methods=["GET"]),
    Route("/v1/admin/consumers", get_consumers, methods=["GET"]),
    Route("/v1/admin/dead-letters", list_dead_letters, methods=["GET"]),
    Route("/v1/admin/dead-letters/replay", replay_dead_letters, methods=["POST"]),
    Route("/v1/admin/dead-letters/purge", purge_dead_letters, methods=["POST"]),
    Route("/v1/admin/keys", keys, methods=["GET", "POST"]),
    Route("/v1/admin/keys/{key_id}", revoke_key, methods=["DELETE"]),
    Route("/v1/admin/login-link", create_login_link, methods=["POST"]),
]
