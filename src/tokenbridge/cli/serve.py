"""``tokenbridge serve`` (gateway + worker; embedded Redis by default), ``tokenbridge worker``."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

import typer
import uvicorn
from starlette.applications import Starlette

from tokenbridge.cli.app import app
from tokenbridge.cli.local import DataDir, first_key, start_embedded
from tokenbridge.exceptions import ConfigurationError
from tokenbridge.logs import configure_logging
from tokenbridge.runtime import Runtime
from tokenbridge.settings import Settings, load_settings

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


class _Server(uvicorn.Server):
    """uvicorn, plus: drain our connections first on SIGTERM/SIGINT, and say when serving."""

    def __init__(
        self, config: uvicorn.Config, url: str, app: Starlette, send_buffer_bytes: int = 0
    ) -> None:
        super().__init__(config)
        self.app = app
        self.send_buffer_bytes = send_buffer_bytes
        self.public_url = url
        self._loop: asyncio.AbstractEventLoop | None = None
        self.data_dir: DataDir | None = None

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self.should_exit:
            return
        from tokenbridge.gateway.client_connection import cap_send_buffers

        listening = (sock for server in self.servers for sock in server.sockets)
        cap_send_buffers(listening, self.send_buffer_bytes)  # bounds slow clients in bytes
        login = await self._credentials()
        print(f"tokenbridge serving at {self.public_url}", flush=True)
        if login:
            print(f"open {self.public_url}?login={login} (one-time login link)", flush=True)

    async def _credentials(self) -> str | None:
        """Closed by default: with no API key anywhere, make one and show it once."""
        gateway = getattr(self.app.state, "gateway", None)
        if gateway is None or gateway.auth.disabled:
            return None
        auth = gateway.auth
        await first_key(auth, self.data_dir)  # cli/local.py: made once, kept in the data dir
        if self.data_dir is not None:
            self.data_dir.save_url(self.public_url)
        code: str = await auth.login_code()
        return code

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Like uvicorn's, without re-raising the signal after a graceful shutdown: that would
        kill this process before the embedded Redis is stopped and exit 143 instead of 0."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: Any) -> None:
        # Open SSE streams would hold uvicorn's shutdown hostage: drain first (the app's
        # `drain`: refuse new requests with 503 `draining`, close open streams with
        # `shutdown`, stop the worker taking jobs); clients resume on another node from their
        # Last-Event-ID. uvicorn then stops listening and runs the lifespan shutdown.
        drain = getattr(self.app.state, "drain", None)
        if drain is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(drain)
        super().handle_exit(sig, frame)


def _loopback_unless_keys(settings: Settings) -> None:
    """The zero-config default generates its own key: then it listens on loopback only."""
    generated = not settings.api_keys and settings.redis_url is None
    if generated and not settings.auth_disabled and settings.host not in _LOOPBACK:
        raise ConfigurationError(
            f"TOKENBRIDGE_HOST={settings.host}: with the embedded Redis and no "
            "TOKENBRIDGE_API_KEYS, serve generates its own key and listens on loopback only; "
            "set TOKENBRIDGE_API_KEYS to serve on other addresses"
        )


@app.command()
def serve(
    host: str | None = typer.Option(None, help="Bind address (TOKENBRIDGE_HOST)."),
    port: int | None = typer.Option(None, help="Port (TOKENBRIDGE_PORT)."),
    worker: bool | None = typer.Option(
        None, "--worker/--no-worker", help="Run a generation worker in this process."
    ),
    processors: bool | None = typer.Option(
        None,
        "--processors/--no-processors",
        help="Run the processor pipeline in this process (TOKENBRIDGE_RUN_PROCESSORS).",
    ),
    log_level: str = typer.Option("info", help="debug, info, warning or error."),
    log_json: bool = typer.Option(False, "--log-json", help="Log JSON lines."),
    data_dir: str | None = typer.Option(
        None,
        "--data-dir",
        help="Keep the embedded Redis's data here (TOKENBRIDGE_DATA_DIR; default: the "
        "platform's user data directory).",
    ),
    ephemeral: bool = typer.Option(
        False, "--ephemeral", help="Embedded Redis in a temporary directory: nothing is kept."
    ),
) -> None:
    """Run the gateway and a generation worker; with no Redis configured, an embedded one."""
    configure_logging(log_level, log_json)
    overrides: dict[str, Any] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    if worker is not None:
        overrides["run_worker"] = worker
    if processors is not None:
        overrides["run_processors"] = processors
    settings = load_settings(**overrides)
    _loopback_unless_keys(settings)
    from tokenbridge.gateway.app import create_app
    from tokenbridge.gateway.websocket import uvicorn_options

    with contextlib.ExitStack() as stack:
        where = None
        if settings.redis_url is None:  # cli/local.py: persistent unless --ephemeral
            settings, _, where = start_embedded(settings, stack, data_dir, ephemeral)
        application = create_app(settings)
        config = uvicorn.Config(
            application,
            host=settings.host,
            port=settings.port,
            lifespan="on",
            log_config=None,
            timeout_graceful_shutdown=max(1, int(settings.shutdown_drain_s)),
            **uvicorn_options(settings),
        )
        shown_host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
        url = f"http://{shown_host}:{settings.port}/"
        server = _Server(config, url, application, settings.connection_send_buffer_bytes)
        server.data_dir = where
        server.run()
        if not server.started:
            sys.exit(1)


@app.command()
def worker(
    generations: bool = typer.Option(
        True, "--generations/--no-generations", help="Run generation jobs in this process."
    ),
    processors: bool | None = typer.Option(
        None,
        "--processors/--no-processors",
        help="Run the processor pipeline in this process (TOKENBRIDGE_RUN_PROCESSORS).",
    ),
    log_level: str = typer.Option("info", help="debug, info, warning or error."),
    log_json: bool = typer.Option(False, "--log-json", help="Log JSON lines."),
) -> None:
    """Run generation workers (and the processor pipeline) against TOKENBRIDGE_REDIS_URL."""
    configure_logging(log_level, log_json)
    settings = load_settings()
    if settings.redis_url is None:
        raise ConfigurationError(
            "TOKENBRIDGE_REDIS_URL is not set: a worker joins the Redis that a gateway uses; "
            "set it to that server's URL"
        )
    run_processors = settings.run_processors if processors is None else processors
    if not generations and not run_processors:
        raise ConfigurationError(
            "--no-generations with the processors off leaves this worker nothing to do; "
            "drop --no-generations, or pass --processors"
        )
    asyncio.run(_run_worker(settings, generations, run_processors))


async def _run_worker(settings: Settings, generations: bool, processors: bool) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with Runtime(settings, worker=generations, processors=processors) as runtime:
        part = runtime.worker or runtime.processor
        assert part is not None
        print(f"tokenbridge worker {part.name} ready", flush=True)
        await stop.wait()
