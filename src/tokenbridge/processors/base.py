"""The processor plug-in interface: what a pipeline processor implements.

A processor is any object with a ``name`` and an ``async def process(batch, entry_id)``;
switch it on by name (``TOKENBRIDGE_PROCESSORS``), by dotted path, or through the
``tokenbridge.processors`` entry point group (``processors/registry.py``). Its factory gets a
:class:`~tokenbridge.processors.registry.ProcessorContext`. Everything a processor sees is a
:class:`~tokenbridge.wire.pipeline.PipelineBatch` (docs/wire-format.md, "Pipeline entries").
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from tokenbridge.wire.pipeline import PipelineBatch

__all__ = ["PipelineBatch", "Processor"]


@runtime_checkable
class Processor(Protocol):
    """What StreamProcessor runs for each pipeline entry.

    ``process`` is called once per delivery of an entry (after the processors listed before
    it), concurrently with other entries (up to ``processors_concurrency`` per shard), in any
    order: the entries of one generation may arrive out of order, and again after a crash.
    Make its effects idempotent (see :attr:`PipelineBatch.once_key`). Raising counts as a
    failure of this processor for this entry only. An optional ``async def aclose()`` is
    awaited when the StreamProcessor closes; an optional ``async def process_many(items)``
    (``items``: a list of ``(batch, entry_id)``) handles a group of entries at once and
    returns, per item, its exception or None.
    """

    name: str

    async def process(self, batch: PipelineBatch, entry_id: str) -> None: ...
