"""Prometheus metrics: this process's figures, read at scrape time from the live objects.

One custom collector (``TokenBridgeCollector``) on a private registry turns the counters that
``/v1/status`` shows into Prometheus families, so nothing is counted twice and no hot path pays
for metrics: the fan-out, connection and consumer counters are plain integers already.
Served at ``GET /metrics`` (text exposition format; an API key is needed, like ``/v1/status``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from tokenbridge.consumers.stream_consumer_service import StreamConsumerService
    from tokenbridge.gateway.connection_manager import ConnectionManager

__all__ = ["CONTENT_TYPE", "TokenBridgeCollector", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class WorkerCounts(Protocol):
    """What the metrics read of this process's generation worker."""

    generations_done: int
    generations_abandoned: int


class TokenBridgeCollector(Collector):
    """Reads the connection manager's, the fan-out's and the consumers' counters per scrape."""

    def __init__(
        self,
        connections: ConnectionManager,
        fanout_stats: object | None,
        consumers: StreamConsumerService,
        worker: WorkerCounts | None = None,
        models: Mapping[str, object] | None = None,
        trimmer: object | None = None,
    ) -> None:
        self.connections = connections
        self.fanout_stats = fanout_stats
        self.consumers = consumers
        self.worker = worker
        self.models = models or {}
        self.trimmer = trimmer  # the processors' PipelineTrimmer, where they run

    def collect(self) -> Iterator[Any]:
        yield from self._connections()
        yield from self._fanout()
        yield from self._consumers()
        yield from self._providers()
        yield from self._worker()
        yield from self._pipeline()

    def _worker(self) -> Iterator[Any]:
        worker = self.worker
        if worker is None:
            return
        yield CounterMetricFamily(
            "tokenbridge_generations_done", "Generations this process's worker ran to an end",
            value=worker.generations_done,
        )  # fmt: skip
        yield CounterMetricFamily(
            "tokenbridge_generations_abandoned",
            "Generations cancelled because no client read them for orphan_grace_s",
            value=worker.generations_abandoned,
        )  # fmt: skip

    def _connections(self) -> Iterator[Any]:
        stats = self.connections.stats()
        open_ = GaugeMetricFamily(
            "tokenbridge_connections", "Open client connections", labels=["transport"]
        )
        for transport, count in stats["by_transport"].items():
            open_.add_metric([transport], count)
        yield open_
        yield GaugeMetricFamily("tokenbridge_sessions", "Sessions with a connection here",
                                value=stats["sessions"])  # fmt: skip
        yield CounterMetricFamily("tokenbridge_events_sent", "Events written to clients",
                                  value=stats["events_sent"])  # fmt: skip
        yield CounterMetricFamily("tokenbridge_bytes_sent", "Bytes written to clients",
                                  value=stats["bytes_sent"])  # fmt: skip
        closed = CounterMetricFamily(
            "tokenbridge_connections_closed", "Connections closed, by reason", labels=["reason"]
        )
        for reason, count in stats["closed"].items():
            closed.add_metric([reason], count)
        yield closed
        yield CounterMetricFamily(
            "tokenbridge_slow_client_closed", "Clients cut because their buffer was full",
            value=stats["closed"].get("slow_client", 0),
        )  # fmt: skip

    def _fanout(self) -> Iterator[Any]:
        if self.fanout_stats is None:
            return
        for name, value in vars(self.fanout_stats).items():
            yield CounterMetricFamily(
                f"tokenbridge_fanout_{name}", f"Fan-out readers: entries/batches {name}",
                value=value,
            )  # fmt: skip

    def _consumers(self) -> Iterator[Any]:
        rows = self.consumers.status()
        for field in ("read", "acked", "failed", "reclaimed", "dead_lettered", "trimmed"):
            family = CounterMetricFamily(
                f"tokenbridge_consumer_{field}", f"Stream consumer entries {field}",
                labels=["stream", "group", "consumer"],
            )  # fmt: skip
            for row in rows:
                family.add_metric([row["stream"], row["group"], row["consumer"]], row[field])
            yield family
        inflight = GaugeMetricFamily(
            "tokenbridge_consumer_inflight", "Entries being handled",
            labels=["stream", "group", "consumer"],
        )  # fmt: skip
        for row in rows:
            inflight.add_metric([row["stream"], row["group"], row["consumer"]], row["inflight"])
        yield inflight

    def _providers(self) -> Iterator[Any]:
        """Retries, fallbacks and failures of model calls (producer/models/retry.py)."""
        labels = ["model"]
        retries = CounterMetricFamily(
            "tokenbridge_provider_retries",
            "Model calls retried before their first token",
            labels=labels,
        )
        fallbacks = CounterMetricFamily(
            "tokenbridge_provider_fallbacks", "Generations moved to a fallback model", labels=labels
        )
        failures = CounterMetricFamily("tokenbridge_provider_failures",
                                       "Generations ended by a provider error",
                                       labels=["model", "code"])  # fmt: skip
        for name, model in self.models.items():
            stats = getattr(model, "stats", None)
            if stats is None:
                continue
            retries.add_metric([name], stats.retried)
            fallbacks.add_metric([name], stats.fell_back)
            for code, count in stats.failed.items():
                failures.add_metric([name, code], count)
        yield from (retries, fallbacks, failures)

    def _pipeline(self) -> Iterator[Any]:
        trimmer: Any = self.trimmer
        if trimmer is None:
            return
        yield CounterMetricFamily(
            "tokenbridge_pipeline_trimmed", "Pipeline entries trimmed after every processor "
            "was done with them (this process's trims)", value=trimmer.trimmed,
        )  # fmt: skip
        yield CounterMetricFamily(
            "tokenbridge_pipeline_lost", "Pipeline entries dropped by the length cap before "
            "the processors were done with them (this process's trims)", value=trimmer.lost,
        )  # fmt: skip


def render(
    connections: ConnectionManager,
    fanout_stats: object | None,
    consumers: StreamConsumerService,
    worker: WorkerCounts | None = None,
    models: Mapping[str, object] | None = None,
    trimmer: object | None = None,
) -> bytes:
    """The exposition text for one scrape; ``models``: the runtime's (provider counters)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        TokenBridgeCollector(connections, fanout_stats, consumers, worker, models, trimmer)
    )
    output: bytes = generate_latest(registry)
    return output
