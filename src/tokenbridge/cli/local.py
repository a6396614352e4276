"""The data directory of a local `tokenbridge serve`: its Redis data, its key, its address.

With the embedded Redis and no ``--ephemeral``, ``serve`` keeps the server's append-only file
under ``<data dir>/redis`` (default: the platform's user data directory, e.g.
``~/.local/share/tokenbridge``), so keys, sessions within retention and analytics survive a
restart. It also writes, readable by the user only:

* ``api_key``: the key it made at its first start (printed once, then kept here), and
* ``serve.json``: the URL it serves at,

so that `tokenbridge login-link`, `dlq`, `consumers`, `keys` and `stats` reach the local
server with no configuration. A lock (``serve.lock``) keeps a second ``serve`` off the same
directory.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import platformdirs
from pydantic import SecretStr

from tokenbridge.exceptions import ConfigurationError
from tokenbridge.gateway.auth import Auth
from tokenbridge.settings import Settings
from tokenbridge.store.embedded import EmbeddedRedis

__all__ = ["DataDir", "default_data_dir", "first_key", "start_embedded"]


def default_data_dir() -> Path:
    """The platform's user data directory for tokenbridge."""
    return Path(platformdirs.user_data_dir("tokenbridge", appauthor=False))


class DataDir:
    """One data directory: ``DataDir(path)``; :meth:`locked` while a server uses it."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path).expanduser() if path else default_data_dir()

    def __repr__(self) -> str:
        return f"<DataDir {self.path}>"

    @property
    def redis_dir(self) -> Path:
        return self.path / "redis"

    def _private(self, name: str, text: str) -> None:
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        target = self.path / name
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(text)

    def save_key(self, key: str) -> None:
        self._private("api_key", key + "\n")

    def key(self) -> str | None:
        with contextlib.suppress(OSError):
            return (self.path / "api_key").read_text().strip() or None
        return None

    def save_url(self, url: str) -> None:
        self._private("serve.json", json.dumps({"url": url}))

    def url(self) -> str | None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            url = json.loads((self.path / "serve.json").read_text()).get("url")
            return str(url) if url else None
        return None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the directory's lock, or raise ConfigurationError if another serve has it."""
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            yield
            return
        with open(self.path / "serve.lock", "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise ConfigurationError(
                    f"another `tokenbridge serve` uses the data directory {self.path}; stop it, "
                    "or pass --data-dir with another directory (or --ephemeral)"
                ) from None
            yield


def start_embedded(
    settings: Settings, stack: contextlib.ExitStack, data_dir: str | None, ephemeral: bool
) -> tuple[Settings, EmbeddedRedis, DataDir | None]:
    """Start the embedded Redis for `serve` (persistent unless ``ephemeral``); returns the
    settings pointing at it, the server, and the data directory in use (None: ephemeral)."""
    if ephemeral:
        server = stack.enter_context(EmbeddedRedis())
        where = None
    else:
        where = DataDir(data_dir or settings.data_dir)
        stack.enter_context(where.locked())
        server = stack.enter_context(EmbeddedRedis(data_dir=where.redis_dir))
    print(f"embedded redis: {server.binary} {server.version} at {server.url}", flush=True)
    if where is not None:
        print(f"data directory: {where.path} (--ephemeral keeps nothing)", flush=True)
    return settings.model_copy(update={"redis_url": SecretStr(server.url)}), server, where


async def first_key(auth: Auth, where: DataDir | None) -> None:
    """Closed by default: with no API key anywhere, make one and show it once; a data
    directory keeps it (for the CLI on this machine), and later starts say where it is."""
    if not await auth.has_keys():
        key_id, key = await auth.create_key("default")
        print(f"API key {key_id} (shown once, keep it): {key}", flush=True)
        if where is not None:
            where.save_key(key)
    elif where is not None and where.key() is not None:
        print(f"API key: the one made at the first start, kept in {where.path / 'api_key'}")
