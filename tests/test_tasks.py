"""stop_within (tasks.py): owners stop their tasks with a grace period, then cancel the rest."""

from __future__ import annotations

import asyncio

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
