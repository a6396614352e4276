"""Stopping owned tasks: a grace period to return by themselves, then cancellation.

Every owner of background tasks (the runtime, the gateway's fan-out, the consumer service)
stops them the same way: ask them to stop (their own ``stop()``), wait a bounded time, cancel
what is left and wait for that too, so that no task outlives its owner.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from tokenbridge.store.client import REDIS_DOWN_ERRORS

__all__ = ["run_every", "stop_within"]


async def stop_within(
    tasks: Collection[asyncio.Task[Any]], grace_s: float
) -> list[asyncio.Task[Any]]:
    """Wait up to ``grace_s`` for ``tasks`` to end, cancel the rest and wait for them.

    Returns the tasks that had to be cancelled (for the caller to log). Never raises the
    tasks' errors: read them from the tasks.
    """
    if not tasks:
        return []
    _, pending = await asyncio.wait(tasks, timeout=grace_s)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)
    return list(pending)


async def run_every(
    interval_s: float,
    step: Callable[[], Awaitable[object]],
    what: str,
    log: logging.Logger,
) -> None:
    """Await ``step()`` every ``interval_s`` until cancelled: a periodic duty (a sweep, a
    check) whose failure waits for the next round. Redis being down is logged at debug; any
    other error is logged as a warning and never ends the loop, nor the task group it runs in.
    """
    while True:
        await asyncio.sleep(interval_s)  # a timer: the duty is periodic by nature
        try:
            await step()
        except REDIS_DOWN_ERRORS as exc:
            log.debug("%s skipped (%s)", what, exc)
        except Exception as exc:
            log.warning("%s failed (%r); retrying next time", what, exc)
