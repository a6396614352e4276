"""The ``tokenbridge`` Typer app and its shared console, imported by every subcommand module
(kept apart from ``cli/__init__.py``, which imports the subcommands: no import circle)."""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console

__all__ = ["app", "err", "state"]

app = typer.Typer(
    name="tokenbridge",
    help="Carry LLM output from workers to users through Redis Streams, with exact resume.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, soft_wrap=True)  # one error, one line, whatever the width
state: dict[str, Any] = {"debug": False}


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks of expected errors."),
) -> None:
    state["debug"] = debug
