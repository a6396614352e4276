"""Garbage-collector settings for a long-running server process (``tokenbridge serve``).

CPython's defaults collect the youngest generation every 700 allocations, and the whole heap
each time it grew by a quarter. A gateway holds ~100 objects per open connection, so while
thousands of clients (re)connect at once the heap grows fast and full collections come one
after another, each walking every connection's objects: measured on the reconnect storm
(``python -m benchmarks --scenarios storm --clients 5000``), 11 full collections took 2.0 s of
the gateway's CPU, each pausing the event loop 100-370 ms. Collecting the young generation
every 20,000 allocations instead keeps pauses short (a few ms) and made the storm's
collections cost 0.05-0.3 s in all; :func:`gc.freeze` first moves what start-up created
(modules, classes, functions: never garbage) out of every later collection.

Cycles are still collected (the thresholds only space the collections out), so memory stays
bounded. Tests and library users are left alone: only the CLI's server calls this.
"""

from __future__ import annotations

import gc

__all__ = ["YOUNG_THRESHOLD", "tune_gc"]

YOUNG_THRESHOLD = 20_000
"""Allocations (net of frees) between two collections of the youngest generation."""


def tune_gc() -> None:
    """Freeze what exists now and space collections out; call once, after start-up imports."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, 10, 10)
