"""Stats endpoints: the analytics and the processor pipeline's health, from Redis.

* ``GET /v1/stats`` (API key): totals and per-model figures (``processors/analytics.py``), the
  processors' counters summed over every process that runs them, and each pipeline shard's
  length, pending entries and lag in the ``processors`` group.
* ``GET /v1/sessions/{session_id}/stats`` (the session's subscribe token, or an API key): the
  session's figures and its newest generations; 404 ``session_stats_not_found`` when nothing
  was recorded for it (yet, or any more: they expire after ``analytics_retention_s``).

Every figure comes from Redis, so any gateway answers the same.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tokenbridge.exceptions import InvalidRequest
from tokenbridge.gateway.auth import key_principal, reader_principal
from tokenbridge.gateway.state import Gateway
from tokenbridge.store.stats import (
    read_pipeline_status,
    read_processor_stats,
    read_session_stats,
    read_stats,
)
from tokenbridge.wire.keys import validate_id

__all__ = ["routes"]


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.state.gateway
    return gateway


async def stats(request: Request) -> Response:
    """Totals and per-model analytics, processor counters and pipeline lag (all processes)."""
    gateway = _gateway(request)
    await key_principal(gateway.auth, request)
    body = await read_stats(gateway.redis, gateway.keys)
    processors = await read_processor_stats(gateway.redis, gateway.keys)
    body["processors"] = processors["processors"]
    body["processor_processes"] = processors["processes"]
    body["pipeline"] = await read_pipeline_status(
        gateway.redis, gateway.keys, gateway.settings.pipeline_shards
    )
    return JSONResponse(body)


async def session_stats(request: Request) -> Response:
    """One session's analytics and its newest generations (up to ``?limit=``, default 100)."""
    gateway = _gateway(request)
    session_id = validate_id(request.path_params["session_id"], "session_id")
    await reader_principal(gateway.auth, request, session_id)
    raw_limit = request.query_params.get("limit", "100")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 1000:
        raise InvalidRequest("invalid_limit", "limit must be an integer from 1 to 1000")
    body = await read_session_stats(gateway.redis, gateway.keys, session_id, int(raw_limit))
    if body is None:
        raise InvalidRequest(
            "session_stats_not_found", f"no analytics recorded for session {session_id}", 404
        )
    return JSONResponse(body)


routes: list[Route] = [
    Route("/v1/stats", stats, methods=["GET"]),
    Route("/v1/sessions/{session_id}/stats", session_stats, methods=["GET"]),
]
