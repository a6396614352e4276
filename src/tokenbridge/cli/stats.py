"""``tokenbridge stats``: analytics and processor figures of every process, through a gateway
(``--url``/``--api-key``) or from Redis (``--redis-url``), see ``cli/target.py``."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from tokenbridge.cli.app import app
from tokenbridge.cli.target import API_KEY, REDIS_URL, URL, GatewayTarget, target
from tokenbridge.exceptions import ConfigurationError
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


async def _collect(redis: Any, keys: Keys, shards: int, session: str | None) -> dict[str, Any]:
    """What ``GET /v1/stats`` (or ``/v1/sessions/{id}/stats``) answers, read from Redis."""
    if session is not None:
        found = await read_session_stats(redis, keys, session)
        if found is None:
            raise ConfigurationError(f"no analytics recorded for session {session}")
        return found
    body = await read_stats(redis, keys)
    body["processors"] = (await read_processor_stats(redis, keys))["processors"]
    body["pipeline"] = await read_pipeline_status(redis, keys, shards)
    return body


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
    url: str | None = URL,
    api_key: str | None = API_KEY,
    redis_url: str | None = REDIS_URL,
) -> None:
    """Generations, tokens, TTFT, tokens/s, errors per model and in total; processor health."""
    if session is not None:
        validate_id(session)
    where = target(url, api_key, redis_url)
    if isinstance(where, GatewayTarget):
        path = "/v1/stats" if session is None else f"/v1/sessions/{session}/stats"
        body = where.call("GET", path)
    else:
        shards = where.settings.pipeline_shards
        body = where.run(lambda redis, keys: _collect(redis, keys, shards, session))
    if as_json:
        print(json.dumps(body))
    elif session is not None:
        _show_session(body)
    else:
        _show_totals(body)
