"""Hand-packed Redis commands for the two hot paths: producer XADD batches and fan-out XREADs.

redis-py packs every argument of every command in Python; at tens of thousands of tokens per
second that is most of a producer's CPU. Here the constant parts of a command are encoded once
and a batch goes out in one write (``Connection.send_packed_command``), its replies read back
with ``Connection.read_response``: redis-py's public connection API, with its parser (hiredis)
and its reconnect logic. On any error the connection is disconnected before it returns to the
pool, so a half-read reply never leaks into another command.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection

__all__ = ["arg", "checkout", "pack", "read_replies"]


def arg(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


def pack(*args: bytes) -> bytes:
    """One command as RESP bytes."""
    return b"*%d\r\n%b" % (len(args), b"".join(arg(a) for a in args))


async def read_replies(conn: AbstractConnection, n: int) -> list[Any]:
    """Read ``n`` replies; an error reply raises after all ``n`` were read (stream stays sane)."""
    replies: list[Any] = []
    error: Exception | None = None
    for _ in range(n):
        try:
            replies.append(await conn.read_response(disconnect_on_error=True))
        except Exception as exc:
            if not _is_reply_error(exc):
                raise
            error = error or exc
            replies.append(exc)
    if error is not None:
        raise error
    return replies


def _is_reply_error(exc: Exception) -> bool:
    from redis.exceptions import ResponseError

    return isinstance(exc, ResponseError)


@asynccontextmanager
async def checkout(redis: Redis) -> AsyncIterator[AbstractConnection]:
    """A connection of ``redis``'s pool for raw commands; disconnected if anything fails."""
    pool = redis.connection_pool
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        yield conn
    except BaseException:
        await conn.disconnect()
        raise
    finally:
        await pool.release(conn)
