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
    "Keys",
    "new_generation_id",
    "new_session_id",
    "validate_id",
]

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

    def generations(self, session_id: str) -> str:
        """Hash: generation id -> ``running <seq>`` or ``done <seq>`` (worker recovery)."""
        return f"{self.prefix}:{{{session_id}}}:gens"

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

    @property
    def generation_log(self) -> str:
        """Stream: one record per finished generation (processors/generation_log.py)."""
        return f"{self.prefix}:log"

    def generation_log_once(self, generation_id: str) -> str:
        """Marker: the generation was logged. Hash tag ``{<prefix>:log}``: the slot of the
        log stream (whose name has no braces), so one script can write both."""
        return f"{self.prefix}:log:once:{{{self.prefix}:log}}:{generation_id}"

    def wake(self, node_id: str, reader: int) -> str:
        """Private stream a gateway writes to wake its own blocked fan-out reader."""
        return f"{self.prefix}:wake:{node_id}:{reader}"
