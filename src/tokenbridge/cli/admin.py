"""Admin commands: ``dlq list|replay|purge``, ``consumers``, ``keys create|list|revoke``,
``login-link``; through a gateway (``--url``/``--api-key``) or on Redis (``--redis-url``),
see ``cli/target.py``."""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Sequence
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from tokenbridge.cli.app import app
from tokenbridge.cli.local import DataDir
from tokenbridge.cli.target import API_KEY, DEFAULT_URL, REDIS_URL, URL, GatewayTarget, target
from tokenbridge.consumers.dead_letters import DeadLetters
from tokenbridge.exceptions import ConfigurationError
from tokenbridge.gateway.overview import consumer_groups
from tokenbridge.settings import load_settings
from tokenbridge.wire.keys import Keys

dlq_app = typer.Typer(help="List, replay and purge dead-lettered entries.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")
keys_app = typer.Typer(help="Create, list and revoke API keys (stored hashed in Redis).")
app.add_typer(keys_app, name="keys")
out = Console()


def _time(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    out.print(table)


def _selection(ids: list[str] | None, stream: str | None) -> dict[str, Any]:
    if ids:
        return {"ids": ids}
    if stream is not None:
        return {"stream": stream}
    return {"all": True}


@dlq_app.command("list")
def dlq_list(
    count: int = typer.Option(50, help="How many, oldest first."),
    stream: str | None = typer.Option(None, help="Only dead letters of this source stream."),
    as_json: bool = typer.Option(False, "--json", help="JSON lines instead of a table."),
    url: str | None = URL,
    api_key: str | None = API_KEY,
    redis_url: str | None = REDIS_URL,
) -> None:
    """Show dead letters: source, original id, deliveries, error."""
    where = target(url, api_key, redis_url)
    if isinstance(where, GatewayTarget):
        body = where.call("GET", "/v1/admin/dead-letters", limit=count, stream=stream)
    else:

        async def go(redis: Any, keys: Keys) -> dict[str, Any]:
            dlq = DeadLetters(redis, keys.dead_letters)
            letters = await dlq.letters(count, stream)
            return {"count": await dlq.count(), "letters": [lt.as_dict() for lt in letters]}

        body = where.run(go)
    if as_json:
        for letter in body["letters"]:
            print(json.dumps(letter))
        return
    rows = [
        (lt["dlq_id"], lt["stream"], lt["group"], lt["entry_id"], str(lt["deliveries"]),
         _time(lt["dead_ms"]), lt["error"][:80])
        for lt in body["letters"]
    ]  # fmt: skip
    columns = ("dlq id", "stream", "group", "entry id", "deliveries", "dead at", "error")
    _print_table(f"dead letters: {len(rows)} shown of {body['count']}", columns, rows)


def _dlq_action(action: str, chosen: dict[str, Any], where: Any) -> int:
    if isinstance(where, GatewayTarget):
        body = where.call("POST", f"/v1/admin/dead-letters/{action}", chosen)
        return int(body["replayed" if action == "replay" else "purged"])

    async def go(redis: Any, keys: Keys) -> int:
        dlq = DeadLetters(redis, keys.dead_letters)
        method = dlq.replay if action == "replay" else dlq.purge
        return await method(chosen.get("ids"), chosen.get("stream"))

    n: int = where.run(go)
    return n


@dlq_app.command("replay")
def dlq_replay(
    ids: list[str] = typer.Argument(None, help="Dead-letter ids (as listed); none: all."),
    stream: str | None = typer.Option(None, help="Only dead letters of this source stream."),
    url: str | None = URL,
    api_key: str | None = API_KEY,
    redis_url: str | None = REDIS_URL,
) -> None:
    """Append dead letters back to their source streams, then remove them from the DLQ."""
    n = _dlq_action("replay", _selection(ids, stream), target(url, api_key, redis_url))
    out.print(f"replayed {n} dead letter(s) into their source streams")


@dlq_app.command("purge")
def dlq_purge(
    ids: list[str] = typer.Argument(None, help="Dead-letter ids; none: all (asks first)."),
    stream: str | None = typer.Option(None, help="Only dead letters of this source stream."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask before purging all."),
    url: str | None = URL,
    api_key: str | None = API_KEY,
    redis_url: str | None = REDIS_URL,
) -> None:
    """Delete dead letters for good."""
    if not ids and stream is None and not yes:
        typer.confirm("Purge every dead letter?", abort=True)
    n = _dlq_action("purge", _selection(ids, stream), target(url, api_key, redis_url))
    out.print(f"purged {n} dead letter(s)")


@app.command()
def consumers(
    as_json: bool = typer.Option(False, "--json", help="JSON instead of a table."),
    url: str | None = URL,
    api_key: str | None = API_KEY,
    redis_url: str | None = REDIS_URL,
) -> None:
    """Consumer groups of the job and pipeline streams, as Redis sees them (every process)."""
    where = target(url, api_key, redis_url)
    if isinstance(where, GatewayTarget):
        groups = where.call("GET", "/v1/admin/consumers")["groups"]
    else:
        shards = where.settings.pipeline_shards
        groups = where.run(lambda redis, keys: consumer_groups(redis, keys, shards))
    if as_json:
        print(json.dumps(groups))
        return
    rows = []
    for g in groups:
        oldest = g.get("oldest_pending_ms")
        age = "" if oldest is None else f"{oldest / 1000:.1f}s"
        rows.append((g["stream"], g["group"], "", str(g["pending"]), "", str(g["lag"]), age))
        for c in g["consumers"]:
            idle = f"{c['idle_ms'] / 1000:.1f}s"
            rows.append(("", "", c["name"], str(c["pending"]), idle, "", ""))
    columns = ("stream", "group", "consumer", "pending", "idle", "lag", "oldest pending")
    _print_table("consumer groups", columns, rows)


def _auth(redis: Any, keys: Keys) -> Any:
    from tokenbridge.gateway.auth import Auth

    return Auth(redis, keys, load_settings())


@keys_app.command("create")
def keys_create(
    name: str = typer.Option("cli", help="A label to tell keys apart."),
    url: str | None = URL,
    api_key: str | None = API_KEY,
    redis_url: str | None = REDIS_URL,
) -> None:
    """Make a new API key; it is printed once and only its digest is kept."""
    where = target(url, api_key, redis_url)
    if isinstance(where, GatewayTarget):
        body = where.call("POST", "/v1/admin/keys", {"name": name})
        key_id, key = body["id"], body["key"]
    else:

        async def go(redis: Any, keys: Keys) -> tuple[str, str]:
            created: tuple[str, str] = await _auth(redis, keys).create_key(name)
            return created

        key_id, key = where.run(go)
    out.print(f"created key {key_id} ({name}); shown once, keep it:")
    print(key)


@keys_app.command("list")
def keys_list(
    url: str | None = URL,
    api_key: str | None = API_KEY,
    redis_url: str | None = REDIS_URL,
) -> None:
    """Key ids and labels (never the keys)."""
    where = target(url, api_key, redis_url)
    if isinstance(where, GatewayTarget):
        rows = where.call("GET", "/v1/admin/keys")["keys"]
    else:
        rows = where.run(lambda redis, keys: _auth(redis, keys).list_keys())
    listed = [
        (row["id"], row["name"], _time(row["created_ms"]) if "created_ms" in row else "")
        for row in rows
    ]
    _print_table("API keys", ("id", "name", "created"), listed)


@keys_app.command("revoke")
def keys_revoke(
    key_id: str = typer.Argument(..., help="The id shown by `keys list`."),
    url: str | None = URL,
    api_key: str | None = API_KEY,
    redis_url: str | None = REDIS_URL,
) -> None:
    """Revoke a stored key at once, on every gateway."""
    where = target(url, api_key, redis_url)
    if isinstance(where, GatewayTarget):
        where.call("DELETE", f"/v1/admin/keys/{key_id}")
    elif not where.run(lambda redis, keys: _auth(redis, keys).revoke_key(key_id)):
        raise ConfigurationError(f"no stored key with id {key_id} (see `tokenbridge keys list`)")
    out.print(f"revoked key {key_id}")


@app.command("login-link")
def login_link(
    url: str | None = URL,
    api_key: str | None = API_KEY,
    redis_url: str | None = REDIS_URL,
) -> None:
    """Print a fresh one-time link that signs a browser in to the chat page and dashboard."""
    where = target(url, api_key, redis_url)
    if isinstance(where, GatewayTarget):
        print(where.call("POST", "/v1/admin/login-link")["url"])
        return
    code = where.run(lambda redis, keys: _auth(redis, keys).login_code())
    base = url or DataDir(where.settings.data_dir).url() or DEFAULT_URL
    print(f"{base.rstrip('/')}/?login={code}")
