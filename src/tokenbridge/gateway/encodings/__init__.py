"""Client encodings, by name: how a session's events are written to one kind of client.

``native_sse`` and ``websocket`` are tokenbridge's own; a new one is one module (see
:mod:`tokenbridge.gateway.encodings.base` for the interface) plus one :func:`register` call.
"""

from __future__ import annotations

from tokenbridge.gateway.encodings.base import (
    Chunk,
    Encoder,
    Encoding,
    FrameEncoder,
    FrameEncoding,
    GenerationInfo,
    StreamContext,
)
from tokenbridge.gateway.encodings.native_sse import NativeSSE
from tokenbridge.gateway.encodings.websocket import WebSocketJSON

__all__ = [
    "Chunk",
    "Encoder",
    "Encoding",
    "FrameEncoder",
    "FrameEncoding",
    "GenerationInfo",
    "StreamContext",
    "get",
    "names",
    "register",
    "unregister",
]

_REGISTRY: dict[str, Encoding] = {}


def register(encoding: Encoding, *, replace: bool = False) -> Encoding:
    """Make ``encoding`` available under its ``name``; a taken name raises unless ``replace``."""
    if encoding.name in _REGISTRY and not replace:
        raise ValueError(f"encoding {encoding.name!r} is already registered")
    _REGISTRY[encoding.name] = encoding
    return encoding


def unregister(name: str) -> None:
    """Remove an encoding (tests, reloads); unknown names are ignored."""
    _REGISTRY.pop(name, None)


def get(name: str) -> Encoding:
    """The encoding registered as ``name``; KeyError if there is none."""
    return _REGISTRY[name]


def names() -> list[str]:
    return sorted(_REGISTRY)


register(NativeSSE())
register(WebSocketJSON())
