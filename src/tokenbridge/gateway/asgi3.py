"""ASGI entry points that return the request's coroutine instead of awaiting it.

An ``async def __call__`` that only picks and awaits another coroutine stays suspended, one
frame (~250 bytes), for as long as the request runs: for an open stream, its whole life. A
plain ``__call__`` that returns that coroutine holds nothing. ASGI servers that tell ASGI 3
from ASGI 2 by inspection (uvicorn's ``interface="auto"``) expect a coroutine function,
hence :func:`coroutine_returning`.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any, TypeVar, cast

__all__ = ["coroutine_returning"]

_F = TypeVar("_F", bound=Callable[..., Any])


def coroutine_returning(func: _F) -> _F:
    """Mark ``func`` (a plain function that returns a coroutine) as a coroutine function."""
    mark = getattr(inspect, "markcoroutinefunction", None)  # Python 3.12+
    if mark is not None:
        return cast(_F, mark(func))
    func._is_coroutine = asyncio.coroutines._is_coroutine  # type: ignore[attr-defined]
    return func
