"""``tokenbridge stats``: analytics and processor figures from the shared Redis (all processes)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from tokenbridge.cli.app import app
from tokenbridge.exceptions import ConfigurationError, RedisUnavailable
from tokenbridge.settings import Settings, load_settings
from tokenbridge.store.client import REDIS_DOWN_ERRORS, command_client
from tokenbridge.store.stats import (
    read_pipeline_status,
    read_processor_stats,
    read_session_stats,
    read_stats,
)
from tokenbridge.wire.keys import Keys, validate_id

out = Console()

_COLUMNS = (
    ("generations", "generations"),
    ("tokens", "tokens"),
    ("prompt tokens", "prompt_tokens"),
    ("errors", "errors"),
    ("cancels", "cancels"),
    ("cached", "cached"),
    ("TTFT avg ms", "ttft_ms_avg"),
    ("duration avg ms", "duration_ms_avg"),
    ("tokens/s", "tokens_per_s"),
)


async def _collect(settings: Settings, session: str | None) -> dict[str, Any]:
    url = settings.redis_url_value()
    if url is None:
        raise ConfigurationError(
            "TOKENBRIDGE_REDIS_URL is not set: stats are read from the Redis the service uses "
            "(`tokenbridge serve` prints its embedded server's URL)"
        )
    redis = command_client(url, 4, settings.redis_socket_timeout_s)
    keys = Keys(settings.key_prefix)
    try:
        try:
            await redis.ping()
        except REDIS_DOWN_ERRORS as exc:
            raise RedisUnavailable(f"cannot reach Redis at TOKENBRIDGE_REDIS_URL: {exc}") from None
        if session is not None:
            found = await read_session_stats(redis, keys, session)
            if found is None:
                raise ConfigurationError(f"no analytics recorded for session {session}")
            return found
        body = await read_stats(redis, keys)
        body["processors"] = (await read_processor_stats(redis, keys))["processors"]
        body["pipeline"] = await read_pipeline_status(redis, keys, settings.pipeline_shards)
        return body
    finally:
        await redis.aclose()
        await redis.connection_pool.disconnect()


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _figures_table(title: str, rows: dict[str, dict[str, Any]]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("")
    for label, _ in _COLUMNS:
        table.add_column(label, justify="right")
    for name, figures in rows.items():
        table.add_row(name, *(_cell(figures.get(key)) for _, key in _COLUMNS))
    return table


def _show_totals(body: dict[str, Any]) -> None:
    out.print(_figures_table("generations", {"total": body["total"], **body["models"]}))
    processors = Table(title="processors (all processes)", title_justify="left")
    for column in ("processor", "processed", "failed", "dead-lettered", "time s", "last error"):
        processors.add_column(
            column, justify="left" if column in ("processor", "last error") else "right"
        )
    for name, p in sorted(body["processors"].items()):
        processors.add_row(
            name, _cell(p["processed"]), _cell(p["failed"]), _cell(p["dead_lettered"]),
            f"{p['time_spent_s']:.2f}", str(p.get("last_error", ""))[:60],
        )  # fmt: skip
    out.print(processors)
    shards = Table(title="pipeline streams", title_justify="left")
    for column in ("stream", "length", "pending", "lag", "lost"):
        shards.add_column(column, justify="left" if column == "stream" else "right")
    for row in body["pipeline"]:
        shards.add_row(
            row["stream"], _cell(row["length"]), _cell(row["pending"]), _cell(row["lag"]),
            _cell(row["lost"]),
        )  # fmt: skip
    out.print(shards)


def _show_session(body: dict[str, Any]) -> None:
    out.print(_figures_table(f"session {body['session_id']}", {"total": body["total"]}))
    table = Table(title="generations (newest first)", title_justify="left")
    columns = ("generation", "model", "outcome", "tokens", "TTFT ms", "duration ms", "tokens/s")
    for column in columns:
        table.add_column(column, justify="left" if column in columns[:3] else "right")
    for g in body["generations"]:
        table.add_row(
            g["generation_id"], g["model"], g["outcome"] or "running", _cell(g["tokens"]),
            _cell(g["ttft_ms"]), _cell(g["duration_ms"]), _cell(g["tokens_per_s"]),
        )  # fmt: skip
    out.print(table)


@app.command()
def stats(
    session: str | None = typer.Option(None, help="One session's figures and generations."),
    as_json: bool = typer.Option(False, "--json", help="JSON instead of tables."),
) -> None:
    """Generations, tokens, TTFT, tokens/s, errors per model and in total; processor health."""
    if session is not None:
        validate_id(session)
    body = asyncio.run(_collect(load_settings(), session))
    if as_json:
        print(json.dumps(body))
    elif session is not None:
        _show_session(body)
    else:
        _show_totals(body)
