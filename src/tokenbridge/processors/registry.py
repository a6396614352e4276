"""Which processors run: built-in names, entry points and dotted paths, built from settings.

``TOKENBRIDGE_PROCESSORS`` names processors: the built-in ``analytics``, ``logging``, ``cache``
and ``rate_limit`` (each module imported only when named), or a name that an installed package
registers in the entry-point group ``tokenbridge.processors``::

    [project.entry-points."tokenbridge.processors"]
    token_frequency = "my_package.processors:TokenFrequency"

``TOKENBRIDGE_PROCESSORS_EXTRA`` adds dotted paths (``my_package.processors:TokenFrequency``).
Either way the object found is a factory: it is called with one :class:`ProcessorContext` and
returns a :class:`~tokenbridge.processors.stream_processor.Processor`. Mistakes (unknown name,
import error, two processors with one name) raise :class:`ConfigurationError` at startup.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points

from redis.asyncio import Redis

from tokenbridge.exceptions import ConfigurationError
from tokenbridge.processors.base import Processor
from tokenbridge.settings import Settings
from tokenbridge.wire.keys import Keys

__all__ = [
    "BUILTIN_PROCESSORS",
    "ENTRY_POINT_GROUP",
    "ProcessorContext",
    "ProcessorFactory",
    "load_processors",
]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "tokenbridge.processors"


@dataclass(frozen=True, slots=True)
class ProcessorContext:
    """What a processor factory gets: the shared Redis client, key names and settings."""

    redis: Redis
    keys: Keys
    settings: Settings


ProcessorFactory = Callable[[ProcessorContext], "Processor"]
"""Builds a processor; a class whose ``__init__`` takes the context is one."""


def _analytics(context: ProcessorContext) -> Processor:
    from tokenbridge.processors.analytics import AnalyticsProcessor

    return AnalyticsProcessor(context.redis, context.keys, context.settings)


def _logging(context: ProcessorContext) -> Processor:
    from tokenbridge.processors.generation_log import LoggingProcessor

    return LoggingProcessor(context.redis, context.keys, context.settings)


def _cache(context: ProcessorContext) -> Processor:
    from tokenbridge.processors import cache

    response_cache = cache.ResponseCache(context.redis, context.keys, context.settings)
    return cache.CachingProcessor(response_cache)


def _rate_limit(context: ProcessorContext) -> Processor:
    from tokenbridge.processors import rate_limit

    limiter = rate_limit.RateLimiter(context.redis, context.keys, context.settings)
    return rate_limit.RateLimitProcessor(limiter)


BUILTIN_PROCESSORS: dict[str, ProcessorFactory] = {
    "analytics": _analytics,
    "logging": _logging,
    "cache": _cache,
    "rate_limit": _rate_limit,
}
"""Built-in processors by name (``TOKENBRIDGE_PROCESSORS``); each module is imported lazily."""


def _import(path: str, setting: str) -> ProcessorFactory:
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ConfigurationError(
            f"{setting}: {path!r} is not a dotted path; write package.module:factory"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(
            f"{setting}: cannot import {module_name!r} ({exc}). Is it installed, or on PYTHONPATH?"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigurationError(f"{setting}: {module_name!r} has no callable {attr!r}")
    return factory  # type: ignore[no-any-return]


def _by_name(name: str) -> ProcessorFactory:
    builtin = BUILTIN_PROCESSORS.get(name)
    if builtin is not None:
        return builtin
    for point in entry_points(group=ENTRY_POINT_GROUP):
        if point.name == name:
            loaded = point.load()
            return loaded  # type: ignore[no-any-return]
    known = ", ".join(sorted(BUILTIN_PROCESSORS))
    raise ConfigurationError(
        f"TOKENBRIDGE_PROCESSORS: unknown processor {name!r}; built-in: {known} (or a name "
        f"in the entry-point group {ENTRY_POINT_GROUP!r}; dotted paths go in "
        "TOKENBRIDGE_PROCESSORS_EXTRA)"
    )


def load_processors(context: ProcessorContext) -> list[Processor]:
    """The processors that ``context.settings`` switches on, built (no I/O).

    Names come from ``processors`` (built-in or entry points), then dotted paths from
    ``processors_extra``. A built-in whose module is missing is skipped with a warning when
    ``processors`` was left at its default, and is an error when it was set explicitly.
    """
    settings = context.settings
    explicit = "processors" in settings.model_fields_set
    built: list[Processor] = []
    for name in settings.processors:
        factory = _by_name(name)
        try:
            built.append(factory(context))
        except ModuleNotFoundError as exc:
            if explicit or not (exc.name or "").startswith("tokenbridge.processors"):
                raise ConfigurationError(f"TOKENBRIDGE_PROCESSORS: {name!r}: {exc}") from None
            log.warning("processor not available, skipped name=%s error=%s", name, exc)
    for path in settings.processors_extra:
        built.append(_import(path, "TOKENBRIDGE_PROCESSORS_EXTRA")(context))
    names: set[str] = set()
    for processor in built:
        label = getattr(processor, "name", None)
        if not isinstance(label, str) or not callable(getattr(processor, "process", None)):
            raise ConfigurationError(
                f"{processor!r} is not a processor: it needs a `name` and `async def process`"
            )
        if label in names:
            raise ConfigurationError(f"two processors are named {label!r}; names must differ")
        names.add(label)
    return built
