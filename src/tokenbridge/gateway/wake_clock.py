"""WakeClock: one timer per event loop for every parked connection's deadline.

A connection's task waits for its next events with a deadline (the next heartbeat, the idle
timeout). A ``loop.call_later`` per wait costs about 500 bytes while it is pending (the handle
and uvloop's timer), held by every idle connection for as long as it idles; here a deadline is
one heap entry (~90 bytes) and the loop holds one timer, for the earliest.

A waiter woken early (events came) leaves its entry behind until its deadline passes; the heap
is rebuilt without such entries once they outnumber the live ones, so it stays within about
twice the number of parked connections.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import weakref

__all__ = ["wake_at"]

_Entry = tuple[float, int, "asyncio.Future[None]"]

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

    def add(self, when: float, waiter: asyncio.Future[None]) -> None:
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
    clock = _clocks.get(loop)
    if clock is None:
        clock = _clocks[loop] = _WakeClock(loop)
    clock.add(loop.time() + delay_s, waiter)
