"""The floor of scenario ``live-floor``: the least work any Python relay of this wire must do.

``python -m benchmarks.floor_relay --port P --redis-url URL`` serves
``GET /v1/sessions/<sid>/events`` as native SSE from the live channels the append script
publishes to (``SPUBLISH <prefix>:{sid}:live``, store/live.py), on uvloop, with no framework:

- ONE raw asyncio connection to Redis, its replies parsed by a ``hiredis.Reader``; each
  session's channel is ``SSUBSCRIBE``d when its first reader comes (``SUNSUBSCRIBE``d when its
  last one leaves);
- an HTTP/1.1 server protocol that reads the request line, and once Redis confirms the
  subscription writes the ``200`` head (chunked, ``text/event-stream``) and ``retry: 1000``;
- per ``smessage``: the payload ``[epoch, prev_id, [[entry_id, [field, value, ...]], ...]]``
  is parsed by a second reader, and each entry becomes one HTTP chunk holding one SSE message,
  ``id: <epoch>:<entry_id>`` / ``event: <kind>`` / ``data: <JSON>``, the JSON of a token
  formatted as ``Event.data_json`` does; the bytes are written to every reader of the session.

What it is NOT: a gateway. No resume (``Last-Event-ID`` is ignored), no history read, no gap
check (``prev_id`` is ignored), no send buffers or flow control (a slow reader grows its
transport's buffer without bound), no keep-alive, no limits, no auth, one request per
connection, no cluster. Only what every relay of this wire does per token remains: read the
channel, parse the message, format the event, write it to each socket. Its CPU per token is
the CPython + uvloop floor on this machine, against which the gateway's figure is read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import hiredis
import uvloop

from benchmarks.processes import FLOOR_READY
from tokenbridge.settings import load_settings
from tokenbridge.wire.events import decode_entry, plain_json
from tokenbridge.wire.keys import Keys

__all__ = ["main"]

_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
)
_OPEN = _HEAD + b"%x\r\nretry: 1000\n\n\r\n" % len(b"retry: 1000\n\n")
_REQUEST = re.compile(rb"GET /v1/sessions/([^/?\s]+)/events[?\s]")
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


def _command(*parts: bytes) -> bytes:
    return b"*%d\r\n%b" % (len(parts), b"".join(b"$%d\r\n%b\r\n" % (len(p), p) for p in parts))


def _chunk(epoch: bytes, entry_id: bytes, flat: list[bytes]) -> bytes:
    """One stream entry as one HTTP chunk holding one SSE message."""
    fields = dict(zip(flat[::2], flat[1::2], strict=True))
    kind = fields[b"kind"]
    gen = fields[b"gen"].decode()
    if kind == b"token" and plain_json(gen):  # the per-token path
        text = fields[b"text"].decode()
        quoted = f'"{text}"' if plain_json(text) else json.dumps(text)
        seq, ts = int(fields[b"seq"]), int(fields[b"ts"])
        data = f'{{"generation_id":"{gen}","seq":{seq},"ts":{ts},"text":{quoted}}}'
    else:  # start, end, ...: a few per generation
        data = decode_entry(fields).data_json()
    body = b"id: %b:%b\nevent: %b\ndata: %b\n\n" % (epoch, entry_id, kind, data.encode())
    return b"%x\r\n%b\r\n" % (len(body), body)


class _Reader(asyncio.Protocol):
    """One HTTP client: a GET of one session's events, then a chunked SSE body."""

    def __init__(self, relay: _Relay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.channel: bytes | None = None
        self._head = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.channel is not None:
            return  # one request per connection: anything after it is ignored
        self._head += data
        if b"\r\n\r\n" not in self._head:
            return
        assert self.transport is not None
        request = _REQUEST.match(self._head)
        if request is None:
            self.transport.write(_NOT_FOUND)
            self.transport.close()
            return
        sid = unquote(request[1].decode())
        self.channel = self.relay.keys.live(sid).encode()
        self.relay.join(self, self.channel)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.channel is not None:
            self.relay.leave(self, self.channel)


class _Relay(asyncio.Protocol):
    """The Redis connection (subscribe mode) and who reads which channel."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        self.redis: asyncio.Transport | None = None
        self.replies = hiredis.Reader()
        self.payloads = hiredis.Reader()  # a message is fed and read back at once: never mixed
        self.readers: dict[bytes, set[_Reader]] = {}  # subscribed channels
        self.waiting: dict[bytes, list[_Reader]] = {}  # SSUBSCRIBE sent, not yet confirmed
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.redis = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        replies = self.replies
        replies.feed(data)
        while (reply := replies.gets()) is not False:
            if not isinstance(reply, list):
                if isinstance(reply, hiredis.ReplyError):
                    print(f"redis: {reply}", flush=True)
                continue  # +OK of AUTH
            if reply[0] == b"smessage":
                self.deliver(reply[1], reply[2])
            elif reply[0] == b"ssubscribe":
                self.confirmed(reply[1])

    def join(self, reader: _Reader, channel: bytes) -> None:
        held = self.readers.get(channel)
        if held is not None:
            assert reader.transport is not None
            reader.transport.write(_OPEN)
            held.add(reader)
        elif channel in self.waiting:
            self.waiting[channel].append(reader)
        else:
            assert self.redis is not None
            self.waiting[channel] = [reader]
            self.redis.write(_command(b"SSUBSCRIBE", channel))

    def leave(self, reader: _Reader, channel: bytes) -> None:
        waiting = self.waiting.get(channel)
        if waiting is not None and reader in waiting:
            waiting.remove(reader)  # confirmed() unsubscribes if no one is left
            return
        held = self.readers.get(channel)
        if held is not None:
            held.discard(reader)
            if not held:
                self._unsubscribe(channel)

    def confirmed(self, channel: bytes) -> None:
        held = self.readers[channel] = set(self.waiting.pop(channel, ()))
        for reader in held:
            assert reader.transport is not None
            reader.transport.write(_OPEN)
        if not held:
            self._unsubscribe(channel)

    def _unsubscribe(self, channel: bytes) -> None:
        del self.readers[channel]
        assert self.redis is not None
        self.redis.write(_command(b"SUNSUBSCRIBE", channel))

    def deliver(self, channel: bytes, payload: bytes) -> None:
        held = self.readers.get(channel)
        if not held or not payload:  # no reader (left), or "read the stream": not served
            return
        self.payloads.feed(payload)
        message: Any = self.payloads.gets()
        if not isinstance(message, list) or len(message) != 3:
            self.payloads = hiredis.Reader()  # malformed: dropped
            return
        epoch, entries = message[0], message[2]
        out = b"".join(_chunk(epoch, entry_id, flat) for entry_id, flat in entries)
        for reader in held:
            assert reader.transport is not None
            reader.transport.write(out)


async def _serve(host: str, port: int, redis_url: str) -> None:
    loop = asyncio.get_running_loop()
    keys = Keys(load_settings(redis_url=redis_url).key_prefix)
    url = urlsplit(redis_url)
    _, relay = await loop.create_connection(
        lambda: _Relay(keys), url.hostname or "127.0.0.1", url.port or 6379
    )
    assert relay.redis is not None
    if url.password:
        user = [unquote(url.username).encode()] if url.username else []
        relay.redis.write(_command(b"AUTH", *user, unquote(url.password).encode()))
    server = await loop.create_server(lambda: _Reader(relay), host, port, backlog=2048)
    print(f"{FLOOR_READY} at http://{host}:{port}", flush=True)
    async with server:
        await relay.lost
    raise SystemExit("floor relay: the Redis connection was lost")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floor_relay")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(args.host, args.port, args.redis_url))


if __name__ == "__main__":
    main()
