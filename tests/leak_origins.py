"""A pytest plugin: a socket, transport, stream writer or redis-py connection left to the
garbage collector is reported, with where it was created, in the run's summary.

Such an object's ResourceWarning surfaces inside whichever test the collector happens to run
in, far from the code that leaked it: failing that test (``filterwarnings = error``) fails an
innocent one at random. So these leaks do not fail a test; they are listed at the end of the
run, each with its origin, for whoever reads the summary to fix. tracemalloc would say where
it came from, but slows the whole suite down several times (and with it, every timing). This
records a short stack at the creation of each socket, selector transport and StreamWriter
(about 30 µs each), and puts it in the failure message of the test that sees the leak.
"""

from __future__ import annotations

import asyncio.selector_events
import asyncio.streams
import socket
import sys
import traceback
from collections import OrderedDict
from typing import Any

import pytest

_MAX_RECORDED = 50_000  # ids of objects long gone are forgotten, oldest first
_origins: OrderedDict[int, traceback.StackSummary] = OrderedDict()


def _record(obj: object) -> None:
    _origins[id(obj)] = traceback.extract_stack(limit=14)[:-2]
    _origins.move_to_end(id(obj))
    if len(_origins) > _MAX_RECORDED:
        _origins.popitem(last=False)


def _recording(cls: type) -> None:
    original = cls.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        _record(self)

    cls.__init__ = __init__  # type: ignore[misc]


for _cls in (
    socket.socket,
    asyncio.selector_events._SelectorTransport,
    asyncio.streams.StreamWriter,
):
    _recording(_cls)


_leaks: list[str] = []
_MAX_REPORTED = 20


def _is_leak(unraisable: Any) -> bool:
    """A ResourceWarning raised in a finalizer: an unclosed socket, transport, event loop or
    connection found by the collector (its origin is recorded for the first three kinds)."""
    return isinstance(unraisable.exc_value, ResourceWarning)


@pytest.hookimpl(trylast=True)  # after pytest's own hook is installed, to wrap it
def pytest_configure(config: pytest.Config) -> None:
    reporting = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not _is_leak(unraisable):
            reporting(unraisable)
            return
        origin = _origins.get(id(unraisable.object))
        where = "".join(traceback.format_list(origin)) if origin else "  (origin not recorded)\n"
        if len(_leaks) < _MAX_REPORTED:
            _leaks.append(f"{unraisable.exc_value}\ncreated at:\n{where}")

    sys.unraisablehook = hook


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _leaks:
        terminalreporter.section("resources left to the garbage collector (not failures)")
        for leak in _leaks:
            terminalreporter.write_line(leak)
