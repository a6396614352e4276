"""AnthropicServer: a real local server speaking the Anthropic Messages streaming format.

The same machinery as :class:`tests.model_server.ModelServer` (raw asyncio HTTP/1.1 on a free
127.0.0.1 port in a background thread, scripted replies, ``.requests`` and ``.headers``), with
``POST /v1/messages`` answered the way Anthropic's API answers ``"stream": true``:

    Answer          message_start (input tokens), content_block_start, ping, one
                    content_block_delta (text_delta) per token, content_block_stop, then per
                    tool call a tool_use block (content_block_start with id and name, one
                    input_json_delta per piece of its arguments, content_block_stop),
                    message_delta (stop_reason, output tokens), message_stop. ``finish_reason``
                    "stop" is sent as ``end_turn``, "length" as ``max_tokens``, "tool_calls" as
                    ``tool_use``, others as is; ``done=False`` leaves out message_stop
    FailMidStream   message_start, a few tokens, then an ``error`` event (overloaded_error)
    HttpError       a non-2xx status with Anthropic's ``{"type": "error", "error": {...}}``
    Stall           optional tokens, then nothing until the server stops
"""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus
from typing import Any

from tests.model_server import (
    Answer,
    FailMidStream,
    HttpError,
    ModelServer,
    Reply,
    Stall,
    _Request,
)
from tokenbridge.model_config import ModelConfig

__all__ = ["AnthropicServer"]

_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    529: "overloaded_error",
}


class AnthropicServer(ModelServer):
    """``with AnthropicServer() as srv:`` serves ``{srv.base_url}/messages``."""

    def __init__(self, reply: Reply | None = None, model: str = "claude-test") -> None:
        super().__init__(reply, model)

    def __repr__(self) -> str:
        return f"AnthropicServer(port={self.port}, requests={len(self.requests)})"

    def model_config(self, **overrides: Any) -> ModelConfig:
        """A ModelConfig of the ``anthropic`` adapter pointing at this server."""
        options: dict[str, Any] = {"adapter": "anthropic", "base_url": self.base_url}
        options["model"] = self.model
        options.update(overrides)
        return ModelConfig(**options)

    async def _respond(self, request: _Request, writer: asyncio.StreamWriter) -> bool:
        if (request.method, request.path) != ("POST", "/v1/messages"):
            await _send_json(writer, 404, _error(404, f"no route {request.path}"))
            return True
        body = json.loads(request.body)
        self.requests.append(body)
        self.headers.append(request.headers)
        reply = self._queued.popleft() if self._queued else self.reply
        if isinstance(reply, HttpError):
            await _send_json(writer, reply.status, _error(reply.status, reply.message))
            return True
        if isinstance(reply, Stall) and not reply.tokens:
            await self._stall()
        await self._stream(body, reply, writer)
        return isinstance(reply, Answer)

    async def _stream(self, body: dict[str, Any], reply: Reply, w: asyncio.StreamWriter) -> None:
        w.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        usage = {"input_tokens": _input_tokens(body), "output_tokens": 1}
        message = {
            "id": "msg_test",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": self.model,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage,
        }
        await _send_event(w, "message_start", {"message": message})
        block = {"index": 0, "content_block": {"type": "text", "text": ""}}
        await _send_event(w, "content_block_start", block)
        await _send_event(w, "ping", {})
        tokens = reply.tokens if not isinstance(reply, HttpError) else ()
        for token in tokens:
            delta = {"index": 0, "delta": {"type": "text_delta", "text": token}}
            await _send_event(w, "content_block_delta", delta)
        if isinstance(reply, Stall):
            await self._stall()
        if isinstance(reply, FailMidStream):
            error = {"type": "overloaded_error", "message": reply.message}
            await _send_event(w, "error", {"error": error})
        elif isinstance(reply, Answer):
            await _send_event(w, "content_block_stop", {"index": 0})
            for index, call in enumerate(reply.tool_calls, 1):
                block = {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}
                await _send_event(
                    w, "content_block_start", {"index": index, "content_block": block}
                )
                for piece in call.arguments:
                    delta = {"type": "input_json_delta", "partial_json": piece}
                    await _send_event(w, "content_block_delta", {"index": index, "delta": delta})
                await _send_event(w, "content_block_stop", {"index": index})
            reason = _STOP_REASONS.get(reply.finish_reason, reply.finish_reason)
            delta = {"stop_reason": reason, "stop_sequence": None}
            await _send_event(
                w, "message_delta", {"delta": delta, "usage": {"output_tokens": len(tokens)}}
            )
            if reply.done:
                await _send_event(w, "message_stop", {})
            if reply.linger:
                await self._stall()
        w.write(b"0\r\n\r\n")
        await w.drain()


def _error(status: int, message: str) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def _input_tokens(body: dict[str, Any]) -> int:
    words = len(str(body.get("system", "")).split())
    return words + sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))


async def _send_json(writer: asyncio.StreamWriter, status: int, payload: object) -> None:
    data = json.dumps(payload).encode()
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:  # 529, Anthropic's "overloaded", is no standard status
        reason = "Error"
    head = f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
    writer.write(f"{head}content-length: {len(data)}\r\n\r\n".encode() + data)
    await writer.drain()


async def _send_event(writer: asyncio.StreamWriter, kind: str, data: dict[str, Any]) -> None:
    """One named SSE event as one HTTP chunk; the data carries its ``type`` as Anthropic's do."""
    frame = f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()
    writer.write(f"{len(frame):x}\r\n".encode() + frame + b"\r\n")
    await writer.drain()
