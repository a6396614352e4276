"""The ``tokenbridge`` command: serve, worker, generate, config, admin, stats, bench.

A :class:`TokenBridgeError` is printed as one red line and exits 1; ``--debug`` shows the
traceback. Settings come from flags, then ``TOKENBRIDGE_*`` variables, then ``--config FILE``.
"""

from __future__ import annotations

import sys

import typer

from tokenbridge.cli.app import app, err, state
from tokenbridge.exceptions import TokenBridgeError

__all__ = ["app", "main"]


def _register() -> None:
    from tokenbridge.cli import admin, bench, config, generate, serve, stats  # noqa: F401


def main() -> None:
    """Entry point: run the CLI, turning expected errors into one red line and exit code 1."""
    _register()
    try:
        app(standalone_mode=False)
    except TokenBridgeError as exc:
        if state["debug"]:
            raise
        err.print(f"[red]{type(exc).__name__}: {exc}[/red]", highlight=False)
        sys.exit(1)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except Exception as exc:  # click usage errors carry their own exit code
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
