"""WakeClock: one timer per event loop for every parked connection's deadline.

A connection's task waits for its next events with a deadline (the next heartbeat, the idle
timeout). A ``loop.call_later`` per wait costs about 500 bytes while it is pending (the handle
and uvloop's timer), held by every idle connection for as long as it idles; here a deadline is
one heap entry (~90 bytes) and the loop holds one timer, for the earliest.

A waiter woken early (events came) leaves its entry behind until its deadline passes; the heap
is rebuilt without such entries once they outnumber the live ones, so it stays within about
twice the number of parked connections.

:func:`call_later` is the same for a callback (a WebSocket's keep-alive ping): a
:class:`ClockCall` of ~50 bytes instead of uvloop's timer handle.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import weakref
from collections.abc import Callable

__all__ = ["ClockCall", "call_later", "wake_at"]

log = logging.getLogger(__name__)

_Entry = tuple[float, int, "asyncio.Future[None] | ClockCall"]

_clocks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _WakeClock] = (
    weakref.WeakKeyDictionary()
)


class _WakeClock:
    __slots__ = ("__weakref__", "_counter", "_heap", "_limit", "_loop", "_next_at", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[_Entry] = []
        self._counter = itertools.count()  # ties: futures do not compare
        self._timer: asyncio.TimerHandle | None = None
        self._next_at = math.inf
        self._limit = 64  # rebuild when the heap grows past it: amortized O(1) per add

    def add(self, when: float, waiter: asyncio.Future[None] | ClockCall) -> None:
        heap = self._heap
        heapq.heappush(heap, (when, next(self._counter), waiter))
        if len(heap) > self._limit:
            self._heap = heap = [e for e in heap if not e[2].done()]
            heapq.heapify(heap)
            self._limit = max(64, 2 * len(heap))
        if when < self._next_at:
            self._arm(when)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._next_at = when
        self._timer = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._next_at = math.inf
        heap = self._heap
        now = self._loop.time()
        while heap and heap[0][0] <= now:
            waiter = heapq.heappop(heap)[2]
            if not waiter.done():
                waiter.set_result(None)
        if heap:
            self._arm(heap[0][0])


def wake_at(loop: asyncio.AbstractEventLoop, delay_s: float, waiter: asyncio.Future[None]) -> None:
    """Resolve ``waiter`` (if still pending) ``delay_s`` from now on ``loop``'s clock."""
    _clock(loop).add(loop.time() + delay_s, waiter)


class ClockCall:
    """A callback due at some time on a loop's clock (what :func:`call_later` returns); it
    answers the clock as a future would (``done``, ``set_result``)."""

    __slots__ = ("_callback",)

    def __init__(self, callback: Callable[[], object]) -> None:
        self._callback: Callable[[], object] | None = callback

    def done(self) -> bool:
        return self._callback is None

    def cancel(self) -> None:
        self._callback = None

    def set_result(self, _: None) -> None:
        callback, self._callback = self._callback, None
        if callback is None:
            return
        try:  # the clock's other entries must still fire
            callback()
        except Exception:
            log.exception("clock callback %r failed", callback)


def call_later(
    loop: asyncio.AbstractEventLoop, delay_s: float, callback: Callable[[], object]
) -> ClockCall:
    """Call ``callback`` ``delay_s`` from now on ``loop`` (unless cancelled first)."""
    call = ClockCall(callback)
    _clock(loop).add(loop.time() + delay_s, call)
    return call


def _clock(loop: asyncio.AbstractEventLoop) -> _WakeClock:
    clock = _clocks.get(loop)
    if clock is None:
        clock = _clocks[loop] = _WakeClock(loop)
    return clock
