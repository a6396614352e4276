"""ShardSubscriber: sharded pub/sub for one process, one connection per Redis node.

Any number of shard channels (``SSUBSCRIBE``; Redis 7.0+) over a fixed number of connections:
one on standalone Redis, one per primary on a cluster. Subscribes and unsubscribes are queued
and sent in batches (one ``SSUBSCRIBE`` names every queued channel of one slot; on standalone
Redis, every queued channel), so a reconnect storm costs a handful of commands, not one per
session. :meth:`subscribe` returns once Redis confirmed the subscription.

Pub/sub is at most once, so every way of losing messages is turned into a call of
``on_resubscribed(channel)`` once the channel is subscribed again, and the caller re-reads the
stream from what it delivered:

- the connection drops (Redis restarted, a node died, Redis cut a slow subscriber): reconnect
  with backoff, refresh the cluster's slot map, subscribe everything again;
- a slot moves away from the node (resharding, failover): the node sends ``sunsubscribe`` for
  its channels; they are subscribed again where their slot now lives;
- a connection that is TCP-healthy but no longer hears the traffic (it sits on a node that lost
  its slots without telling): every ``probe_s`` an idle connection gets a message published to a
  probe channel of its own, through the command client, which routes by slot like any producer;
  if it does not arrive within ``probe_s``, the connection is dropped and rebuilt.

Reading: redis-py connects (auth, TLS, the handshake), then each connection's transport gets a
protocol of ours (:class:`_ReplyProtocol`) that parses every socket chunk with a
``hiredis.Reader`` of its own and hands each reply to the fan-out synchronously
(:meth:`_Link._reply`), inside the event loop's read callback: no task wake-up at all per
message, instead of redis-py's ``read_response`` (several awaits) per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import deque
from collections.abc import Callable
from typing import Any

import hiredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError

from tokenbridge.store.client import REDIS_DOWN_ERRORS, Backoff, is_cluster

__all__ = ["ShardSubscriber"]

log = logging.getLogger(__name__)

_BATCH = 1000  # channels per SSUBSCRIBE / SUNSUBSCRIBE
_PACE_BYTES = 65536  # dispatched per event loop iteration at most, about (see _ReplyProtocol)


def _pack(command: bytes, channels: list[bytes]) -> bytes:
    parts = [b"*%d\r\n$%d\r\n%b\r\n" % (len(channels) + 1, len(command), command)]
    parts += [b"$%d\r\n%b\r\n" % (len(c), c) for c in channels]
    return b"".join(parts)


class _ReplyProtocol(asyncio.Protocol):
    """Parses a pub/sub connection's bytes and dispatches each reply at once (see
    :meth:`_Link._read`); what else the transport reports (flow control, the end) still goes
    to redis-py's own protocol, so its writer keeps working and closes as usual. ``ended``
    gets the reason reading stopped: the server closed, the connection broke, or a reply
    could not be parsed or handled.

    Pacing: the event loop may read a socket many times in one iteration (libuv: up to 32
    reads), so a burst could queue megabytes of events for every connection before any of
    them is written. After each ``_PACE_BYTES`` dispatched, reading pauses until the next
    iteration: the connections' writes run in between, as when a task read a chunk per
    wake-up. At a live model's pace that is one pause per few hundred tokens."""

    def __init__(
        self,
        inner: Any,
        reply: Callable[[Any], None],
        ended: asyncio.Future[None],
        transport: asyncio.Transport,
    ) -> None:
        self.inner = inner
        self.reply = reply
        self.ended = ended
        self.transport = transport
        self.reader = hiredis.Reader(replyError=ResponseError)
        self.unpaced = 0  # bytes dispatched since reading last paused

    def data_received(self, data: bytes) -> None:
        if self.ended.done():
            return
        reader, reply = self.reader, self.reply
        reader.feed(data)
        try:
            while (item := reader.gets()) is not False:
                reply(item)
        except hiredis.ProtocolError as exc:
            self._end(ConnectionError(f"pub/sub protocol error: {exc}"))
        except Exception as exc:  # as if raised by the reading task: the link reconnects or ends
            self._end(exc)
        self.unpaced += len(data)
        if self.unpaced >= _PACE_BYTES and not self.transport.is_closing():
            self.unpaced = 0
            self.transport.pause_reading()
            asyncio.get_running_loop().call_soon(self._resume)

    def _resume(self) -> None:
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def eof_received(self) -> bool | None:
        self._end(ConnectionError("pub/sub connection closed by the server"))
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(ConnectionError(f"pub/sub connection lost: {exc or 'closed'}"))
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def _end(self, exc: BaseException) -> None:
        if not self.ended.done():
            self.ended.set_exception(exc)


class _Link:
    """One pub/sub connection to one node, and the channels subscribed (or queued) on it."""

    def __init__(self, owner: ShardSubscriber, name: str, make: Callable[[], Any]) -> None:
        self.owner = owner
        self.name = name
        self.make = make
        self.channels: set[bytes] = set()  # subscribed, or queued to be
        self.to_subscribe: dict[bytes, int] = {}  # channel -> slot
        self.to_unsubscribe: set[bytes] = set()
        self.sent: deque[list[bytes]] = deque()  # SSUBSCRIBEs awaiting confirmation
        # Set when nothing is awaiting confirmation: the next SSUBSCRIBE waits for it, so
        # that the channels asked for meanwhile go out together (a storm: few commands).
        self.settled = asyncio.Event()
        self.settled.set()
        self.flush = asyncio.Event()
        # Messages heard (a count, not an Event: no task wake-up per read); a probe in
        # flight waits on ``probe_waiter``, which the next message resolves.
        self.heard = 0
        self.probe_waiter: asyncio.Future[None] | None = None
        self.probe_channel = b""
        self.conn: AbstractConnection | None = None
        self.retired = False

    def add(self, channel: bytes, slot: int) -> None:
        self.channels.add(channel)
        self.to_unsubscribe.discard(channel)
        self.to_subscribe[channel] = slot
        self.flush.set()

    def remove(self, channel: bytes) -> None:
        self.channels.discard(channel)
        self.to_subscribe.pop(channel, None)
        self.to_unsubscribe.add(channel)
        self.flush.set()

    async def run(self) -> None:
        """Connect, subscribe, read; on loss reconnect and subscribe everything again."""
        backoff = Backoff()
        owner = self.owner
        while not self.retired and not owner.stopping.is_set():
            try:
                if self.owner.cluster and not self.channels:
                    return  # everything moved to other nodes
                if self.channels:
                    self.probe_channel = owner.probe_channel_like(next(iter(self.channels)))
                self.conn = self.make()
                await self.conn.connect()
                backoff.reset()
                self.sent.clear()
                self.settled.set()
                self.to_unsubscribe.clear()
                for channel in self.channels:
                    self.to_subscribe[channel] = owner.slot_of(channel)
                self.to_subscribe[self.probe_channel] = owner.slot_of(self.probe_channel)
                self.flush.set()
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._write())
                    group.create_task(self._probe())
                    await self._read()
            except* REDIS_DOWN_ERRORS as group_exc:
                lost: BaseException | None = group_exc.exceptions[0]
            else:
                lost = None
            finally:
                if self.conn is not None:
                    await self.conn.disconnect()
            if lost is None or owner.stopping.is_set() or self.retired:
                return
            owner.stats_reconnects += 1
            delay = backoff.next()
            log.warning("subscriber node=%s lost (%s); again in %.2fs", self.name, lost, delay)
            await asyncio.sleep(delay)
            await owner.refresh_topology()

    async def _write(self) -> None:
        """Send the queued SSUBSCRIBE / SUNSUBSCRIBE commands, batched per slot."""
        assert self.conn is not None
        while True:
            await self.flush.wait()
            await self.settled.wait()
            self.flush.clear()
            if self.to_unsubscribe:
                gone = sorted(self.to_unsubscribe)
                self.to_unsubscribe.clear()
                for group in self.owner.by_slot(gone):
                    await self.conn.send_packed_command(_pack(b"SUNSUBSCRIBE", group), False)
            if self.to_subscribe:
                wanted = list(self.to_subscribe)
                self.to_subscribe.clear()
                self.settled.clear()
                for group in self.owner.by_slot(wanted):
                    self.sent.append(group)
                    await self.conn.send_packed_command(_pack(b"SSUBSCRIBE", group), False)

    async def _read(self) -> None:
        """Hand every reply to :meth:`_reply` as its bytes arrive, until the connection ends.

        Once redis-py has connected, its transport is given a :class:`_ReplyProtocol`, which
        parses each socket chunk and dispatches its replies inside the event loop's read
        callback: no stream buffer, future or task wake-up per chunk."""
        assert self.conn is not None
        writer = getattr(self.conn, "_writer", None)  # redis-py's asyncio.StreamWriter
        stream = getattr(self.conn, "_reader", None)
        transport = getattr(writer, "transport", None)
        if transport is None or not isinstance(stream, asyncio.StreamReader):  # pragma: no cover
            while True:  # redis-py changed: its own reads, one await per reply
                try:
                    self._reply(await self.conn.read_response(timeout=None))
                except ResponseError as exc:
                    self._reply(exc)
        ended = asyncio.get_running_loop().create_future()
        protocol = _ReplyProtocol(transport.get_protocol(), self._reply, ended, transport)
        leftover = bytes(getattr(stream, "_buffer", b""))  # read past the handshake, if any
        transport.set_protocol(protocol)
        if leftover:
            protocol.data_received(leftover)
        try:
            await ended
        finally:
            if not ended.done():
                ended.cancel()

    def _reply(self, reply: Any) -> None:
        owner = self.owner
        if isinstance(reply, ResponseError):  # MOVED: an SSUBSCRIBE went to the wrong node
            group = self.sent.popleft() if self.sent else []
            if not self.sent:
                self.settled.set()
            log.info("subscriber node=%s refused %d channels: %s", self.name, len(group), reply)
            owner.reroute(self, group)
            return
        kind = reply[0]
        if kind == b"smessage":
            self.heard += 1
            waiter = self.probe_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            channel = reply[1]
            if channel == self.probe_channel:
                return
            try:
                owner.on_message(channel, reply[2])
            except Exception:  # one bad message must not end the connection's loop
                log.exception("subscriber dropped a message channel=%r", channel)
                owner.on_resubscribed(channel)  # its session re-reads the stream
        elif kind == b"ssubscribe":
            self._confirmed(reply[1])
        elif kind == b"sunsubscribe":
            channel = reply[1]
            if channel in self.channels or channel == self.probe_channel:
                # Not asked for: the slot left this node. Subscribe where it lives now.
                owner.reroute(self, [channel])

    def _confirmed(self, channel: bytes) -> None:
        if self.sent:
            group = self.sent[0]
            if group and group[-1] == channel:
                self.sent.popleft()
                if not self.sent:
                    self.settled.set()
        if channel in self.channels:
            self.owner.confirmed(channel)

    async def _probe(self) -> None:
        """Every ``probe_s`` of silence, publish to our probe channel through the command
        client; if this connection does not hear it within ``probe_s``, rebuild it."""
        owner = self.owner
        loop = asyncio.get_running_loop()
        while True:
            heard = self.heard
            await asyncio.sleep(owner.probe_s)
            if self.heard != heard:
                continue  # traffic: the connection hears
            waiter = self.probe_waiter = loop.create_future()
            try:
                with contextlib.suppress(*REDIS_DOWN_ERRORS, ResponseError):
                    await owner.redis.execute_command("SPUBLISH", self.probe_channel, b"probe")
                if self.heard == heard:
                    async with asyncio.timeout(owner.probe_s):
                        await waiter
            except TimeoutError:
                owner.stats_probe_failures += 1
                log.warning("subscriber node=%s hears nothing; reconnecting", self.name)
                raise ConnectionError("pub/sub probe not heard") from None
            finally:
                self.probe_waiter = None


class ShardSubscriber:
    """Shard channels of this process over one connection per node; see the module doc."""

    def __init__(
        self,
        redis: Any,
        on_message: Callable[[bytes, bytes], None],
        on_resubscribed: Callable[[bytes], None],
        probe_prefix: str,
        probe_s: float = 5.0,
    ) -> None:
        self.redis = redis
        self.on_message = on_message
        self.on_resubscribed = on_resubscribed
        self.probe_prefix = probe_prefix
        self.probe_s = probe_s
        self.cluster = is_cluster(redis)
        self.stopping = asyncio.Event()
        self.stats_reconnects = 0
        self.stats_probe_failures = 0
        self._links: dict[str, _Link] = {}
        self._link_of: dict[bytes, _Link] = {}
        self._waiters: dict[bytes, asyncio.Future[None]] = {}
        self._ever: set[bytes] = set()  # channels confirmed at least once
        self._group: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = asyncio.Event()

    @property
    def channel_count(self) -> int:
        return len(self._link_of)

    @property
    def connection_count(self) -> int:
        return len(self._links)

    def slot_of(self, channel: bytes) -> int:
        return int(self.redis.keyslot(channel)) if self.cluster else 0

    def by_slot(self, channels: list[bytes]) -> list[list[bytes]]:
        """Groups that one SSUBSCRIBE may name: one slot each on a cluster, chunks otherwise."""
        if not self.cluster:
            return [channels[i : i + _BATCH] for i in range(0, len(channels), _BATCH)]
        groups: dict[int, list[bytes]] = {}
        for channel in channels:
            groups.setdefault(self.slot_of(channel), []).append(channel)
        return list(groups.values())

    def _node_for(self, channel: bytes) -> tuple[str, Callable[[], Any]]:
        if not self.cluster:
            pool = self.redis.connection_pool
            kwargs = {**pool.connection_kwargs, "protocol": 2, "socket_timeout": None}
            return "standalone", lambda: pool.connection_class(**kwargs)
        node = self.redis.nodes_manager.get_node_from_slot(self.slot_of(channel))
        kwargs = {
            **node.connection_kwargs,
            "host": node.host,
            "port": node.port,
            "protocol": 2,
            "socket_timeout": None,
        }
        return node.name, lambda: node.connection_class(**kwargs)

    def _link_for(self, channel: bytes) -> _Link:
        name, make = self._node_for(channel)
        link = self._links.get(name)
        if link is None or link.retired:
            link = _Link(self, name, make)
            link.probe_channel = self.probe_channel_like(channel)
            self._links[name] = link
            assert self._group is not None, "ShardSubscriber.run() is not running"
            task = self._group.create_task(self._run_link(link))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return link

    def probe_channel_like(self, channel: bytes) -> bytes:
        """A probe channel in the same slot as ``channel`` (so on the same node)."""
        start = channel.find(b"{")
        end = channel.find(b"}", start + 1)
        tag = channel[start : end + 1] if start >= 0 and end > start + 1 else b"{probe}"
        suffix = f":{secrets.token_hex(4)}".encode()
        return f"{self.probe_prefix}:probe:".encode() + tag + suffix

    async def _run_link(self, link: _Link) -> None:
        try:
            await link.run()
        finally:
            if self._links.get(link.name) is link:
                del self._links[link.name]
            left = [c for c in link.channels if self._link_of.get(c) is link]
            if left and not self.stopping.is_set():
                self.reroute(link, left)  # added while it was ending: not stranded

    async def subscribe(self, channel: bytes) -> None:
        """Subscribe ``channel`` (queued, batched); returns once Redis confirmed it."""
        await self._started.wait()
        waiter = self._waiters.get(channel)
        if waiter is None:
            if channel in self._link_of:
                return  # already subscribed
            waiter = asyncio.get_running_loop().create_future()
            self._waiters[channel] = waiter
            link = self._link_for(channel)
            self._link_of[channel] = link
            link.add(channel, self.slot_of(channel))
        await asyncio.shield(waiter)

    def unsubscribe(self, channel: bytes) -> None:
        """Drop ``channel`` (queued, batched with others)."""
        link = self._link_of.pop(channel, None)
        self._ever.discard(channel)
        waiter = self._waiters.pop(channel, None)
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionError("unsubscribed before confirmed"))
        if link is not None:
            link.remove(channel)

    def confirmed(self, channel: bytes) -> None:
        waiter = self._waiters.pop(channel, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if channel in self._ever:
            self.on_resubscribed(channel)
        self._ever.add(channel)

    def reroute(self, link: _Link, channels: list[bytes]) -> None:
        """Subscribe ``channels`` again wherever their slot lives now (after a topology
        refresh); each is then reported to ``on_resubscribed`` (messages may be lost)."""
        for channel in channels:
            link.channels.discard(channel)
        self._ever.update(c for c in channels if c in self._link_of)
        assert self._group is not None
        task = self._group.create_task(self._reroute(channels))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reroute(self, channels: list[bytes]) -> None:
        await asyncio.sleep(0.05)  # the cluster's nodes learn a move a moment apart
        await self.refresh_topology()
        for channel in channels:
            if channel not in self._link_of:
                continue  # unsubscribed meanwhile (probe channels are re-added by their link)
            link = self._link_for(channel)
            self._link_of[channel] = link
            link.add(channel, self.slot_of(channel))

    async def refresh_topology(self) -> None:
        """Reload the cluster's slot map (a no-op on standalone Redis)."""
        if not self.cluster:
            return
        with contextlib.suppress(*REDIS_DOWN_ERRORS, ResponseError):
            await self.redis.nodes_manager.initialize()
        # Channels whose slot now lives on another node move there.
        for channel, link in list(self._link_of.items()):
            name, _ = self._node_for(channel)
            if name != link.name:
                link.channels.discard(channel)
                link.to_subscribe.pop(channel, None)
                self._ever.add(channel)
                moved = self._link_for(channel)
                self._link_of[channel] = moved
                moved.add(channel, self.slot_of(channel))
        for link in list(self._links.values()):
            if not link.channels and not link.to_subscribe:
                link.retired = True
                if link.conn is not None:
                    await link.conn.disconnect()

    async def run(self) -> None:
        """Run every node's connection until :meth:`stop`; they are cancelled and awaited."""
        async with asyncio.TaskGroup() as group:
            self._group = group
            if self.cluster:
                await self.redis.initialize()
            self._started.set()
            await self.stopping.wait()
            for link in self._links.values():
                link.retired = True
            for task in list(self._tasks):
                task.cancel()
            for waiter in self._waiters.values():
                if not waiter.done():
                    waiter.set_exception(ConnectionError("subscriber stopped"))
            self._waiters.clear()

    def stop(self) -> None:
        self.stopping.set()
