"""What a long-running command (``serve``, ``worker``) checks before it starts and how it stops.

Before anything starts (embedded Redis, loops, logs), the listening socket is bound and Redis
is pinged, so a taken port or an unreachable Redis is one line naming the setting, not a
failure halfway through a startup. :class:`StopSignals` makes SIGTERM/SIGINT always end the
process: the first starts the graceful stop and a watchdog that forces the exit once
``shutdown_drain_s`` (plus a short grace for closing) has passed; a second SIGINT forces it at
once. A forced exit still runs the registered cleanups (stopping the embedded Redis).
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import signal
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

import redis
from redis import exceptions as redis_exc

from tokenbridge.exceptions import ConfigurationError, RedisUnavailable
from tokenbridge.settings import Settings
from tokenbridge.store.client import cluster_url

__all__ = ["CLOSE_GRACE_S", "StopSignals", "bind_socket", "probe_redis", "safe_redis_url"]

log = logging.getLogger(__name__)

CLOSE_GRACE_S = 3.0
"""After ``shutdown_drain_s``: time to close clients and stop the embedded Redis."""


def bind_socket(settings: Settings) -> socket.socket:
    """The gateway's listening socket, bound now; a taken port is one clear error."""
    host, port = settings.host, settings.port
    where = f"TOKENBRIDGE_PORT={port} (--port)"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigurationError(
            f"TOKENBRIDGE_HOST={host} (--host): not an address of this machine ({exc.strerror})"
        ) from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigurationError(
                f"{where}: {host}:{port} is already in use; stop what listens there or "
                "choose another port"
            ) from None
        if exc.errno == errno.EACCES:
            raise ConfigurationError(
                f"{where}: not allowed to listen on {host}:{port} (ports below 1024 need "
                "privileges); choose a port above 1024"
            ) from None
        raise ConfigurationError(
            f"TOKENBRIDGE_HOST={host} (--host): cannot listen on {host}:{port}: {exc.strerror}"
        ) from None
    sock.set_inheritable(True)
    return sock


def safe_redis_url(url: str) -> str:
    """The URL without its password, for messages."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


def probe_redis(settings: Settings) -> None:
    """PING ``TOKENBRIDGE_REDIS_URL`` once, so a wrong URL, password or host fails first."""
    url = settings.redis_url_value()
    if url is None:
        return
    timeout = min(5.0, settings.redis_socket_timeout_s)
    # A cluster is probed through its seed node: PING answers there, and a probe write whose
    # slot another node owns answers MOVED, which _try_writes lets be.
    plain_url, _ = cluster_url(url, settings.redis_cluster)
    try:
        client = redis.Redis.from_url(
            plain_url,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            client_name="tokenbridge-probe",  # CLIENT SETNAME, as every connection of ours
        )
    except ValueError as exc:
        raise ConfigurationError(
            f"TOKENBRIDGE_REDIS_URL={safe_redis_url(url)}: not a Redis URL ({exc}); "
            "use redis://host:port/db, rediss://, unix://, or redis+cluster://host:port for a "
            "Redis Cluster"
        ) from None
    try:
        client.ping()
        _try_writes(client, settings.key_prefix)
    except redis_exc.ReadOnlyError:
        raise ConfigurationError(
            f"TOKENBRIDGE_REDIS_URL ({safe_redis_url(url)}) is a read-only replica; point it "
            "at the primary"
        ) from None
    except redis_exc.AuthenticationError as exc:
        raise RedisUnavailable(
            f"Redis at TOKENBRIDGE_REDIS_URL ({safe_redis_url(url)}) refused the credentials: "
            f"{str(exc).rstrip('.')}. Put the right user and password in the URL"
        ) from None
    except redis_exc.NoPermissionError as exc:
        raise ConfigurationError(
            f"TOKENBRIDGE_REDIS_URL ({safe_redis_url(url)}): the Redis user may not run a "
            f"command tokenbridge needs ({str(exc).rstrip('.')}); grant it, e.g. "
            "ACL SETUSER <user> +@all ~* &*"
        ) from None
    except (redis_exc.RedisError, OSError) as exc:
        raise RedisUnavailable(
            f"cannot reach Redis at TOKENBRIDGE_REDIS_URL ({safe_redis_url(url)}): "
            f"{str(exc).rstrip('.')}. Is Redis running there? Unset the variable to use "
            "the embedded server."
        ) from None
    finally:
        client.close()


def _try_writes(client: redis.Redis, prefix: str) -> None:
    """The kinds of command a start runs (SET, HSET, XADD, ZADD, EVAL, EXPIRE, DEL), on
    throw-away keys of one hash slot: a user short of a permission fails here, in one line,
    not in several loops at once. A cluster node that does not own the slot is let be."""
    tag = f"{prefix}:probe:{{{secrets.token_hex(6)}}}"
    keys = [f"{tag}:{kind}" for kind in ("string", "hash", "stream", "zset")]
    try:
        with client.pipeline(transaction=False) as pipe:
            pipe.set(keys[0], "1", nx=True, ex=10)
            pipe.hset(keys[1], "f", "1")
            pipe.xadd(keys[2], {"f": "1"}, maxlen=1)
            pipe.zadd(keys[3], {"m": 1})
            for key in keys[1:]:
                pipe.expire(key, 10)
            pipe.eval("return 1", 0)
            pipe.delete(*keys)
            pipe.execute()
    except redis_exc.ResponseError as exc:
        if isinstance(exc, redis_exc.NoPermissionError | redis_exc.ReadOnlyError):
            raise
        if isinstance(exc, redis_exc.AskError):  # MovedError too: another node owns the slot
            return
        if not str(exc).startswith(("MOVED", "ASK", "CROSSSLOT")):
            raise


class StopSignals:
    """SIGTERM/SIGINT handling: graceful first, forced on a second SIGINT or after a deadline.

    ``graceful`` runs in the signal handler (it must only set flags or schedule work);
    ``cleanups`` run before a forced exit.
    """

    def __init__(self, deadline_s: float, graceful: Callable[[int], None]) -> None:
        self.deadline_s = deadline_s
        self.graceful = graceful
        self.cleanups: list[Callable[[], None]] = []
        self.received = 0
        self._lock = threading.Lock()
        self._original: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._original[sig] = signal.signal(sig, self.handle)

    def restore(self) -> None:
        for sig, handler in self._original.items():
            signal.signal(sig, handler)
        self._original.clear()

    def handle(self, sig: int, frame: Any = None) -> None:
        self.received += 1
        if self.received > 1:
            if sig == signal.SIGINT:
                self.force("second interrupt: stopped at once, without finishing the drain")
            return
        timer = threading.Timer(
            self.deadline_s,
            self.force,
            args=(f"did not stop within {self.deadline_s:g} s "
                  "(TOKENBRIDGE_SHUTDOWN_DRAIN_S + close); stopped at once",),
        )  # fmt: skip
        timer.daemon = True
        timer.start()
        self.graceful(sig)

    def force(self, why: str) -> None:
        """Run the cleanups, say why in one red line, exit 1 at once (no Python teardown)."""
        if not self._lock.acquire(blocking=False):
            return
        for cleanup in self.cleanups:
            try:
                cleanup()
            except Exception as exc:  # a cleanup that fails must not stop the exit
                log.warning("cleanup failed while forcing the exit: %r", exc)
        line = f"tokenbridge: {why}"
        sys.stderr.write(f"\x1b[31m{line}\x1b[0m\n" if sys.stderr.isatty() else f"{line}\n")
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)
