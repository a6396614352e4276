"""tasks.py: owners stop their tasks with a grace period, then cancel the rest (stop_within);
periodic duties survive a failing round (run_every)."""

from __future__ import annotations

import asyncio
import contextlib

from tokenbridge.tasks import stop_within


async def test_a_task_that_returns_in_time_is_not_cancelled_and_one_that_hangs_is() -> None:
    stop = asyncio.Event()

    async def obedient() -> str:
        await stop.wait()
        return "done"

    async def stuck() -> None:
        await asyncio.Event().wait()  # ignores every stop request

    polite, hung = asyncio.create_task(obedient()), asyncio.create_task(stuck())
    stop.set()
    late = await stop_within([polite, hung], grace_s=0.2)
    assert late == [hung]
    assert hung.cancelled()
    assert polite.result() == "done"


async def test_no_tasks_is_nothing_to_wait_for() -> None:
    assert await stop_within([], grace_s=3600) == []


async def test_run_every_goes_on_after_a_failing_step() -> None:
    """A periodic duty that fails (Redis down, or any other error) waits for the next round:
    the loop, and the task group it runs in, go on."""
    import logging

    from redis.exceptions import ConnectionError as RedisConnectionError

    from tokenbridge.tasks import run_every

    calls = 0
    third = asyncio.Event()

    async def step() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RedisConnectionError("down")
        if calls == 2:
            raise ValueError("a bug in one round")
        third.set()

    task = asyncio.create_task(run_every(0.001, step, "test duty", logging.getLogger("t")))
    await asyncio.wait_for(third.wait(), 10)
    assert not task.done()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
