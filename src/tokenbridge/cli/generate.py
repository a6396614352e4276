"""``tokenbridge generate "prompt"``: start a generation on a running server, print its tokens."""

from __future__ import annotations

import sys
from typing import Any

import typer

from tokenbridge.cli.app import app, err
from tokenbridge.exceptions import (
    APIConnectionError,
    AuthenticationError,
    ConfigurationError,
    PermissionDenied,
)


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The prompt."),
    url: str = typer.Option(
        "http://127.0.0.1:8000", envvar="TOKENBRIDGE_URL", help="The gateway's URL."
    ),
    model: str = typer.Option("demo", help="Model name from the server's model table."),
    session: str | None = typer.Option(None, help="Continue this session id."),
    max_tokens: int | None = typer.Option(None, help="params.max_tokens"),
    rate: float | None = typer.Option(None, help="params.rate (demo model: tokens/s)."),
    api_key: str | None = typer.Option(
        None, envvar="TOKENBRIDGE_API_KEY", help="API key (serve prints one when it makes it)."
    ),
) -> None:
    """Print the answer as it streams, resuming by itself if the connection drops."""
    params: dict[str, Any] = {}
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    if rate is not None:
        params["rate"] = rate
    try:
        code = _generate(url, prompt, model, session, params, api_key)
    except AuthenticationError as exc:
        if api_key:
            raise ConfigurationError(
                f"--api-key / TOKENBRIDGE_API_KEY: {url} refused the key ({exc}); "
                "use a key this server knows (`tokenbridge keys create` makes one)"
            ) from None
        raise ConfigurationError(
            f"{url} needs an API key: pass --api-key or set TOKENBRIDGE_API_KEY (serve "
            "prints one at its first start; `tokenbridge keys create` makes another)"
        ) from None
    except APIConnectionError as exc:
        raise APIConnectionError(f"--url / TOKENBRIDGE_URL: {exc}") from None
    except PermissionDenied as exc:
        raise ConfigurationError(
            f"--api-key / TOKENBRIDGE_API_KEY: the key may not do this on {url} ({exc})"
        ) from None
    sys.exit(code)


def _generate(
    url: str,
    prompt: str,
    model: str,
    session: str | None,
    params: dict[str, Any],
    api_key: str | None,
) -> int:
    from tokenbridge.client import TokenBridgeClient

    with TokenBridgeClient(url, api_key=api_key) as client:
        started = client.start_generation(prompt, model=model, session_id=session, params=params)
        err.print(f"session {started.session_id} generation {started.generation_id}", style="dim")
        for event in client.stream(started):
            if event.event == "token":
                sys.stdout.write(event.data["text"])
                sys.stdout.flush()
            elif event.event == "gap":
                err.print(f"\n[yellow]history lost: {event.data['reason']}[/yellow]")
            elif event.event == "error":
                err.print(
                    f"\n[red]error {event.data['code']}: {event.data['message']}[/red]",
                    highlight=False,
                )
                return 1
            elif event.event == "end":
                sys.stdout.write("\n")
                err.print(
                    f"{event.data['tokens']} tokens, reason {event.data['reason']}, "
                    f"{client.reconnects} reconnect(s)",
                    style="dim",
                )
        return 0
