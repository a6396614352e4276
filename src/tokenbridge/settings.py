"""Settings: every knob of tokenbridge, read from ``TOKENBRIDGE_*`` environment variables.

Settings are built once at the edge (the CLI, ``create_app``) and passed down; no other
module reads ``os.environ`` (the one exception is an adapter reading the API key from the
variable that its model entry *names*, via :meth:`ModelConfig.api_key`). The model table's
entries (:class:`ModelConfig`) and specs live in ``model_config.py``.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from tokenbridge.exceptions import ConfigurationError
from tokenbridge.model_config import (
    ModelConfig,
    check_model_table,
    default_models,
    parse_model_flag,
)
from tokenbridge.settings_sources import describe_errors, read_config_file

__all__ = ["RATE_PATTERN", "RENAMED", "ModelConfig", "Settings", "load_settings"]

RENAMED = {
    "sse_heartbeat_s": "connection_heartbeat_s",
    "worker_block_ms": "consumer_block_ms",
    "worker_claim_idle_ms": "consumer_claim_idle_ms",
    "worker_heartbeat_s": "consumer_heartbeat_s",
}
"""Old setting name -> new name: the old ones still work for one release, with a warning."""

RATE_PATTERN = r"^[1-9][0-9]{0,8}/(second|minute|hour|day|[1-9][0-9]{0,5}[smhd])$"
"""A rate setting: a count per period (``10/minute``, ``100/30s``)."""


class Settings(BaseSettings):
    """All configuration; env prefix ``TOKENBRIDGE_`` (``redis_url``: ``TOKENBRIDGE_REDIS_URL``)."""

    model_config = SettingsConfigDict(env_prefix="TOKENBRIDGE_", extra="forbid", frozen=True)

    # -- Redis ---------------------------------------------------------------------------
    redis_url: SecretStr | None = Field(
        default=None,
        description="Redis URL (redis://, rediss://, unix://; redis+cluster://, "
        "rediss+cluster:// for a Redis Cluster, the seed node's address is enough). "
        "Unset: start an embedded server.",
    )
    redis_cluster: bool = Field(
        default=False,
        description="The URL names one node of a Redis Cluster (same as a +cluster scheme).",
    )
    redis_max_connections: int = Field(
        default=32, ge=4, le=10_000, description="Pool size for non-blocking commands."
    )
    redis_socket_timeout_s: float = Field(
        default=10.0, gt=0, description="Socket timeout of non-blocking commands."
    )
    key_prefix: str = Field(
        default="tb",
        pattern=r"^[A-Za-z0-9_.-]{1,32}$",
        description="Prefix of every Redis key tokenbridge writes.",
    )
    redis_outage_s: float = Field(
        default=30.0,
        ge=0,
        description="How long a producer whose write failed (Redis restarting, a failover, a "
        "lost reply) retries it with backoff, the model's events waiting in its bounded buffer "
        "(producer_max_pending, producer_max_pending_bytes); past this the generation stops "
        "and ends with `error generation_lost` once Redis is back. Keep it below "
        "consumer_claim_idle_ms, after which another worker takes the job over.",
    )

    # -- HTTP ----------------------------------------------------------------------------
    host: str = Field(default="127.0.0.1", description="Address the gateway binds to.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port the gateway binds to.")

    # -- Streams -------------------------------------------------------------------------
    stream_max_len: int = Field(
        default=10_000,
        ge=10,
        description="Entries kept per session stream whatever their age; past it, entries "
        "older than stream_history_s are trimmed (XTRIM MINID ~, never below this count).",
    )
    stream_retention_s: int = Field(
        default=3600, ge=1, description="Session keys expire this long after a generation ends."
    )
    stream_max_generation_s: int = Field(
        default=3600,
        ge=10,
        description="Safety TTL of a session's keys while a generation runs (crashed producers).",
    )
    openai_response_retention_s: int = Field(
        default=7 * 86_400,
        ge=60,
        description="How long a stored Responses API response (POST /v1/responses, store: "
        "true) can be retrieved, continued (previous_response_id) and deleted.",
    )
    stream_history_s: int = Field(
        default=60,
        ge=0,
        le=31_536_000,  # a year; far beyond it the trim id (now - history) would go negative
        description="Entries younger than this are kept even past stream_max_len (up to "
        "stream_history_max_len), so a fast session keeps the history a dropped reader "
        "resumes from. 0: trim by count only.",
    )
    stream_history_max_len: int = Field(
        default=200_000,
        ge=10,
        description="Hard cap of entries per session stream (XADD MAXLEN ~), whatever their "
        "age; never below stream_max_len.",
    )

    # -- Gateway fan-out -----------------------------------------------------------------
    fanout_linger_s: float = Field(
        default=10.0,
        ge=0,
        description="How long a session stays subscribed after its last connection here left: "
        "clients coming back (a reconnect storm) resume without subscribing again.",
    )
    fanout_recent_events: int = Field(
        default=64,
        ge=0,
        le=100_000,
        description="Last events kept per session held here: a resume from one of them reads "
        "nothing from Redis.",
    )
    fanout_probe_s: float = Field(
        default=5.0,
        gt=0,
        description="A pub/sub connection silent this long is probed (a message it must hear "
        "within as long again, else it is rebuilt and its sessions re-read).",
    )
    fanout_batch_events: int = Field(
        default=1000,
        ge=1,
        le=100_000,
        description="Most events handed to a connection as one batch (one write to the "
        "client); a bigger producer batch is split.",
    )
    fanout_repair_concurrency: int = Field(
        default=16, ge=1, le=1000, description="Stream re-reads (repairs) at once."
    )
    connection_heartbeat_s: float = Field(
        default=15.0,
        gt=0,
        description="Keep-alive interval of idle connections (SSE `: ping`, WebSocket ping).",
    )
    sse_retry_ms: int = Field(
        default=1000, ge=0, description="Reconnect delay hint (SSE retry:) sent to clients."
    )
    connection_max_buffered_events: int = Field(
        default=10_000,
        ge=10,
        description="Events queued for one connection before it is cut as a slow client.",
    )
    connection_max_buffered_bytes: int = Field(
        default=1_048_576,
        ge=0,
        description="Bytes (estimated: token text + ~96 per event) queued or being written for "
        "one connection before it is cut as a slow client (it resumes from Last-Event-ID); "
        "0: bounded in events only.",
    )
    connection_send_buffer_bytes: int = Field(
        default=131_072,
        ge=0,
        description="SO_SNDBUF of client sockets (set on the listening socket, inherited): "
        "caps what the kernel holds per client on top of the byte budget; 0: kernel "
        "autotuning (megabytes on loopback).",
    )
    history_batch: int = Field(
        default=1000, ge=1, le=100_000, description="XRANGE COUNT when replaying history."
    )
    websocket_compression: bool = Field(
        default=False,
        description="Accept permessage-deflate from WebSocket clients (browsers offer it): "
        "fewer bytes on the wire, but each connection holds zlib state (about 40 KB).",
    )
    connection_idle_timeout_s: float = Field(
        default=0.0,
        ge=0,
        description="Close a connection (reason `idle`) after this long with no event sent; "
        "0: never. Heartbeats do not count as events.",
    )

    # -- Limits --------------------------------------------------------------------------
    limits_max_connections: int = Field(
        default=10_000,
        ge=1,
        description="SSE + WebSocket connections one gateway process holds; past it, "
        "429 `too_many_connections` (WebSocket: close 1013).",
    )
    limits_max_connections_per_session: int = Field(
        default=100,
        ge=1,
        description="Connections to one session on one gateway process; past it, "
        "429 `too_many_session_connections`.",
    )
    limits_max_connections_per_address: int = Field(
        default=1000,
        ge=1,
        description="Connections from one client IP address to one gateway process (behind a "
        "proxy not in uvicorn's FORWARDED_ALLOW_IPS, the proxy's address); past it, 429 "
        "`too_many_address_connections`.",
    )
    limits_max_websocket_message_bytes: int = Field(
        default=4096,
        ge=256,
        le=16 * 1024 * 1024,
        description="Largest message a WebSocket client may send; a larger one closes it "
        "with 1009.",
    )

    # -- Generations ---------------------------------------------------------------------
    run_worker: bool = Field(
        default=True, description="Run a generation worker inside `tokenbridge serve`."
    )
    worker_concurrency: int = Field(
        default=64, ge=1, le=10_000, description="Generations one worker process runs at once."
    )
    consumer_block_ms: int = Field(
        default=5000,
        ge=10,
        le=60_000,
        description="BLOCK of every consumer's XREADGROUP (jobs and pipeline shards).",
    )
    consumer_claim_idle_ms: int = Field(
        default=30_000,
        ge=1000,
        description="An entry pending this long on a silent consumer is reclaimed (XAUTOCLAIM).",
    )
    consumer_heartbeat_s: float = Field(
        default=5.0,
        gt=0,
        description="How often a consumer refreshes its in-flight entries and reclaims, and "
        "a worker its liveness.",
    )
    consumer_max_deliveries: int = Field(
        default=5, ge=1, le=1000, description="Deliveries before an entry is dead-lettered."
    )
    dlq_max_len: int = Field(
        default=100_000, ge=100, description="Approximate max entries of the dead-letter stream."
    )
    shutdown_drain_s: float = Field(
        default=10.0,
        ge=0,
        description="On stop, how long running generations (and uvicorn's open requests) get "
        "to finish; generations still running then end with reason `cancelled`.",
    )
    orphan_grace_s: float = Field(
        default=30.0,
        ge=0,
        description="A generation (not `background`) that no client reads on any gateway node "
        "for this long is cancelled; its stream ends with reason `abandoned`. 0: never. Read "
        "by workers; a gateway's `fanout_linger_s` adds to it after the last client left.",
    )
    producer_max_pending: int = Field(
        default=4096, ge=1, description="Events a producer buffers before the model waits."
    )
    jobs_max_len: int = Field(
        default=100_000, ge=100, description="Approximate max entries kept in the job stream."
    )
    producer_max_pending_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        description="Bytes of event text a producer buffers (not yet written: Redis slow or "
        "away) before the model waits; with producer_max_pending, the bound of that buffer.",
    )

    # -- Operations (presence, dashboard, embedded Redis data) ---------------------------
    presence_heartbeat_s: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="How often every process publishes its presence record (roles, counters) "
        "to Redis; the record expires after three of these.",
    )
    dashboard_update_s: float = Field(
        default=2.0,
        ge=0.1,
        le=60,
        description="How often the dashboard stream (/v1/admin/dashboard/events) sends a "
        "fresh picture of the deployment.",
    )
    data_dir: str | None = Field(
        default=None,
        description="Where `tokenbridge serve` keeps the embedded Redis's data (AOF); unset: "
        "the platform's user data directory. `serve --ephemeral` keeps nothing.",
    )

    # -- Input bounds --------------------------------------------------------------------
    max_prompt_chars: int = Field(
        default=100_000, ge=1, description="Max characters of a prompt or of all messages."
    )
    max_messages: int = Field(default=256, ge=1, description="Max messages in one request.")
    max_tokens_limit: int = Field(
        default=100_000, ge=1, description="Largest params.max_tokens a request may ask for."
    )

    # -- Security ------------------------------------------------------------------------
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="API keys accepted besides those stored in Redis (comma-separated).",
    )
    auth_secret: SecretStr | None = Field(
        default=None,
        description="HMAC secret of subscribe tokens; unset: generated once, kept in Redis.",
    )
    auth_previous_secrets: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Old secrets still accepted when verifying tokens (rotation window).",
    )
    auth_token_ttl_s: int = Field(
        default=3600, ge=10, le=30 * 86_400, description="Lifetime of a subscribe token."
    )
    auth_disabled: bool = Field(
        default=False,
        description="Accept every request without credentials. Development only.",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins allowed by CORS (comma-separated); empty: CORS off.",
    )

    # -- Processor pipeline (processors/) -----------------------------------------------
    pipeline_enabled: bool = Field(
        default=True,
        description="Producers append each flushed batch of events to a pipeline stream "
        "(one entry per batch, not per token) for the processors.",
    )
    pipeline_shards: int = Field(
        default=4,
        ge=1,
        le=256,
        description="Pipeline streams <prefix>:pipeline:<n>; a session's batches go to "
        "crc32(session_id) % shards. Change it only with the pipeline drained.",
    )
    pipeline_max_len: int = Field(
        default=100_000,
        ge=100,
        description="Max entries kept per pipeline stream. Entries are trimmed once the "
        "processors group has acked them; past this cap (processors stalled) the oldest are "
        "dropped and counted as lost (tokenbridge stats, metrics, a log line). Producers trim "
        "at twice this as a backstop.",
    )
    run_processors: bool = Field(
        default=True,
        description="Run the processor pipeline (StreamProcessor) inside `tokenbridge serve` "
        "and `tokenbridge worker` (its --no-processors turns it off there).",
    )
    processors: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["analytics", "logging", "cache", "rate_limit"],
        description="Processors to run, by name (comma-separated): built-in analytics, "
        "logging, cache, rate_limit, or a name in the entry-point group tokenbridge.processors.",
    )
    processors_extra: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Your own processors as dotted paths `package.module:factory` "
        "(comma-separated); each factory is called with a ProcessorContext.",
    )
    processors_concurrency: int = Field(
        default=16,
        ge=1,
        le=10_000,
        description="Pipeline entries one process handles at once, per pipeline shard.",
    )
    processors_dead_letter: bool = Field(
        default=True,
        description="Dead-letter a pipeline entry once per processor that failed on it "
        "(replaying it re-runs every processor); off: the failure is only counted and logged.",
    )
    processors_once_ttl_s: int = Field(
        default=0,
        ge=0,
        description="How long the apply-once markers of the processors (analytics, generation "
        "log, token budgets) are kept: as long as an entry can still be delivered again. 0: "
        "2 x consumer_max_deliveries x consumer_claim_idle_ms (5 min by default), at least 60 s. "
        "An entry redelivered later (processors down longer than this right after a crash, "
        "or a dead letter replayed later) may count twice.",
    )
    analytics_retention_s: int = Field(
        default=7 * 86_400,
        ge=1,
        description="Per-session and per-generation analytics expire this long after their "
        "last update; totals and per-model figures are kept.",
    )
    generation_log_path: str | None = Field(
        default=None,
        description="Write the generation log as JSON lines to this file (appended) instead "
        "of the Redis stream <prefix>:log.",
    )
    generation_log_max_len: int = Field(
        default=100_000,
        ge=100,
        description="Approximate max records of the Redis generation log stream (MAXLEN ~).",
    )

    @field_validator(
        "api_keys",
        "auth_previous_secrets",
        "cors_origins",
        "processors",
        "processors_extra",
        mode="before",
    )
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        """A list setting given as one string (a variable, a flag): its comma-separated parts."""
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    # -- Response cache (processors/cache.py) -------------------------------------------
    cache_enabled: bool = Field(
        default=True,
        description="Replay the answer of a repeated request from the cache, without a model call.",
    )
    cache_scope: Literal["deterministic", "all"] = Field(
        default="deterministic",
        description="Requests cached: 'deterministic' (temperature 0, or a demo model) or 'all'.",
    )
    cache_ttl_s: int = Field(default=3600, ge=1, description="How long a cached answer is kept.")
    cache_max_entries: int = Field(
        default=10_000,
        ge=1,
        description="Most answers kept in the cache; the least recently used go first.",
    )
    cache_max_entry_bytes: int = Field(
        default=1_000_000,
        ge=100,
        description="An answer larger than this (stored JSON) is not cached.",
    )

    # -- Rate limits (processors/rate_limit.py) ------------------------------------------
    rate_limit_generations: str | None = Field(
        default=None,
        description="Generations one API key (all callers, with auth disabled) may start per "
        "model, as N/second|minute|hour|day or N/<k>s|m|h|d, e.g. 10/minute; unset: no limit.",
    )
    rate_limit_tokens_per_minute: int | None = Field(
        default=None,
        ge=1,
        description="Tokens (prompt and answer) one API key may use per model per minute; "
        "unset: no limit.",
    )
    rate_limit_model_generations: str | None = Field(
        default=None,
        description="Generations all keys together may start on one model, e.g. 600/minute; "
        "unset: no limit.",
    )
    rate_limit_model_tokens_per_minute: int | None = Field(
        default=None,
        ge=1,
        description="Tokens all keys together may use per model per minute; unset: no limit.",
    )

    @field_validator("rate_limit_generations", "rate_limit_model_generations")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(RATE_PATTERN, value):
            raise ValueError(f"{value!r} is not a rate such as 10/minute, 5/second or 100/30s")
        return value

    @model_validator(mode="after")
    def _token_budgets_need_the_pipeline(self) -> Settings:
        budgets = self.rate_limit_tokens_per_minute or self.rate_limit_model_tokens_per_minute
        if budgets and not (self.pipeline_enabled and "rate_limit" in self.processors):
            raise ValueError(
                "token budgets (TOKENBRIDGE_RATE_LIMIT_TOKENS_PER_MINUTE, "
                "TOKENBRIDGE_RATE_LIMIT_MODEL_TOKENS_PER_MINUTE) are charged by the pipeline's "
                "rate_limit processor: set TOKENBRIDGE_PIPELINE_ENABLED=true and keep rate_limit "
                "in TOKENBRIDGE_PROCESSORS, or unset the budgets"
            )
        return self

    # -- Models --------------------------------------------------------------------------
    models: dict[str, ModelConfig] = Field(
        default_factory=default_models,
        description='Model table as JSON: {"name": {"adapter": "openai", "base_url": ...}}.',
    )

    # -- Providers (producer/models/retry.py) --------------------------------------------
    provider_max_retries: int = Field(
        default=3,
        ge=0,
        le=20,
        description="Retries of a model call that fails before its first token (connect "
        "error, timeout, HTTP 429 or 5xx), with exponential backoff and jitter; 0: none.",
    )
    provider_retry_base_s: float = Field(
        default=0.5, gt=0, le=60, description="First backoff delay; doubled at each retry."
    )
    provider_retry_max_wait_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="Longest wait before a retry: caps the backoff; a Retry-After asking for "
        "longer ends the retries (the fallbacks, if any, are tried next).",
    )

    # -- Old names, accepted for one release (a DeprecationWarning says the new one) ------
    sse_heartbeat_s: float | None = Field(
        default=None, gt=0, deprecated="use connection_heartbeat_s", exclude=True
    )
    worker_block_ms: int | None = Field(
        default=None, ge=10, le=60_000, deprecated="use consumer_block_ms", exclude=True
    )
    worker_claim_idle_ms: int | None = Field(
        default=None, ge=1000, deprecated="use consumer_claim_idle_ms", exclude=True
    )
    worker_heartbeat_s: float | None = Field(
        default=None, gt=0, deprecated="use consumer_heartbeat_s", exclude=True
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: object) -> object:
        """Move a value given under an old name to its new name, with a DeprecationWarning
        (the new name wins when both are given)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for old, new in RENAMED.items():
            if data.get(old) is None:
                continue
            warnings.warn(
                f"setting {old} (TOKENBRIDGE_{old.upper()}) is deprecated and will be removed "
                f"in the next release: use {new} (TOKENBRIDGE_{new.upper()})",
                DeprecationWarning,
                stacklevel=2,
            )
            value = data.pop(old)
            data.setdefault(new, value)
        return data

    @model_validator(mode="after")
    def _claim_after_heartbeats(self) -> Settings:
        if self.consumer_claim_idle_ms < self.consumer_heartbeat_s * 3000:
            raise ValueError(
                "consumer_claim_idle_ms must be at least 3 x consumer_heartbeat_s, or running "
                "entries are taken over from live consumers"
            )
        return self

    @field_validator("models")
    @classmethod
    def _models_not_empty(cls, value: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
        return check_model_table(value)

    def once_ttl_ms(self) -> int:
        """Lifetime of apply-once markers (``processors_once_ttl_s``, or derived from it)."""
        if self.processors_once_ttl_s:
            return self.processors_once_ttl_s * 1000
        return max(60_000, 2 * self.consumer_max_deliveries * self.consumer_claim_idle_ms)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags, then variables, then the config file (``load_settings(config_file=...)``)."""
        file_values = _FILE_VALUES.get()
        sources = [init_settings, env_settings, dotenv_settings, file_secret_settings]
        if file_values:
            sources.append(InitSettingsSource(settings_cls, init_kwargs=file_values))
        return tuple(sources)

    def redis_url_value(self) -> str | None:
        """The Redis URL in clear, for the store only; never log it."""
        return self.redis_url.get_secret_value() if self.redis_url else None


_FILE_VALUES: ContextVar[dict[str, Any] | None] = ContextVar("_FILE_VALUES", default=None)

_FLAGS = {"host": "--host", "port": "--port", "run_worker": "--worker/--no-worker",
          "run_processors": "--processors/--no-processors", "models": "--model"}  # fmt: skip


def load_settings(
    config_file: Path | None = None, model_flags: Sequence[str] = (), **overrides: object
) -> Settings:
    """Settings from flags (``overrides``, ``--model`` entries), ``TOKENBRIDGE_*`` variables
    and the config file, in that order of precedence; any problem is one clear line
    (:class:`ConfigurationError`) naming the flag, variable or file key to change."""
    file_values: dict[str, Any] = {}
    source: dict[str, str] = {}
    if config_file is not None:
        file_values = read_config_file(config_file, Settings.model_fields)
        source.update({key: f"{config_file}: {key}" for key in file_values})
        if "TOKENBRIDGE_MODELS" in os.environ:  # the variable replaces the file's whole table
            file_values.pop("models", None)
    source.update({key: f"TOKENBRIDGE_{key.upper()}" for key in Settings.model_fields
                   if f"TOKENBRIDGE_{key.upper()}" in os.environ})  # fmt: skip
    if model_flags:
        overrides["models"] = dict(parse_model_flag(flag) for flag in model_flags)
    source.update({key: _FLAGS.get(key, key) for key in overrides})
    token = _FILE_VALUES.set(file_values)
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigurationError(describe_errors(exc, source)) from None
    except SettingsError as exc:  # a variable that cannot be decoded (JSON of TOKENBRIDGE_MODELS)
        found = re.search(r'field "(\w+)"', str(exc))
        name = f"TOKENBRIDGE_{found.group(1).upper()}" if found else "a TOKENBRIDGE_ variable"
        cause = f": {exc.__cause__}" if exc.__cause__ else ""
        raise ConfigurationError(f"{name} is not valid JSON{cause}") from None
    finally:
        _FILE_VALUES.reset(token)
