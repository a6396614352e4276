"""Request bodies: read with a bound on their size, and parsed as JSON with one clear 4xx.

Every route that takes a body (native, OpenAI-compatible, admin) reads it here, so that none
holds more than its bound in memory whatever the client declares or sends.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from tokenbridge.exceptions import InvalidRequest

__all__ = ["MAX_BODY_BYTES", "json_body", "read_body"]

MAX_BODY_BYTES = 4 * 1024 * 1024
"""Largest body of a generation request (prompts and messages are bounded again by settings)."""


async def read_body(request: Request, max_bytes: int = MAX_BODY_BYTES) -> bytes:
    """The body, or 413 ``request_too_large`` as soon as it (or its Content-Length) is over."""
    too_large = InvalidRequest("request_too_large", f"body over {max_bytes} bytes", 413)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise too_large
    return bytes(body)


async def json_body(request: Request, max_bytes: int = MAX_BODY_BYTES) -> Any:
    """The body parsed as JSON; 400 ``invalid_json`` if it is not valid UTF-8 JSON."""
    body = await read_body(request, max_bytes)
    try:
        payload = json.loads(body)
        # Lone surrogates ("\ud800") parse but cannot be stored or sent on: reject them here.
        json.dumps(payload, ensure_ascii=False).encode()
    except (ValueError, UnicodeError, RecursionError):
        raise InvalidRequest("invalid_json", "the request body is not valid UTF-8 JSON") from None
    return payload
