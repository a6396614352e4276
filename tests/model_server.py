"""ModelServer: a real local OpenAI-compatible chat-completions server for tests.

A raw asyncio HTTP/1.1 server on a free 127.0.0.1 port, run in a background thread with its
own event loop, so the adapter under test goes through a real socket. It records each request
body (``.requests``) and headers (``.headers``) and answers with a scripted :data:`Reply`:

    Answer          role chunk, one chunk per token, then per tool call (``tool_calls``) a chunk
                    with its id and name and one per piece of its arguments, a finish chunk,
                    a usage chunk with empty choices (when the request asked for it), then
                    ``data: [DONE]``
    FailMidStream   a few token chunks, then ``data: {"error": {...}}`` and the end of the body
    HttpError       a non-2xx status and a JSON error body, before any streaming
    Stall           optional token chunks, then nothing until the server stops

``srv.reply`` answers every request; ``srv.script(a, b)`` answers the next two first. A request
with ``"stream": false`` gets one ``chat.completion`` JSON. Stopping (leaving the ``with``)
cuts every connection, stalled ones included, and joins the thread.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from types import TracebackType
from typing import Any, NoReturn

from tokenbridge.model_config import ModelConfig

__all__ = ["Answer", "FailMidStream", "HttpError", "ModelServer", "Reply", "Stall", "ToolCall"]


@dataclass(frozen=True)
class ToolCall:
    """A function call the model makes; ``arguments`` is streamed in these pieces."""

    name: str = "get_weather"
    arguments: Sequence[str] = ('{"city": ', '"Paris"}')
    id: str = "call_1"


@dataclass(frozen=True)
class Answer:
    """A normal answer.

    ``done=False`` ends the body without ``data: [DONE]``; ``linger=True`` sends ``[DONE]`` but
    then keeps the body open until the server stops (a client must not wait for the end).
    """

    tokens: Sequence[str] = ("Hello", ",", " world", "!")
    finish_reason: str = "stop"
    done: bool = True
    linger: bool = False
    tool_calls: Sequence[ToolCall] = ()
    tool_call_index: bool = True  # False: fragments without "index" (as older Ollama sends)


@dataclass(frozen=True)
class FailMidStream:
    """Some tokens, then an error object inside the stream."""

    tokens: Sequence[str] = ("Hello",)
    message: str = "the model crashed"


@dataclass(frozen=True)
class HttpError:
    """A non-2xx answer before any streaming, with extra ``headers`` (``Retry-After``)."""

    status: int = 500
    message: str = "internal server error"
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Stall:
    """Send ``tokens`` (none: not even the headers), then never answer."""

    tokens: Sequence[str] = ()


Reply = Answer | FailMidStream | HttpError | Stall


class _Stopping(Exception):
    """A stalled reply ends because the server stops."""


@dataclass
class _Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class ModelServer:
    """``with ModelServer() as srv:`` serves ``{srv.base_url}/chat/completions``."""

    def __init__(self, reply: Reply | None = None, model: str = "test-model") -> None:
        self.reply: Reply = reply or Answer()
        self.model = model
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.port = 0
        self._queued: deque[Reply] = deque()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()  # open ones
        self._accepted: list[asyncio.StreamWriter] = []  # every one, aborted at stop
        self._error: BaseException | None = None
        self._loop_errors: list[str] = []

    def __repr__(self) -> str:
        return f"ModelServer(port={self.port}, requests={len(self.requests)})"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, *replies: Reply) -> None:
        """Answer the next requests with ``replies`` in order, then with ``self.reply``."""
        self._queued.extend(replies)

    def model_config(self, **overrides: Any) -> ModelConfig:
        """A ModelConfig of the ``openai`` adapter pointing at this server."""
        options: dict[str, Any] = {"adapter": "openai", "base_url": self.base_url}
        options["model"] = self.model
        options.update(overrides)
        return ModelConfig(**options)

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> ModelServer:
        self._thread = threading.Thread(target=self._run, name="model-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=10):
            raise RuntimeError("ModelServer did not start within 10 s")
        if self._error is not None:
            raise RuntimeError(f"ModelServer failed to start: {self._error!r}")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Cut every connection, close the socket and join the thread (idempotent)."""
        if self._thread is None:
            return
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)
        if self._thread.is_alive():
            raise RuntimeError("ModelServer did not stop within 10 s")
        self._thread = None
        if self._loop_errors:
            raise RuntimeError("ModelServer failed while serving: " + "; ".join(self._loop_errors))

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception as exc:  # reported to __enter__ if it happens at startup
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.set_exception_handler(self._record_error)
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()  # stalled replies wake up too and end their connection
            server.close()
            for writer in self._writers:
                writer.close()  # idle keep-alive connections read EOF
            if self._tasks:
                _, late = await asyncio.wait(self._tasks, timeout=5)
                for task in late:
                    task.cancel()
                if late:
                    await asyncio.wait(late)
        # A closed transport whose client stopped reading keeps its socket open until its
        # buffer drains: abort them all, and let their sockets close while this loop still
        # runs. One left to the garbage collector once asyncio.run has closed the loop is
        # reported (ResourceWarning: transport, socket) inside whichever test runs then.
        for writer in self._accepted:
            writer.transport.abort()
        await asyncio.sleep(0)  # one loop iteration: the aborts' connection_lost callbacks

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Every accepted connection is known (and closed at stop) from the start, even one
        whose handler task never got to run."""
        self._writers.add(writer)
        self._accepted.append(writer)
        task = asyncio.get_running_loop().create_task(self._handle(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _record_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """A server bug must fail the test, not vanish into the log of a background thread."""
        self._loop_errors.append(f"{context.get('message')}: {context.get('exception')!r}")

    # -- HTTP ----------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (request := await _read_request(reader)) is not None:
                if not await self._respond(request, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, _Stopping):
            pass  # the client went away, or the server stops: nothing more to answer
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _respond(self, request: _Request, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection must be closed after it."""
        if (request.method, request.path) != ("POST", "/v1/chat/completions"):
            await _send_json(writer, 404, {"error": {"message": f"no route {request.path}"}})
            return True
        body = json.loads(request.body)
        self.requests.append(body)
        self.headers.append(request.headers)
        reply = self._queued.popleft() if self._queued else self.reply
        if isinstance(reply, HttpError):
            error = {"message": reply.message, "type": "server_error", "code": None}
            await _send_json(writer, reply.status, {"error": error}, reply.headers)
            return True
        streaming = bool(body.get("stream"))
        if isinstance(reply, Stall):
            if not (streaming and reply.tokens):
                await self._stall()
        elif not streaming:
            if isinstance(reply, Answer):
                await _send_json(writer, 200, self._completion(body, reply))
            else:  # FailMidStream: without a stream, the error is the whole answer
                await _send_json(writer, 500, {"error": {"message": reply.message}})
            return True
        await self._stream(body, reply, writer)
        return isinstance(reply, Answer)

    async def _stream(self, body: dict[str, Any], reply: Reply, w: asyncio.StreamWriter) -> None:
        w.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        await _send_event(w, self._chunk({"role": "assistant", "content": ""}))
        tokens = reply.tokens if not isinstance(reply, HttpError) else ()
        for token in tokens:
            await _send_event(w, self._chunk({"content": token}))
        for index, call in enumerate(reply.tool_calls if isinstance(reply, Answer) else ()):
            at = {"index": index} if isinstance(reply, Answer) and reply.tool_call_index else {}
            head = at | {"id": call.id, "type": "function"}
            head["function"] = {"name": call.name, "arguments": ""}
            await _send_event(w, self._chunk({"tool_calls": [head]}))
            for piece in call.arguments:
                fragment = at | {"function": {"arguments": piece}}
                await _send_event(w, self._chunk({"tool_calls": [fragment]}))
        if isinstance(reply, Stall):
            await self._stall()
        if isinstance(reply, FailMidStream):
            error = {"message": reply.message, "type": "server_error", "code": None}
            await _send_event(w, {"error": error})
        elif isinstance(reply, Answer):
            await _send_event(w, self._chunk({}, reply.finish_reason))
            if body.get("stream_options", {}).get("include_usage"):
                usage_chunk = self._chunk({}) | {"choices": [], "usage": _usage(body, tokens)}
                await _send_event(w, usage_chunk)
            if reply.done:
                await _send_event(w, "[DONE]")
            if reply.linger:
                await self._stall()
        w.write(b"0\r\n\r\n")
        await w.drain()

    async def _stall(self) -> NoReturn:
        """Answer nothing more until the server stops; then end the connection."""
        assert self._stop is not None
        await self._stop.wait()
        raise _Stopping

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return self._envelope("chat.completion.chunk") | {"choices": [choice]}

    def _completion(self, body: dict[str, Any], reply: Answer) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(reply.tokens)}
        if reply.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.name, "arguments": "".join(c.arguments)}}
                for c in reply.tool_calls
            ]  # fmt: skip
        choice = {"index": 0, "message": message, "finish_reason": reply.finish_reason}
        usage = {"usage": _usage(body, reply.tokens)}
        return self._envelope("chat.completion") | {"choices": [choice]} | usage

    def _envelope(self, kind: str) -> dict[str, Any]:
        return {
            "id": "chatcmpl-test",
            "object": kind,
            "created": int(time.time()),
            "model": self.model,
        }


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    line = await reader.readline()
    if not line.strip():
        return None
    method, path, _ = line.decode("latin-1").split(" ", 2)
    headers: dict[str, str] = {}
    while (raw := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = raw.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return _Request(method, path, headers, body)


async def _send_json(
    writer: asyncio.StreamWriter,
    status: int,
    payload: object,
    headers: Sequence[tuple[str, str]] = (),
) -> None:
    data = json.dumps(payload).encode()
    reason = HTTPStatus(status).phrase
    head = f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers)
    writer.write(f"{head}content-length: {len(data)}\r\n\r\n".encode() + data)
    await writer.drain()


async def _send_event(writer: asyncio.StreamWriter, data: dict[str, Any] | str) -> None:
    """One SSE event as one HTTP chunk; a dict is sent as JSON."""
    text = data if isinstance(data, str) else json.dumps(data)
    frame = f"data: {text}\n\n".encode()
    writer.write(f"{len(frame):x}\r\n".encode() + frame + b"\r\n")
    await writer.drain()


def _usage(body: dict[str, Any], tokens: Sequence[str]) -> dict[str, int]:
    prompt = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": len(tokens),
        "total_tokens": prompt + len(tokens),
    }
