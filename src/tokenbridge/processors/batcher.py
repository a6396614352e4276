"""Batcher: groups what concurrent callers submit, so one call handles a group.

The StreamProcessor's handlers (one task per pipeline entry) each :meth:`Batcher.submit` their
entry and wait; one loop takes whatever was submitted while the previous group was being
handled (at most ``max_items``) and hands it to ``handle`` at once: the producer's batching,
on the reading side. Under load a group is as large as the entries in flight, so a processor
with ``process_many`` sends a group's commands in one Redis round trip; idle, a group is one
entry and nothing waits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from tokenbridge.store.client import REDIS_DOWN_ERRORS, is_cluster
from tokenbridge.wire.pipeline import PipelineBatch

__all__ = ["Batcher", "follow_up_each", "process_one", "run_script_group"]

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """``submit(item)`` returns ``handle``'s result for that item; :meth:`run` handles groups."""

    def __init__(self, handle: Callable[[list[T]], Awaitable[list[R]]], max_items: int) -> None:
        self.handle = handle
        self.max_items = max_items
        self.groups = 0
        self.items = 0
        self._queued: list[tuple[T, asyncio.Future[R]]] = []
        self._wake = asyncio.Event()

    def __repr__(self) -> str:
        return f"<Batcher groups={self.groups} items={self.items} queued={len(self._queued)}>"

    async def submit(self, item: T) -> R:
        """Queue ``item`` and wait for its result (bounded: callers are the handler tasks)."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queued.append((item, future))
        self._wake.set()
        return await future

    async def run(self) -> None:
        """Handle groups until cancelled; an error of ``handle`` goes to the group's callers."""
        while True:
            await self._wake.wait()
            group, self._queued = self._queued[: self.max_items], self._queued[self.max_items :]
            if not self._queued:
                self._wake.clear()
            group = [(item, future) for item, future in group if not future.done()]
            if not group:
                continue
            self.groups += 1
            self.items += len(group)
            try:
                results = await self.handle([item for item, _ in group])
            except asyncio.CancelledError:
                for _, future in group + self._queued:  # their callers are being cancelled too
                    future.cancel()
                raise
            except Exception as exc:
                for _, future in group:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(group, results, strict=True):
                if not future.done():  # its caller was cancelled meanwhile
                    future.set_result(result)


ScriptCall = tuple[Sequence[Any], Sequence[Any]]  # (keys, args) of one script call


async def run_script_group(redis: Redis, script: AsyncScript, calls: list[ScriptCall]) -> list[Any]:
    """Run ``script`` once per call, all in one round trip (a pipeline) when there are several.

    Returns each call's reply, or its error (a Lua error of one call fails that call only). A
    connection error raises: then no reply is known.
    """
    if len(calls) == 1:  # a pipeline costs more than it saves for one command
        keys, args = calls[0]
        return [await script(keys=keys, args=args)]
    if is_cluster(redis):  # redis-py refuses scripts in cluster pipelines: send them at once
        return await _each(script, calls)
    async with redis.pipeline(transaction=False) as pipe:
        for keys, args in calls:
            await script(keys=keys, args=args, client=pipe)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
    return replies


async def _each(script: AsyncScript, calls: list[ScriptCall]) -> list[Any]:
    """One call per script run, concurrently; each call's reply or error (a connection error
    raises, as a pipeline's would)."""

    async def one(keys: Sequence[Any], args: Sequence[Any]) -> Any:
        try:
            return await script(keys=keys, args=args)
        except REDIS_DOWN_ERRORS:
            raise
        except Exception as exc:
            return exc

    return list(await asyncio.gather(*(one(keys, args) for keys, args in calls)))


ProcessMany = Callable[[Sequence[tuple[PipelineBatch, str]]], Awaitable[list[Exception | None]]]
"""A processor's ``process_many``: per ``(batch, entry_id)``, its exception or None."""


async def process_one(process_many: ProcessMany, batch: PipelineBatch, entry_id: str) -> None:
    """A processor's ``process`` through its ``process_many``: a group of one, its error raised."""
    [error] = await process_many([(batch, entry_id)])
    if error is not None:
        raise error


async def follow_up_each(
    items: Sequence[tuple[PipelineBatch, str]],
    replies: list[Any],
    follow_up: Callable[[PipelineBatch, Any], Awaitable[None]],
) -> list[Exception | None]:
    """Each item's outcome after its script: its error, or ``follow_up(batch, reply)`` run when
    the reply is truthy (the step that completes a generation). Redis down raises: nothing is
    known then, and the whole group stays pending."""
    outcomes: list[Exception | None] = []
    for (batch, _), reply in zip(items, replies, strict=True):
        if isinstance(reply, Exception):
            outcomes.append(reply)
            continue
        if reply:
            try:
                await follow_up(batch, reply)
            except REDIS_DOWN_ERRORS:
                raise
            except Exception as exc:
                outcomes.append(exc)
                continue
        outcomes.append(None)
    return outcomes
