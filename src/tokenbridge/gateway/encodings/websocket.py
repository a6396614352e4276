"""``websocket``: tokenbridge's WebSocket messages (docs/wire-format.md, "WebSocket").

One event is ``{"id", "event", "data"}`` (the same id and data as SSE); several queued events go
out as one JSON array. Keep-alive is ``{"type":"ping"}``; the close frame carries the reason, so
there are no closing bytes. Stateless: each event is encoded once per gateway.
"""

from __future__ import annotations

import json
from typing import Any

from tokenbridge.gateway.encodings.base import FrameEncoding
from tokenbridge.gateway.frames import Frame
from tokenbridge.wire.events import plain_json

__all__ = ["WebSocketJSON"]


class WebSocketJSON(FrameEncoding):
    name = "websocket"
    transport = "websocket"
    media_type = "application/json"
    join_batches = False  # one flat array of events, never an array of arrays

    def frame(self, frame: Frame) -> str:
        event = frame.event
        if plain_json(frame.epoch):  # the entry id and the kind never need escaping
            return (
                f'{{"id":"{frame.epoch}:{frame.entry_id}","event":"{event.kind}",'
                f'"data":{event.data_json()}}}'
            )
        message = {"id": frame.event_id, "event": event.kind, "data": event.to_data()}
        return json.dumps(message, separators=(",", ":"))

    def join(self, parts: list[Any]) -> str:
        return "[" + ",".join(parts) + "]"

    def gap(self, info: dict[str, Any]) -> str:
        return json.dumps({"id": None, "event": "gap", "data": info}, separators=(",", ":"))

    def keepalive(self) -> str:
        return '{"type":"ping"}'
