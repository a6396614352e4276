"""The encoding interface: how one connection turns a session's events into bytes on the wire.

For plug-in authors. An :class:`Encoding` is registered once by name
(``tokenbridge.gateway.encodings.register``) and opened once per connection with a
:class:`StreamContext`; the :class:`Encoder` it returns lives as long as the connection and may
keep state (a constant completion id, a ``sequence_number``, which item ids were opened).
The connection's pump (``gateway/pump.py``) calls the encoder and writes what it returns
(``None`` means "write nothing"):

1. :meth:`Encoder.preamble` once, then :meth:`Encoder.gap` if the client's history was lost;
2. :meth:`Encoder.encode` with the batches due (history, then live), already cut after what
   this client has: a batch may turn into 0..n blocks (one chunk per token, nothing for a
   ``start``, two events for an ``end`` ...), returned joined as one chunk, written at once;
3. :meth:`Encoder.keepalive` when nothing was sent for ``connection_heartbeat_s``;
4. :meth:`Encoder.closing` when the server ends the stream (``shutdown``, ``slow_client``,
   ``idle``, or ``done`` after the encoder set :attr:`Encoder.finished`). Not called when the
   client left.

Setting :attr:`Encoder.finished` (e.g. after the terminal event of the generation a route
submitted, with its ``[DONE]`` written) makes the pump end the stream after that write.

Speed: an encoding whose output for an event does not depend on the connection should
subclass :class:`FrameEncoding`: each event is encoded once per gateway and the bytes are shared
by every connection (``Frame.encoded``), as the native SSE and WebSocket encodings do.
A transport (``sse``: chunks are ``bytes`` of ``text/event-stream``; ``websocket``: chunks are
``str`` text messages) is chosen by :attr:`Encoding.transport`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

from tokenbridge.gateway.frames import Batch, Frame

__all__ = [
    "Chunk",
    "Encoder",
    "Encoding",
    "FrameEncoder",
    "FrameEncoding",
    "GenerationInfo",
    "StreamContext",
    "TransportName",
]

Chunk = bytes | str
TransportName = Literal["sse", "websocket"]


@dataclass(frozen=True, slots=True)
class GenerationInfo:
    """What the route knows of the generation it submitted before streaming it (the result of
    ``submit_generation``): encodings that answer one request (OpenAI) stream that one."""

    generation_id: str
    model: str
    created_s: int


@dataclass(frozen=True, slots=True)
class StreamContext:
    """Per-connection facts an encoder may need.

    ``options`` is the encoding's own typed options object (a frozen dataclass it defines, such
    as ``include_usage``), built by the route from the request; ``None`` when it takes none.
    ``resumed`` tells whether the client gave a ``Last-Event-ID``.
    """

    session_id: str
    options: Any = None
    generation: GenerationInfo | None = None
    resumed: bool = False
    retry_ms: int = 1000


class Encoder(Protocol):
    """One connection's encoder; see the module docstring for when each method is called."""

    finished: bool

    def preamble(self) -> Chunk | None: ...

    def gap(self, info: dict[str, Any]) -> Chunk | None: ...

    def encode(self, batches: list[Batch]) -> Chunk | None: ...

    def keepalive(self) -> Chunk | None: ...

    def closing(self, reason: str) -> Chunk | None: ...


class Encoding(Protocol):
    """A named way to write a session to clients; :meth:`open` makes one connection's encoder."""

    @property
    def name(self) -> str: ...

    @property
    def transport(self) -> TransportName: ...

    @property
    def media_type(self) -> str: ...

    def open(self, ctx: StreamContext) -> Encoder: ...


class FrameEncoding:
    """Base of stateless encodings: one event's chunk depends only on the event and its id.

    Subclasses set ``name``, ``transport``, ``media_type`` and implement :meth:`frame`; each
    frame is encoded once per process and shared by all its connections, each batch joined
    once. Override :meth:`join` for a container (the WebSocket's JSON array; then set
    ``join_batches = False`` so that several batches are joined frame by frame), and the
    per-connection hooks (:meth:`preamble`, :meth:`gap`, :meth:`keepalive`, :meth:`closing`)
    as needed; :meth:`open` wraps them in a small per-connection :class:`FrameEncoder`.
    """

    name: ClassVar[str]
    transport: ClassVar[TransportName]
    media_type: ClassVar[str]
    join_batches: ClassVar[bool] = True

    def open(self, ctx: StreamContext) -> Encoder:
        return FrameEncoder(self, ctx)

    def frame(self, frame: Frame) -> Any:
        """The chunk of one event (``bytes`` for ``sse``, ``str`` for ``websocket``)."""
        raise NotImplementedError

    def join(self, parts: list[Any]) -> Any:
        """Several chunks as one write (concatenated, by default)."""
        return parts[0][:0].join(parts)

    def encode_frame(self, frame: Frame) -> Any:
        """:meth:`frame`, computed once per frame and shared."""
        return frame.encoded(self.name, self.frame)

    def encode_batch(self, batch: Batch) -> Any:
        """The batch's frames joined, computed once per batch and shared."""
        return batch.encoded(self.name, self._join_batch)

    def _join_batch(self, batch: Batch) -> Any:
        frames, name, frame = batch.frames, self.name, self.frame
        if len(frames) == 1:
            return frames[0].encoded(name, frame)
        return self.join([f.encoded(name, frame) for f in frames])

    def encode(self, batches: list[Batch]) -> Chunk | None:
        if len(batches) == 1:
            frames = batches[0].frames
            if len(frames) == 1:  # one token: the frame's own chunk, shared as it is
                chunk: Chunk = frames[0].encoded(self.name, self.frame)
                return chunk
            chunk = self.encode_batch(batches[0])
            return chunk
        if self.join_batches:
            chunk = self.join([self.encode_batch(b) for b in batches])
        else:
            chunk = self.join([self.encode_frame(f) for b in batches for f in b.frames])
        return chunk

    def preamble(self, ctx: StreamContext) -> Chunk | None:
        return None

    def gap(self, info: dict[str, Any]) -> Chunk | None:
        return None

    def keepalive(self) -> Chunk | None:
        return None

    def closing(self, reason: str) -> Chunk | None:
        return None


class FrameEncoder:
    """A :class:`FrameEncoding` opened for one connection (two slots: the encoding, the context)."""

    __slots__ = ("ctx", "encoding")

    finished = False

    def __init__(self, encoding: FrameEncoding, ctx: StreamContext) -> None:
        self.encoding = encoding
        self.ctx = ctx

    def preamble(self) -> Chunk | None:
        return self.encoding.preamble(self.ctx)

    def gap(self, info: dict[str, Any]) -> Chunk | None:
        return self.encoding.gap(info)

    def encode(self, batches: list[Batch]) -> Chunk | None:
        return self.encoding.encode(batches)

    def keepalive(self) -> Chunk | None:
        return self.encoding.keepalive()

    def closing(self, reason: str) -> Chunk | None:
        return self.encoding.closing(reason)
