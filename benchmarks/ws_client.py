"""A WebSocket client for the benchmark: the ``websockets`` library, counting like the SSE one.

It offers permessage-deflate, as browsers do (the gateway decides whether to use it). A
message is one event or a JSON array of them; tokens are counted with ``str.count`` over the
whole message. ``{"type": "ping"}`` is sent first: the gateway's ``pong`` says the connection
is registered (there is no preamble as in SSE). A stream cut by the gateway (close 1012/1013)
is resumed with ``?last_event_id=``, as the SDK does.
"""

from __future__ import annotations

import re
import time
from urllib.parse import quote

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from benchmarks.sse_client import StreamTally

__all__ = ["follow_ws"]

_TOKEN = '"event":"token"'
_END = '"event":"end"'
_ERROR = '"event":"error"'
_GAP = '"event":"gap"'
_ID = '"id":"'
_TEXT_NS = re.compile(r'"text":"(\d+)"')


def _feed(tally: StreamTally, message: str, now: float, wall_ns: int) -> None:
    tokens = message.count(_TOKEN)
    if tokens:
        if tally.first_token_at is None:
            tally.first_token_at = now
        tally.tokens += tokens
        if tally.latency:  # the paced producer's send time is the token's text
            tally.latencies_ns.extend(wall_ns - int(m) for m in _TEXT_NS.findall(message))
    at = message.rfind(_ID)
    if at >= 0:
        tally.last_event_id = message[at + 6 : message.index('"', at + 6)]
    if _GAP in message:
        tally.gaps += message.count(_GAP)
    if _END in message or _ERROR in message:
        tally.end_at = now
        tally.ended.set()


async def follow_ws(host: str, port: int, tally: StreamTally, max_reconnects: int = 100) -> None:
    """Read ``tally.session_id``'s events over WebSocket until ``end`` (or ``error``).

    Cancellation closes the connection and propagates.
    """
    while True:
        url = f"ws://{host}:{port}/v1/sessions/{tally.session_id}/ws"
        if tally.last_event_id is not None:
            url += f"?last_event_id={quote(tally.last_event_id)}"
        async with connect(url, max_size=None, open_timeout=60) as ws:
            await ws.send('{"type":"ping"}')
            try:
                async for message in ws:
                    assert isinstance(message, str)
                    if not tally.subscribed.is_set() and '"type":"pong"' in message:
                        tally.subscribed.set()
                        continue
                    _feed(tally, message, time.perf_counter(), time.time_ns())
                    if tally.ended.is_set():
                        return
            except ConnectionClosed:
                pass
            tally.closed_reasons.append(ws.close_reason or f"close {ws.close_code}")
        if tally.reconnects >= max_reconnects:
            raise RuntimeError(f"session {tally.session_id}: over {max_reconnects} reconnects")
        tally.reconnects += 1
