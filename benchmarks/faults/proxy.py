"""TCP proxies in front of Redis that inject network faults.

:class:`PausingProxy` holds every byte both ways, as a network partition does: while paused,
connections stay open and nothing passes (the peers see silence, not a reset); on resume, what
was held flows on. New connections are accepted but not forwarded until then.
:class:`ReplyCuttingProxy` lets a round trip reach Redis (whole, or only its first command)
and loses its replies with the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, Self

import hiredis

from benchmarks.processes import free_port

__all__ = ["PausingProxy", "ReplyCuttingProxy"]

_CHUNK = 1 << 16


class _TcpProxy:
    """A listening socket on a free port in front of Redis: accept, connect upstream, hand the
    pair to :meth:`_serve`; every task it starts is owned, cancelled and awaited on exit."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def _own(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)  # owned: cancelled and awaited on exit
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._serve(reader, writer, up_reader, up_writer)

    def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> None:
        raise NotImplementedError


class PausingProxy(_TcpProxy):
    """``async with PausingProxy(target_port) as proxy: proxy.url``; ``pause()``/``resume()``."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self._open = asyncio.Event()
        self._open.set()

    def pause(self) -> None:
        self._open.clear()

    def resume(self) -> None:
        self._open.set()

    def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> None:
        self._own(self._pipe(reader, up_writer))
        self._own(self._pipe(up_reader, writer))

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(_CHUNK):
                await self._open.wait()  # a partition holds the bytes
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.close()


def _commands(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Split RESP requests (arrays of bulk strings) off the front of ``buffer``: the complete
    commands and what is left (an incomplete command)."""
    commands: list[bytes] = []
    pos = 0
    while pos < len(buffer):
        end = buffer.find(b"\r\n", pos)
        if end < 0 or buffer[pos : pos + 1] != b"*":
            break
        count, cursor, complete = int(buffer[pos + 1 : end]), end + 2, True
        for _ in range(count):
            line = buffer.find(b"\r\n", cursor)
            if line < 0:
                complete = False
                break
            cursor = line + 2 + int(buffer[cursor + 1 : line]) + 2
            if cursor > len(buffer):
                complete = False
                break
        if not complete:
            break
        commands.append(buffer[pos:cursor])
        pos = cursor
    return commands, buffer[pos:]


class ReplyCuttingProxy(_TcpProxy):
    """A TCP proxy to Redis that loses the replies of chosen round trips, as a connection cut
    after the request left but before the reply came back does.

    :meth:`arm` makes it watch for the next round trip of two commands or more, one of which
    contains ``marker`` (the producer's pipeline entry and append script: the script's SHA1):
    with ``first_only`` false it forwards the whole round trip, lets Redis answer, drops the
    replies and closes the connection; with ``first_only`` it forwards only the round trip's
    first command, then the same. :attr:`cuts` counts what it did."""

    def __init__(self, target_port: int, marker: bytes) -> None:
        super().__init__(target_port)
        self.marker = marker
        self.cuts = 0
        self._armed: bool | None = None  # None: pass through; else first_only

    def arm(self, first_only: bool) -> None:
        self._armed = first_only

    @property
    def armed(self) -> bool:
        return self._armed is not None

    def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> None:
        self._own(self._link(reader, writer, up_reader, up_writer))

    async def _link(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> None:
        """Requests up, replies down; one round trip's replies lost when armed."""
        lost: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        down = asyncio.get_running_loop().create_task(self._down(up_reader, writer, lost))
        buffer = b""
        try:
            while data := await reader.read(_CHUNK):
                if self._armed is None and not buffer:
                    up_writer.write(data)
                    await up_writer.drain()
                    continue
                commands, buffer = _commands(buffer + data)
                target = [i for i, c in enumerate(commands) if self.marker in c]
                first_only = self._armed
                if not target or first_only is None or len(commands) < 2:
                    up_writer.write(b"".join(commands))
                    await up_writer.drain()
                    continue
                sent = commands[:1] if first_only else commands
                self._armed = None
                lost.set_result(len(sent))  # the down side drops these replies, then closes
                up_writer.write(b"".join(sent))
                await up_writer.drain()
                await down
                self.cuts += 1
                return
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            down.cancel()
            for w in (writer, up_writer):
                with contextlib.suppress(OSError):
                    w.close()

    async def _down(
        self,
        up_reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        lost: asyncio.Future[int],
    ) -> None:
        replies = hiredis.Reader()
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await up_reader.read(_CHUNK):
                if not lost.done():
                    writer.write(data)
                    await writer.drain()
                    continue
                replies.feed(data)  # the replies of the cut round trip: read, never sent on
                count = 0
                while replies.gets() is not False:
                    count += 1
                if count >= lost.result():
                    return
