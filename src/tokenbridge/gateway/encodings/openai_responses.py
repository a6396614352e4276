"""The Responses encoding: a session's events as OpenAI Responses API stream events.

The event sequence is a pure function of the generation's events, so every replay gives the
same events with the same ``sequence_number`` s, and a resume on any node is a replay from the
session stream's first entry with the events up to ``starting_after`` left out:

==============  ===========================================================================
session event   Responses events (``sequence_number`` 0, 1, 2 ... in this order)
==============  ===========================================================================
(always)        ``response.created`` (0; status ``queued`` in background, else
                ``in_progress``), ``response.queued`` (background only)
``start``       ``response.in_progress``
``token``       the first one: ``response.output_item.added`` (a ``message``),
                ``response.content_part.added``; each: ``response.output_text.delta``
``tool_call``   the message item closed if open; a new call: ``response.output_item.added``
                (a ``function_call``); each fragment: ``response.function_call_arguments.delta``
``end``         open items closed (``output_text.done``, ``content_part.done``,
                ``function_call_arguments.done``, ``output_item.done``), then
                ``response.completed`` (stop, tool_calls) or ``response.incomplete``
                (length, content_filter; and cancelled/abandoned with status ``cancelled``)
``error``       open items closed as incomplete, ``response.failed`` with ``error``
==============  ===========================================================================

:meth:`ResponsesEncoder.snapshot` is the Response object as those events leave it (what
``GET /v1/responses/{id}`` answers). Framing: ``event: <type>`` and ``data: <json>`` per block,
no ``id:`` lines; a keep-alive is one ``: ping`` comment line (the SDK hazard, docs/openai.md).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from typing import Any

from tokenbridge.gateway.encodings.base import StreamContext, TransportName
from tokenbridge.gateway.frames import Batch
from tokenbridge.wire.events import Event

__all__ = [
    "ResponsesEncoder",
    "ResponsesEncoding",
    "ResponsesOptions",
    "events_of_final",
    "usage_of",
]

# end.reason -> (status, incomplete_details.reason)
_ENDS = {
    "stop": ("completed", None),
    "tool_calls": ("completed", None),
    "length": ("incomplete", "max_output_tokens"),
    "content_filter": ("incomplete", "content_filter"),
    "cancelled": ("cancelled", None),
    "abandoned": ("cancelled", None),
}
_TERMINAL_EVENT = {
    "completed": "response.completed",
    "incomplete": "response.incomplete",
    "cancelled": "response.incomplete",
    "failed": "response.failed",
}


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def usage_of(event: Event) -> dict[str, Any]:
    """An ``end`` event's usage in the Responses API's shape."""
    usage = event.usage or {}
    output = usage.get("completion_tokens", event.tokens)
    prompt = usage.get("prompt_tokens", 0)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.get("total_tokens", prompt + output),
    }


_REASONS = {"max_output_tokens": "length", "content_filter": "content_filter"}


def events_of_final(final: dict[str, Any], generation_id: str) -> list[Event]:
    """Session events that encode to ``final`` (a kept Response object), for a replay after
    its session stream expired: one ``token`` per message, one ``tool_call`` per call."""
    ts = int(final.get("completed_at") or final.get("created_at") or 0) * 1000
    events = [Event("start", generation_id, 0, ts, model=str(final.get("model", "")))]
    calls = 0
    for item in final.get("output", []):
        seq = len(events)
        if item.get("type") == "message":
            text = "".join(p.get("text", "") for p in item.get("content", []))
            events.append(Event("token", generation_id, seq, ts, text=text))
        elif item.get("type") == "function_call":
            events.append(
                Event("tool_call", generation_id, seq, ts, index=calls, call_id=item["call_id"],
                      name=item["name"], arguments=item["arguments"])
            )  # fmt: skip
            calls += 1
    status, seq = final.get("status"), len(events)
    if status == "failed":
        message = (final.get("error") or {}).get("message", "failed")
        return [*events, Event("error", generation_id, seq, ts, code="failed", message=message)]
    usage = final.get("usage") or {}
    tokens = usage.get("output_tokens", 0)
    wire_usage = {
        "prompt_tokens": usage.get("input_tokens", 0),
        "completion_tokens": tokens,
        "total_tokens": usage.get("total_tokens", 0),
    }
    reason = "tool_calls" if calls else "stop"
    if status == "cancelled":
        reason = "cancelled"
    elif status == "incomplete":
        details = final.get("incomplete_details") or {}
        reason = _REASONS.get(str(details.get("reason")), "length")
    end = Event("end", generation_id, seq, ts, reason=reason, tokens=tokens, usage=wire_usage)
    return [*events, end]


@dataclass(frozen=True, slots=True)
class ResponsesOptions:
    """``base`` is the Response object's constant fields (id, model, created_at, tools, ...)."""

    base: dict[str, Any]
    generation_id: str
    background: bool = False
    starting_after: int = -1


class ResponsesEncoding:
    """``openai_responses``: registered in :mod:`tokenbridge.gateway.encodings`."""

    name = "openai_responses"
    transport: TransportName = "sse"
    media_type = "text/event-stream"

    def open(self, ctx: StreamContext) -> ResponsesEncoder:
        assert isinstance(ctx.options, ResponsesOptions)
        return ResponsesEncoder(ctx.options)


class ResponsesEncoder:
    """One replay of a response's events; ``finished`` after its terminal event."""

    def __init__(self, options: ResponsesOptions) -> None:
        self.options = options
        self.finished = False
        self.seq = 0
        self.status = "queued" if options.background else "in_progress"
        self.output: list[dict[str, Any]] = []
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.incomplete: dict[str, Any] | None = None
        self.completed_at: int | None = None
        self._message: int | None = None  # output index of the open message item
        self._calls: dict[int, int] = {}  # tool call index -> output index, while open
        # Text and arguments of open items as pieces, joined when read (a += per token on a
        # dict value would copy the whole text each time).
        self._pieces: dict[int, list[str]] = {}

    @property
    def response_id(self) -> str:
        return str(self.options.base["id"])

    def _flush(self, index: int) -> None:
        """Join the open item's pieces into it."""
        pieces = self._pieces.get(index)
        if not pieces:
            return
        item = self.output[index]
        joined = "".join(pieces)
        if item["type"] == "message":
            item["content"][0]["text"] = joined
        else:
            item["arguments"] = joined
        self._pieces[index] = [joined]

    def snapshot(self) -> dict[str, Any]:
        """The Response object now."""
        for index in self._pieces:
            self._flush(index)
        return {
            **self.options.base,
            "status": self.status,
            "output": copy.deepcopy(self.output),
            "usage": self.usage,
            "error": self.error,
            "incomplete_details": self.incomplete,
            "completed_at": self.completed_at,
        }

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return event

    # -- the state machine -----------------------------------------------------------------

    def initial(self) -> list[dict[str, Any]]:
        events = [self._event("response.created", response=self.snapshot())]
        if self.options.background:
            events.append(self._event("response.queued", response=self.snapshot()))
        return events

    def events(self, event: Event) -> list[dict[str, Any]]:
        """The Responses events of one session event (none for other generations)."""
        if event.generation_id != self.options.generation_id or self.finished:
            return []
        kind = event.kind
        if kind == "token":
            return [*self._open_message(), self._text_delta(event.text)]
        if kind == "start":
            self.status = "in_progress"
            return [self._event("response.in_progress", response=self.snapshot())]
        if kind == "tool_call":
            return self._tool_call(event)
        if kind == "end":
            status, reason = _ENDS.get(event.reason, ("completed", None))
            self.usage = usage_of(event)
            self.incomplete = {"reason": reason} if reason else None
            return self._finish(status, event.ts)
        if kind == "error":
            self.error = {"code": "server_error", "message": event.message or event.code}
            return self._finish("failed", event.ts)
        return []

    def _open_message(self) -> list[dict[str, Any]]:
        if self._message is not None:
            return []
        index = len(self.output)
        self._message = index
        item: dict[str, Any] = {
            "id": f"msg_{self.response_id[5:]}_{index}",
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        self.output.append(item)
        self._pieces[index] = []
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        added = self._event(
            "response.output_item.added", output_index=index, item=copy.deepcopy(item)
        )
        item["content"].append(dict(part))
        return [
            added,
            self._event(
                "response.content_part.added",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part=part,
            ),
        ]

    def _text_delta(self, text: str) -> dict[str, Any]:
        index = self._message
        assert index is not None
        item = self.output[index]
        self._pieces[index].append(text)
        return self._event(
            "response.output_text.delta",
            item_id=item["id"],
            output_index=index,
            content_index=0,
            delta=text,
            logprobs=[],
        )

    def _close_message(self, status: str) -> list[dict[str, Any]]:
        index, self._message = self._message, None
        if index is None:
            return []
        self._flush(index)
        del self._pieces[index]
        item = self.output[index]
        item["status"] = status
        part = item["content"][0]
        common = {"item_id": item["id"], "output_index": index, "content_index": 0}
        return [
            self._event("response.output_text.done", **common, text=part["text"], logprobs=[]),
            self._event("response.content_part.done", **common, part=dict(part)),
            self._event("response.output_item.done", output_index=index, item=copy.deepcopy(item)),
        ]

    def _tool_call(self, event: Event) -> list[dict[str, Any]]:
        out = self._close_message("completed")
        index = self._calls.get(event.index)
        if index is None:
            index = self._calls[event.index] = len(self.output)
            item = {
                "id": f"fc_{self.response_id[5:]}_{index}",
                "type": "function_call",
                "status": "in_progress",
                "call_id": event.call_id or f"call_{index}",
                "name": event.name,
                "arguments": "",
            }
            self.output.append(item)
            self._pieces[index] = []
            out.append(
                self._event("response.output_item.added", output_index=index, item=dict(item))
            )
        item = self.output[index]
        if event.arguments:
            self._pieces[index].append(event.arguments)
            out.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=index,
                    delta=event.arguments,
                )
            )
        return out

    def _close_calls(self, status: str) -> list[dict[str, Any]]:
        out = []
        for index in sorted(self._calls.values()):
            self._flush(index)
            del self._pieces[index]
            item = self.output[index]
            item["status"] = status
            out.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    name=item["name"],
                    arguments=item["arguments"],
                )
            )
            out.append(
                self._event("response.output_item.done", output_index=index, item=dict(item))
            )
        self._calls.clear()
        return out

    def _finish(self, status: str, ts_ms: int) -> list[dict[str, Any]]:
        item_status = "completed" if status == "completed" else "incomplete"
        out = [*self._close_message(item_status), *self._close_calls(item_status)]
        self.status = status
        self.completed_at = ts_ms // 1000 if status == "completed" else None
        self.finished = True
        out.append(self._event(_TERMINAL_EVENT[status], response=self.snapshot()))
        return out

    # -- the Encoder interface (gateway/encodings/base.py) --------------------------------

    def _frame(self, events: list[dict[str, Any]]) -> bytes | None:
        after = self.options.starting_after
        parts = [
            f"event: {e['type']}\ndata: {_dumps(e)}\n\n"
            for e in events
            if e["sequence_number"] > after
        ]
        return "".join(parts).encode() or None

    def preamble(self) -> bytes | None:
        return self._frame(self.initial())

    def gap(self, info: dict[str, Any]) -> bytes | None:
        """The stream lost entries: the replay cannot be exact; fail the response here."""
        self.error = {
            "code": "server_error",
            "message": f"stream history lost ({info.get('reason')})",
        }
        return self._frame(self._finish("failed", int(time.time() * 1000)))

    def encode(self, batches: list[Batch]) -> bytes | None:
        events: list[dict[str, Any]] = []
        for batch in batches:
            for frame in batch.frames:
                events.extend(self.events(frame.event))
        return self._frame(events) if events else None

    def keepalive(self) -> bytes | None:
        return b": ping\n"

    def closing(self, reason: str) -> bytes | None:
        return None if self.finished else f": closed {reason}\n".encode()
