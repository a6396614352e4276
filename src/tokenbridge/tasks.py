"""Stopping owned tasks: a grace period to return by themselves, then cancellation.

Every owner of background tasks (the runtime, the gateway's fan-out, the consumer service)
stops them the same way: ask them to stop (their own ``stop()``), wait a bounded time, cancel
what is left and wait for that too, so that no task outlives its owner.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Any

__all__ = ["stop_within"]


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
