"""A pytest plugin: a socket, transport or stream writer left to the garbage collector is
reported with where it was created.

Such an object's ResourceWarning is raised (``filterwarnings = error``) inside whichever test
the collector happens to run in, far from the code that leaked it. tracemalloc would say where
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
import types
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


@pytest.hookimpl(trylast=True)  # after pytest's own hook is installed, to wrap it
def pytest_configure(config: pytest.Config) -> None:
    reporting = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        origin = _origins.get(id(unraisable.object))
        if origin is not None and isinstance(unraisable.exc_value, ResourceWarning):
            where = "".join(traceback.format_list(origin))
            unraisable = types.SimpleNamespace(
                exc_type=unraisable.exc_type,
                exc_value=unraisable.exc_value,
                exc_traceback=unraisable.exc_traceback,
                object=unraisable.object,
                err_msg=f"Leaked, created at:\n{where}Exception ignored in",
            )
        reporting(unraisable)

    sys.unraisablehook = hook
