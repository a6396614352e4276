"""The Chat Completions encoding: a session's events as OpenAI ``chat.completion.chunk`` SSE.

One generation (the one the route submitted) becomes ``data: <chunk>`` blocks: the ``start``
event the first chunk (``delta: {"role": "assistant", "content": ""}``), each ``token`` a
``content`` delta, each ``tool_call`` fragment a ``tool_calls`` delta (``id``/``name`` on a
call's first fragment), ``end`` the chunk with ``finish_reason``, then, when the client asked
(``stream_options.include_usage``), the usage chunk, then ``data: [DONE]``. An ``error`` (or a
cancelled/abandoned end) is an error chunk ``{"error": {...}}`` (the SDK raises ``APIError``)
and ``[DONE]``. Every chunk has the same ``id`` (``chatcmpl-<session id>``) and ``created``.

Resumable (OpenAI's Chat Completions has no resume): every block carries an SSE ``id:``, the
event id of the entry it comes from (``<epoch>:<entry id>``); the 2nd, 3rd ... block of one
entry (usage chunk, ``[DONE]``) has ``<event id>.<k>``. A client resumes with that id as
``Last-Event-ID`` and gets the blocks after it, byte for byte those it missed.

The openai-python SSE decoder hazard (docs/openai.md): ``id:`` and ``retry:`` lines only
inside blocks that also carry ``data:``, and a keep-alive is one comment line ``: ping`` with
no blank line after it; a blank line after an ``id:`` dispatches an empty event, which the SDK
feeds to ``json.loads``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tokenbridge.gateway.encodings.base import GenerationInfo, StreamContext, TransportName
from tokenbridge.gateway.frames import Batch, Frame
from tokenbridge.wire.events import Event

__all__ = [
    "ChatChunkEncoder",
    "ChatCollector",
    "ChatCompletionsEncoding",
    "ChatOptions",
    "finish_reason",
    "usage_of",
]

_FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls"}
_FINISH["content_filter"] = "content_filter"
# Ends that are not an answer: the client gets an error chunk rather than a silent "stop".
_NOT_ANSWERS = {
    "cancelled": ("generation_cancelled", "the generation was cancelled"),
    "abandoned": ("generation_abandoned", "no client read the stream; the generation stopped"),
}
_DONE = b"[DONE]"


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def finish_reason(reason: str) -> str:
    """``end.reason`` as an OpenAI ``finish_reason`` (``stop`` for unknown ones)."""
    return _FINISH.get(reason, "stop")


def usage_of(event: Event) -> dict[str, int]:
    """The usage object of an ``end`` event (completion tokens counted when not reported)."""
    usage = event.usage or {}
    completion = usage.get("completion_tokens", event.tokens)
    prompt = usage.get("prompt_tokens", 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": usage.get("total_tokens", prompt + completion),
    }


def _plain(text: str) -> bool:
    return text.isascii() and text.isprintable() and '"' not in text and "\\" not in text


@dataclass(frozen=True, slots=True)
class ChatOptions:
    """The encoding's options (``StreamContext.options``): the completion's id, whether the
    client asked for the usage chunk, and where a resume starts.

    ``resume_after`` is ``(entry id, k)`` when the client's Last-Event-ID was the ``k``-th
    block of that entry: the route resumes after that entry, and passes the entry itself as
    ``pending``, whose blocks after ``k`` (the usage chunk, ``[DONE]``) come first.
    """

    completion_id: str
    include_usage: bool = False
    resume_after: tuple[str, int] | None = None
    pending: Frame | None = None


class ChatCompletionsEncoding:
    """``openai_chat``: registered in :mod:`tokenbridge.gateway.encodings`."""

    name = "openai_chat"
    transport: TransportName = "sse"
    media_type = "text/event-stream"

    def open(self, ctx: StreamContext) -> ChatChunkEncoder:
        assert isinstance(ctx.options, ChatOptions) and ctx.generation is not None
        return ChatChunkEncoder(ctx.options, ctx.generation, ctx.retry_ms)


def error_chunk(code: str, message: str, kind: str = "server_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class ChatChunkEncoder:
    """One connection's chunk stream; ``finished`` once ``[DONE]`` was produced."""

    def __init__(self, options: ChatOptions, info: GenerationInfo, retry_ms: int = 0) -> None:
        self.options = options
        self.generation_id = info.generation_id
        self.finished = False
        self._retry = f"retry: {retry_ms}\n".encode() if retry_ms else b""
        head = {
            "id": options.completion_id,
            "object": "chat.completion.chunk",
            "created": info.created_s,
            "model": info.model,
        }
        self._head = _dumps(head)[:-1]  # '{"id":...,"model":"m"' without the closing brace
        self._content_prefix = self._head + b',"choices":[{"index":0,"delta":{"content":'
        self._suffix = b'},"logprobs":null,"finish_reason":null}],"usage":null}'

    # -- chunks --------------------------------------------------------------------------

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return self._head + b',"choices":[' + _dumps(choice) + b'],"usage":null}'

    def _usage_chunk(self, usage: dict[str, int]) -> bytes:
        return self._head + b',"choices":[],"usage":' + _dumps(usage) + b"}"

    def _token(self, text: str) -> bytes:
        quoted = f'"{text}"'.encode() if _plain(text) else _dumps(text)
        return self._content_prefix + quoted + self._suffix

    def _tool_call(self, event: Event) -> bytes:
        call: dict[str, Any] = {"index": event.index}
        function: dict[str, Any] = {}
        if event.call_id:
            call["id"] = event.call_id
            call["type"] = "function"
        if event.name:
            function["name"] = event.name
        function["arguments"] = event.arguments
        call["function"] = function
        return self._chunk({"tool_calls": [call]})

    def blocks(self, event: Event) -> list[bytes]:
        """The data payloads of one event of the completion's generation, in order."""
        kind = event.kind
        if kind == "token":
            return [self._token(event.text)]
        if kind == "start":
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "tool_call":
            return [self._tool_call(event)]
        if kind == "end":
            if event.reason in _NOT_ANSWERS:
                code, message = _NOT_ANSWERS[event.reason]
                return [_dumps(error_chunk(code, message)), _DONE]
            out = [self._chunk({}, finish_reason(event.reason))]
            if self.options.include_usage:
                out.append(self._usage_chunk(usage_of(event)))
            return [*out, _DONE]
        if kind == "error":
            return [_dumps(error_chunk(event.code, event.message or event.code)), _DONE]
        return []

    # -- the Encoder interface (gateway/encodings/base.py) --------------------------------

    def preamble(self) -> bytes | None:
        """The rest of the entry a resume starts in (``retry:`` goes into the first data block:
        the SDK hazard)."""
        pending = self.options.pending
        if pending is None or pending.event.generation_id != self.generation_id:
            return None
        return self._frame_blocks(pending) or None

    def gap(self, info: dict[str, Any]) -> bytes | None:
        """History the client missed is gone: say so (the SDK raises) and end the stream."""
        self.finished = True
        message = f"the stream cannot be resumed without a gap ({info.get('reason')})"
        body = _dumps(error_chunk("stream_gap", message))
        return self._frame("gap", body) + self._frame("gap.1", _DONE)

    def encode(self, batches: list[Batch]) -> bytes | None:
        out = []
        generation_id = self.generation_id
        for batch in batches:
            for frame in batch.frames:
                event = frame.event
                if self.finished or event.generation_id != generation_id:
                    continue
                if event.kind == "token" and not self._retry:  # the hot path: one block
                    head = f"id: {frame.epoch}:{frame.entry_id}\ndata: ".encode()
                    out.append(head + self._token(event.text) + b"\n\n")
                else:
                    out.append(self._frame_blocks(frame))
        return b"".join(out) or None

    def _frame_blocks(self, frame: Frame) -> bytes:
        event_id = f"{frame.epoch}:{frame.entry_id}"
        skip = -1
        resume = self.options.resume_after
        if resume is not None and resume[0] == frame.entry_id:
            skip = resume[1]
        parts = []
        for k, payload in enumerate(self.blocks(frame.event)):
            if payload is _DONE:
                self.finished = True
            if k > skip:
                parts.append(self._frame(event_id if k == 0 else f"{event_id}.{k}", payload))
        return b"".join(parts)

    def _frame(self, block_id: str, payload: bytes) -> bytes:
        retry, self._retry = self._retry, b""
        return b"id: " + block_id.encode() + b"\n" + retry + b"data: " + payload + b"\n\n"

    def keepalive(self) -> bytes | None:
        return b": ping\n"  # one comment line, no blank line after it (the SDK hazard)

    def closing(self, reason: str) -> bytes | None:
        return None if self.finished else f": closed {reason}\n".encode()


@dataclass(slots=True)
class ChatCollector:
    """Non-stream Chat Completions: the same events gathered into one ``chat.completion``
    (an :class:`~tokenbridge.gateway.encodings.base.Encoder` that writes nothing)."""

    completion_id: str
    info: GenerationInfo
    finished: bool = False
    content: list[str] = field(default_factory=list)
    calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish: str = "stop"
    usage: dict[str, int] | None = None
    error: tuple[str, str] | None = None

    def preamble(self) -> bytes | None:
        return None

    def gap(self, info: dict[str, Any]) -> bytes | None:
        self.finished = True
        self.error = ("stream_gap", f"the answer's history was lost ({info.get('reason')})")
        return None

    def encode(self, batches: list[Batch]) -> bytes | None:
        for batch in batches:
            for frame in batch.frames:
                self.add(frame.event)
        return None

    def keepalive(self) -> bytes | None:
        return None

    def closing(self, reason: str) -> bytes | None:
        return None

    def add(self, event: Event) -> None:
        if event.generation_id != self.info.generation_id or self.finished:
            return
        if event.kind == "token":
            self.content.append(event.text)
        elif event.kind == "tool_call":
            call = self.calls.setdefault(
                event.index,
                {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
            )
            call["id"] = call["id"] or event.call_id
            call["function"]["name"] = call["function"]["name"] or event.name
            call["function"]["arguments"] += event.arguments
        elif event.kind == "end":
            self.finished = True
            if event.reason in _NOT_ANSWERS:
                self.error = _NOT_ANSWERS[event.reason]
            self.finish = finish_reason(event.reason)
            self.usage = usage_of(event)
        elif event.kind == "error":
            self.finished = True
            self.error = (event.code, event.message or event.code)

    def completion(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content)}
        if self.calls:
            message["tool_calls"] = [self.calls[i] for i in sorted(self.calls)]
            if not self.content:
                message["content"] = None
        message["refusal"] = None
        return {
            "id": self.completion_id,
            "object": "chat.completion",
            "created": self.info.created_s,
            "model": self.info.model,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": self.finish}
            ],
            "usage": self.usage or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }
