"""Admin commands on the shared Redis: ``tokenbridge dlq list|replay|purge``, ``consumers``."""

from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from tokenbridge.cli.app import app
from tokenbridge.consumers.dead_letters import DeadLetters
from tokenbridge.consumers.stream_consumer_service import group_status
from tokenbridge.exceptions import ConfigurationError, RedisUnavailable
from tokenbridge.settings import load_settings
from tokenbridge.store.client import REDIS_DOWN_ERRORS, command_client
from tokenbridge.wire.keys import Keys

dlq_app = typer.Typer(help="List, replay and purge dead-lettered entries.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")
out = Console()
T = TypeVar("T")


@asynccontextmanager
async def _redis() -> AsyncIterator[tuple[Any, Keys]]:
    settings = load_settings()
    url = settings.redis_url_value()
    if url is None:
        raise ConfigurationError(
            "TOKENBRIDGE_REDIS_URL is not set: admin commands work on the Redis the service "
            "uses (`tokenbridge serve` prints its embedded server's URL)"
        )
    redis = command_client(url, 4, settings.redis_socket_timeout_s)
    try:
        await redis.ping()
    except REDIS_DOWN_ERRORS as exc:
        raise RedisUnavailable(f"cannot reach Redis at TOKENBRIDGE_REDIS_URL: {exc}") from None
    try:
        yield redis, Keys(settings.key_prefix)
    finally:
        await redis.aclose()
        await redis.connection_pool.disconnect()


def _run(make: Callable[[Any, Keys], Awaitable[T]]) -> T:
    async def go() -> T:
        async with _redis() as (redis, keys):
            return await make(redis, keys)

    return asyncio.run(go())


def _time(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


@dlq_app.command("list")
def dlq_list(
    count: int = typer.Option(50, help="How many, oldest first."),
    stream: str | None = typer.Option(None, help="Only dead letters of this source stream."),
    as_json: bool = typer.Option(False, "--json", help="JSON lines instead of a table."),
) -> None:
    """Show dead letters: source, original id, deliveries, error."""

    async def go(redis: Any, keys: Keys) -> tuple[int, list[Any]]:
        dlq = DeadLetters(redis, keys.dead_letters)
        return await dlq.count(), await dlq.letters(count, stream)

    total, letters = _run(go)
    if as_json:
        for letter in letters:
            print(json.dumps(letter.as_dict()))
        return
    table = Table(title=f"dead letters: {len(letters)} shown of {total}")
    for column in ("dlq id", "stream", "group", "entry id", "deliveries", "dead at", "error"):
        table.add_column(column)
    for lt in letters:
        table.add_row(
            lt.dlq_id, lt.stream, lt.group, lt.entry_id, str(lt.deliveries), _time(lt.dead_ms),
            lt.error[:80],
        )  # fmt: skip
    out.print(table)


@dlq_app.command("replay")
def dlq_replay(
    ids: list[str] = typer.Argument(None, help="Dead-letter ids (as listed); none: all."),
    stream: str | None = typer.Option(None, help="Only dead letters of this source stream."),
) -> None:
    """Append dead letters back to their source streams, then remove them from the DLQ."""

    async def go(redis: Any, keys: Keys) -> int:
        return await DeadLetters(redis, keys.dead_letters).replay(ids or None, stream)

    n = _run(go)
    out.print(f"replayed {n} dead letter(s) into their source streams")


@dlq_app.command("purge")
def dlq_purge(
    ids: list[str] = typer.Argument(None, help="Dead-letter ids; none: all (asks first)."),
    stream: str | None = typer.Option(None, help="Only dead letters of this source stream."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask before purging all."),
) -> None:
    """Delete dead letters for good."""
    if not ids and stream is None and not yes:
        typer.confirm("Purge every dead letter?", abort=True)

    async def go(redis: Any, keys: Keys) -> int:
        return await DeadLetters(redis, keys.dead_letters).purge(ids or None, stream)

    n = _run(go)
    out.print(f"purged {n} dead letter(s)")


@app.command()
def consumers(
    as_json: bool = typer.Option(False, "--json", help="JSON instead of a table."),
) -> None:
    """Consumer groups and consumers of the job stream, as Redis sees them (every process)."""

    async def go(redis: Any, keys: Keys) -> list[dict[str, Any]]:
        return await group_status(redis, keys.jobs)

    groups = _run(go)
    if as_json:
        print(json.dumps(groups))
        return
    table = Table(title="consumer groups")
    for column in ("stream", "group", "consumer", "pending", "idle", "lag"):
        table.add_column(column)
    for g in groups:
        table.add_row(g["stream"], g["group"], "", str(g["pending"]), "", str(g["lag"]))
        for c in g["consumers"]:
            table.add_row("", "", c["name"], str(c["pending"]), f"{c['idle_ms'] / 1000:.1f}s", "")
    out.print(table)


keys_app = typer.Typer(help="Create, list and revoke API keys (stored hashed in Redis).")
app.add_typer(keys_app, name="keys")


def _auth(redis: Any, keys: Keys) -> Any:
    from tokenbridge.gateway.auth import Auth

    return Auth(redis, keys, load_settings())


@keys_app.command("create")
def keys_create(name: str = typer.Option("cli", help="A label to tell keys apart.")) -> None:
    """Make a new API key; it is printed once and only its digest is kept."""

    async def go(redis: Any, keys: Keys) -> tuple[str, str]:
        created: tuple[str, str] = await _auth(redis, keys).create_key(name)
        return created

    key_id, key = _run(go)
    out.print(f"created key {key_id} ({name}); shown once, keep it:")
    print(key)


@keys_app.command("list")
def keys_list() -> None:
    """Key ids and labels (never the keys)."""

    async def go(redis: Any, keys: Keys) -> list[dict[str, Any]]:
        listed: list[dict[str, Any]] = await _auth(redis, keys).list_keys()
        return listed

    table = Table(title="API keys")
    for column in ("id", "name", "created"):
        table.add_column(column)
    for row in _run(go):
        created = _time(row["created_ms"]) if "created_ms" in row else ""
        table.add_row(row["id"], row["name"], created)
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="The id shown by `keys list`.")) -> None:
    """Revoke a stored key at once, on every gateway."""

    async def go(redis: Any, keys: Keys) -> bool:
        revoked: bool = await _auth(redis, keys).revoke_key(key_id)
        return revoked

    if not _run(go):
        raise ConfigurationError(f"no stored key with id {key_id} (see `tokenbridge keys list`)")
    out.print(f"revoked key {key_id}")
