"""``native_sse``: tokenbridge's own Server-Sent Events (docs/wire-format.md, "SSE").

Every event is one block ``id: <epoch>:<entry id>`` / ``event: <kind>`` / ``data: <JSON>``; the
stream opens with ``retry:`` (with jitter, so a mass reconnect spreads), keeps alive with
``: ping``, and a server close ends with ``: closed <reason>``. Stateless: each event is
encoded once per gateway and shared by every connection.
"""

from __future__ import annotations

import json
import random
from typing import Any

from tokenbridge.gateway.encodings.base import FrameEncoding, StreamContext
from tokenbridge.gateway.frames import Frame

__all__ = ["NativeSSE", "sse_message"]


def sse_message(event: str, data: dict[str, Any], event_id: str | None = None) -> bytes:
    """One SSE message; ``data`` is JSON on one line (JSON escapes every newline)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class NativeSSE(FrameEncoding):
    name = "native_sse"
    transport = "sse"
    media_type = "text/event-stream"

    def frame(self, frame: Frame) -> bytes:
        event = frame.event
        return (
            f"id: {frame.epoch}:{frame.entry_id}\nevent: {event.kind}\n"
            f"data: {event.data_json()}\n\n"
        ).encode()

    def preamble(self, ctx: StreamContext) -> bytes:
        return f"retry: {int(ctx.retry_ms * random.uniform(1.0, 1.5))}\n\n".encode()

    def gap(self, info: dict[str, Any]) -> bytes:
        return sse_message("gap", info)

    def keepalive(self) -> bytes:
        return b": ping\n\n"

    def closing(self, reason: str) -> bytes:
        return f": closed {reason}\n\n".encode()
