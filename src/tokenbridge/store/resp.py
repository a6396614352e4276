"""Hand-packed Redis commands for the two hot paths: producer XADD batches and fan-out XREADs.

The only place that writes RESP bytes: ``wire/`` hands over field lists, and the producer and
the fan-out use the templates below (:class:`XaddTemplate`, :class:`XreadCommand`).

redis-py packs every argument of every command in Python; at tens of thousands of tokens per
second that is most of a producer's CPU. Here the constant parts of a command are encoded once
and a batch goes out in one write (``Connection.send_packed_command``), its replies read back
with ``Connection.read_response``: redis-py's public connection API, with its parser (hiredis)
and its reconnect logic. On any error the connection is disconnected before it returns to the
pool, so a half-read reply never leaks into another command.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection

__all__ = [
    "XaddTemplate",
    "XreadCommand",
    "arg",
    "checkout",
    "pack",
    "pack_xadd",
    "read_replies",
    "round_trip",
    "send_one",
]


def arg(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


def pack(*args: bytes) -> bytes:
    """One command as RESP bytes."""
    return b"*%d\r\n%b" % (len(args), b"".join(arg(a) for a in args))


def pack_xadd(key: bytes, max_len: int, fields: Sequence[tuple[bytes, bytes]]) -> bytes:
    """``XADD <key> MAXLEN ~ <max_len> * <field> <value> ...`` as RESP bytes."""
    flat = [value for pair in fields for value in pair]
    return pack(b"XADD", key, b"MAXLEN", b"~", b"%d" % max_len, b"*", *flat)


class XaddTemplate:
    """An XADD whose key, trim and leading fields are fixed, packed once; :meth:`pack` adds
    the values of the fields named ``names`` (the per-token path: seq, ts, text)."""

    __slots__ = ("_head", "_names")

    def __init__(
        self,
        key: bytes,
        max_len: int,
        constant: Sequence[tuple[bytes, bytes]],
        names: Sequence[bytes],
    ) -> None:
        head = [b"XADD", key, b"MAXLEN", b"~", b"%d" % max_len, b"*"]
        head += [value for pair in constant for value in pair]
        count = len(head) + 2 * len(names)
        self._head = b"*%d\r\n%b" % (count, b"".join(arg(a) for a in head))
        self._names = [arg(name) for name in names]

    def pack(self, *values: bytes) -> bytes:
        """The command with these values, in the order of ``names``."""
        return self._head + b"".join(
            [name + arg(value) for name, value in zip(self._names, values, strict=True)]
        )


class XreadCommand:
    """``XREAD COUNT <n> BLOCK <ms> STREAMS <keys> <ids>``: the head packed once, each key
    packed once by its owner (:meth:`key`), only the cursors packed per read."""

    __slots__ = ("_head",)

    def __init__(self, count: int, block_ms: int) -> None:
        self._head = b"".join(
            arg(a) for a in (b"XREAD", b"COUNT", b"%d" % count, b"BLOCK", b"%d" % block_ms)
        ) + arg(b"STREAMS")

    @staticmethod
    def key(key: str) -> bytes:
        """A stream key, packed for :meth:`pack` (keep it: it is reused every read)."""
        return arg(key.encode())

    def pack(self, keys: Sequence[bytes], cursors: Sequence[str]) -> bytes:
        """The command over ``keys`` (from :meth:`key`) after these entry ids."""
        ids = b"".join([arg(cursor.encode()) for cursor in cursors])
        return b"*%d\r\n%b%b%b" % (6 + 2 * len(keys), self._head, b"".join(keys), ids)


async def round_trip(redis: Redis, commands: Sequence[bytes]) -> list[Any]:
    """Send packed ``commands`` at once on a pooled connection and read their replies."""
    async with checkout(redis) as conn:
        await conn.send_packed_command(b"".join(commands), check_health=False)
        return await read_replies(conn, len(commands))


async def send_one(conn: AbstractConnection, command: bytes) -> Any:
    """Send one packed command on ``conn`` (a dedicated connection) and read its reply."""
    await conn.send_packed_command(command, check_health=False)
    return await conn.read_response()


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
