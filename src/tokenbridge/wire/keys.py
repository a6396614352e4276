"""Redis key names, and the validators of the ids that go into them.

Every key of one session carries the session id as its hash tag (``tb:{s_abc}:events``), so that
all of them live on one Redis Cluster slot and can be used together in one script or
transaction. Ids are checked against strict patterns before they become part of a key name, so
no request can address a key that is not its own.
"""

from __future__ import annotations

import re
import secrets
import uuid

from tokenbridge.exceptions import InvalidRequest

__all__ = [
    "ID_PATTERN",
    "PROCESSOR_GROUP",
    "WORKER_GROUP",
    "Keys",
    "new_generation_id",
    "new_session_id",
    "validate_id",
]

WORKER_GROUP = "workers"
"""The consumer group of the job stream: generation workers."""

PROCESSOR_GROUP = "processors"
"""The consumer group of the pipeline streams: processor processes."""

ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""Session and generation ids: 1-64 characters of ``A-Z a-z 0-9 _ -``."""


def new_session_id() -> str:
    """A fresh, unguessable session id (128 random bits)."""
    return "s_" + secrets.token_urlsafe(16)


def new_generation_id() -> str:
    """A fresh generation id (uuid4)."""
    return "g_" + uuid.uuid4().hex


def validate_id(value: object, what: str = "session_id") -> str:
    """Return ``value`` if it is a valid id, else raise :class:`InvalidRequest`."""
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise InvalidRequest(
            f"invalid_{what}",
            f"{what} must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'",
        )
    return value


class Keys:
    """Key names under one prefix; see docs/wire-format.md for the full table."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str = "tb") -> None:
        self.prefix = prefix

    def events(self, session_id: str) -> str:
        """The session's event stream: every event of every generation of the session."""
        return f"{self.prefix}:{{{session_id}}}:events"

    def meta(self, session_id: str) -> str:
        """Hash with the session stream's ``epoch``: changes when Redis lost the stream."""
        return f"{self.prefix}:{{{session_id}}}:meta"

    def live(self, session_id: str) -> str:
        """Shard channel (``SPUBLISH``): each appended batch, for the gateways holding it."""
        return f"{self.prefix}:{{{session_id}}}:live"

    def generations(self, session_id: str) -> str:
        """Hash: generation id -> ``running <seq>`` or ``done <seq>`` (worker recovery)."""
        return f"{self.prefix}:{{{session_id}}}:gens"

    @staticmethod
    def cancel_field(generation_id: str) -> str:
        """The field of :meth:`generations` that flags a cancel request for a generation."""
        return f"cancel:{generation_id}"

    def session_of(self, events_key: str) -> str:
        """The session id inside an events key."""
        start = events_key.index("{") + 1
        return events_key[start : events_key.index("}", start)]

    def generation(self, generation_id: str) -> str:
        """String: the session id of a generation (cancel finds the session from it)."""
        return f"{self.prefix}:gen:{generation_id}"

    @property
    def cancel_channel(self) -> str:
        """Pub/sub channel on which cancel requests reach the workers at once."""
        return f"{self.prefix}:cancel"

    @property
    def jobs(self) -> str:
        """The job stream that generation workers consume with a consumer group."""
        return f"{self.prefix}:jobs"

    @property
    def running(self) -> str:
        """Sorted set: ``<session> <generation>`` -> refresh deadline (ms) of running
        generations; past it, the sweeper ends them (producer/sweeper.py)."""
        return f"{self.prefix}:running"

    @property
    def workers(self) -> str:
        """Sorted set: worker name -> last heartbeat (ms); readiness looks here."""
        return f"{self.prefix}:workers"

    def pipeline(self, shard: int) -> str:
        """Pipeline stream ``shard``: one entry per flushed batch, read by the processors."""
        return f"{self.prefix}:pipeline:{shard}"

    def pipeline_written(self, pipeline_key: str, generation_id: str) -> str:
        """Marker: the first ``seq`` of the generation's last batch added to ``pipeline_key``
        (``store/pipeline_add.py``: a retried write adds it once). Hash tag: the pipeline
        stream's name, so one script writes both; it expires (the producer sets its TTL)."""
        return f"{self.prefix}:pipeline:w:{{{pipeline_key}}}:{generation_id}"

    @property
    def pipeline_lost(self) -> str:
        """Hash: pipeline shard -> entries dropped before the processors were done with them."""
        return f"{self.prefix}:pipeline:lost"

    @property
    def processor_stats(self) -> str:
        """Hash: StreamProcessor name -> JSON snapshot of its per-processor stats."""
        return f"{self.prefix}:processors"

    @property
    def dead_letters(self) -> str:
        """The dead-letter stream of every consumer group (docs/operations.md)."""
        return f"{self.prefix}:dlq"

    def wake(self, node_id: str, reader: int) -> str:
        """Private stream a gateway writes to wake its own blocked fan-out reader."""
        return f"{self.prefix}:wake:{node_id}:{reader}"

    @staticmethod
    def once(scope: str, entry_id: str) -> str:
        """ApplyOnce marker of ``entry_id`` under ``scope`` (a key whose hash tag it shares)."""
        return f"{scope}:once:{entry_id}"

    # Auth (gateway/auth.py)

    @property
    def auth_keys(self) -> str:
        """Hash: digest of an API key -> JSON record (its id, name, created, revoked)."""
        return f"{self.prefix}:auth:keys"

    @property
    def auth_secret(self) -> str:
        """String: the token-signing secret shared by every gateway."""
        return f"{self.prefix}:auth:secret"

    def auth_login(self, code_digest: str) -> str:
        """String: a one-time login code (its sha256), until used or expired."""
        return f"{self.prefix}:auth:login:{code_digest}"

    # Analytics (processors/analytics.py; read by tokenbridge/stats.py)

    @property
    def stats_scope(self) -> str:
        """Hash tag of the totals' slot (ApplyOnce markers of the totals)."""
        return f"{self.prefix}:{{stats}}"

    @property
    def stats_total(self) -> str:
        return f"{self.prefix}:{{stats}}:total"

    @property
    def stats_models(self) -> str:
        """Hash: model -> generations (the index of :meth:`stats_model` keys)."""
        return f"{self.prefix}:{{stats}}:models"

    def stats_model(self, name: str) -> str:
        return f"{self.prefix}:{{stats}}:model:{name}"

    def session_stats(self, session_id: str) -> str:
        return f"{self.prefix}:{{{session_id}}}:stats"

    def session_stats_generations(self, session_id: str) -> str:
        return f"{self.prefix}:{{{session_id}}}:stats:gens"

    def generation_stats(self, session_id: str, generation_id: str) -> str:
        return f"{self.prefix}:{{{session_id}}}:stats:gen:{generation_id}"

    def generation_stats_seen(self, session_id: str, generation_id: str) -> str:
        return f"{self.prefix}:{{{session_id}}}:stats:seen:{generation_id}"

    # Generation log (processors/generation_log.py)

    @property
    def log(self) -> str:
        """Stream: one record per finished generation."""
        return f"{self.prefix}:log"

    def generation_log(self, session_id: str, generation_id: str) -> str:
        """Hash: a running generation's text per batch, then a ``logged`` marker."""
        return f"{self.prefix}:{{{session_id}}}:glog:{generation_id}"

    def log_once(self, generation_id: str) -> str:
        """Marker: the generation was logged (kept ``processors_once_ttl_s``). Hash tag
        ``{<prefix>:log}``: the slot of the log stream (whose name has no braces), so one
        script can write both; and it starts with the prefix, like every key."""
        return f"{self.prefix}:log:once:{{{self.prefix}:log}}:{generation_id}"

    # Response cache (producer/cache.py; filled by processors/cache.py)

    def cache_answer(self, digest: str) -> str:
        return f"{self.prefix}:{{cache:{digest}}}:answer"

    @property
    def cache_lru(self) -> str:
        return f"{self.prefix}:cache:lru"

    def cache_note(self, generation_id: str) -> str:
        return f"{self.prefix}:cache:gen:{generation_id}"

    # Rate limits (gateway/admission.py; charged by processors/rate_limit.py)

    def rate_limit(self, kind: str, digest: str) -> str:
        """Hash of one limit scope (``kind`` key or model; a digest of who and which model)."""
        return f"{self.prefix}:{{rl:{kind}:{digest}}}"

    def rate_limit_note(self, generation_id: str) -> str:
        """String: who pays for a generation's tokens."""
        return f"{self.prefix}:rl:gen:{generation_id}"

    # Presence and the dashboard's series (presence.py, store/series.py)

    def process(self, node_id: str) -> str:
        """String (JSON, with a TTL): one process's presence record (``presence.py``)."""
        return f"{self.prefix}:proc:{node_id}"

    @property
    def processes(self) -> str:
        """Sorted set: node id -> last presence heartbeat (ms); the index of ``process``."""
        return f"{self.prefix}:procs"

    def stats_series(self, bucket: int) -> str:
        """Hash: the analytics of one time bucket (``store/series.py``); shares the
        ``{stats}`` hash tag with the totals, so one script updates both."""
        return f"{self.prefix}:{{stats}}:series:{bucket}"
