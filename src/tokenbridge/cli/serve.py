"""``tokenbridge serve`` (gateway + worker; embedded Redis by default), ``tokenbridge worker``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import typer
import uvicorn
from redis import exceptions as redis_exc
from starlette.applications import Starlette
from starlette.types import Message, Receive, Scope, Send

from tokenbridge.cli.app import app
from tokenbridge.cli.local import DataDir, first_key, start_embedded
from tokenbridge.cli.process import CLOSE_GRACE_S, StopSignals, bind_socket, probe_redis
from tokenbridge.exceptions import ConfigurationError, RedisUnavailable, TokenBridgeError
from tokenbridge.gateway.asgi3 import coroutine_returning
from tokenbridge.logs import configure_logging
from tokenbridge.runtime import Runtime
from tokenbridge.settings import Settings, load_settings
from tokenbridge.store.embedded import EmbeddedRedis

CONFIG_OPTION = typer.Option(
    None,
    "--config",
    envvar="TOKENBRIDGE_CONFIG",
    help="TOML file of settings and models (TOKENBRIDGE_* variables take precedence).",
    dir_okay=False,
)
MODEL_OPTION = typer.Option(
    None,
    "--model",
    help="Add a model NAME=ADAPTER:MODEL[@BASE_URL], e.g. gpt=openai:gpt-4o-mini (repeatable).",
)
PROCESSORS_OPTION = typer.Option(
    None,
    "--processors/--no-processors",
    help="Run the processor pipeline in this process (TOKENBRIDGE_RUN_PROCESSORS).",
)
LOG_LEVEL_OPTION = typer.Option("info", help="debug, info, warning or error.")
LOG_JSON_OPTION = typer.Option(False, "--log-json", help="Log JSON lines.")

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


class _Server(uvicorn.Server):
    """uvicorn, plus: drain our connections first on SIGTERM/SIGINT, a stop that always ends
    (:class:`StopSignals`), a failed startup kept as one error, and say when serving."""

    def __init__(
        self,
        config: uvicorn.Config,
        url: str,
        app: Starlette,
        lifespan: _StartupErrors,
        drain_s: float,
        send_buffer_bytes: int = 0,
    ) -> None:
        super().__init__(config)
        self.app = app
        self.send_buffer_bytes = send_buffer_bytes
        self.public_url = url
        self.lifespan_errors = lifespan
        self.startup_error: BaseException | None = None
        self.stop_signals = StopSignals(drain_s + CLOSE_GRACE_S, self._graceful)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.data_dir: DataDir | None = None

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await super().startup(sockets)
        except SystemExit:  # uvicorn's way to report a failed lifespan startup
            self.should_exit = True
            self.startup_error = self.lifespan_errors.error
            return
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
        """Unlike uvicorn's, never re-raise the signal after a graceful shutdown: that would
        kill this process before the embedded Redis is stopped and exit 143 instead of 0."""
        self.stop_signals.install()
        try:
            yield
        finally:
            self.stop_signals.restore()

    def _graceful(self, sig: int) -> None:
        # Open SSE streams would hold uvicorn's shutdown hostage: drain first (the app's
        # `drain`: refuse new requests with 503 `draining`, close open streams with
        # `shutdown`, stop the worker taking jobs); clients resume on another node from their
        # Last-Event-ID. uvicorn then stops listening and runs the lifespan shutdown.
        drain = getattr(self.app.state, "drain", None)
        if drain is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(drain)
        self.handle_exit(sig, None)


class _StartupErrors:
    """ASGI wrapper: a TokenBridgeError that fails the lifespan startup is kept (the CLI
    prints it as one line) instead of being logged by uvicorn as a traceback."""

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self.error: BaseException | None = None
        # uvicorn adds "Application startup failed. Exiting.": the CLI's line says it all.
        logging.getLogger("uvicorn.error").addFilter(self._quiet)

    def _quiet(self, record: logging.LogRecord) -> bool:
        return self.error is None or not record.getMessage().startswith("Application startup")

    @coroutine_returning
    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Not a coroutine function: a request's coroutine is the app's own, so every open
        # stream holds one suspended frame less (~260 bytes). Hence interface="asgi3".
        if scope["type"] != "lifespan":
            return self.app(scope, receive, send)
        return self._lifespan(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def quiet(message: Message) -> None:
            # Starlette sends this from inside its `except` block: the error is in flight.
            failed = sys.exc_info()[1]
            if message["type"] == "lifespan.startup.failed" and failed is not None:
                self.error = _one_line(failed)
                if self.error is not None:
                    message = {"type": "lifespan.startup.failed", "message": ""}
            await send(message)

        await self.app(scope, receive, quiet)


def _one_line(exc: BaseException | None) -> TokenBridgeError | None:
    """The expected error a failed startup is, if it is one (else uvicorn logs a traceback).

    The error may be the context of the one raised last (a cancellation while closing)."""
    for _ in range(5):
        if exc is None:
            return None
        if isinstance(exc, TokenBridgeError):
            return exc
        if isinstance(exc, redis_exc.RedisError):  # e.g. an ACL user without a needed command
            return RedisUnavailable(
                f"Redis at TOKENBRIDGE_REDIS_URL refused a command during startup: "
                f"{type(exc).__name__}: {str(exc).rstrip('.')}"
            )
        exc = exc.__cause__ or exc.__context__
    return None


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
    processors: bool | None = PROCESSORS_OPTION,
    config: Path | None = CONFIG_OPTION,
    model: list[str] | None = MODEL_OPTION,
    log_level: str = LOG_LEVEL_OPTION,
    log_json: bool = LOG_JSON_OPTION,
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
    overrides: dict[str, Any] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    if worker is not None:
        overrides["run_worker"] = worker
    if processors is not None:
        overrides["run_processors"] = processors
    settings = load_settings(config, model or (), **overrides)
    _loopback_unless_keys(settings)
    sock = bind_socket(settings)  # before anything starts: a taken port is one line
    probe_redis(settings)
    configure_logging(log_level, log_json)
    from tokenbridge.gateway.app import create_app
    from tokenbridge.gateway.websocket import uvicorn_options
    from tokenbridge.gc_tuning import tune_gc

    with contextlib.ExitStack() as stack:
        stack.callback(sock.close)
        where: DataDir | None = None
        embedded: EmbeddedRedis | None = None
        if settings.redis_url is None:  # cli/local.py: persistent unless --ephemeral
            settings, embedded, where = start_embedded(settings, stack, data_dir, ephemeral)
        application = create_app(settings)
        lifespan = _StartupErrors(application)
        uv_config = uvicorn.Config(
            lifespan,
            lifespan="on",
            log_config=None,
            timeout_graceful_shutdown=max(1, int(settings.shutdown_drain_s)),
            **uvicorn_options(settings),
        )
        bound = sock.getsockname()[1]
        shown_host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
        url = f"http://{shown_host}:{bound}/"
        server = _Server(
            uv_config,
            url,
            application,
            lifespan,
            settings.shutdown_drain_s,
            settings.connection_send_buffer_bytes,
        )
        server.data_dir = where
        if embedded is not None:  # stopped on a forced exit too
            server.stop_signals.cleanups.append(embedded.stop)
        tune_gc()  # gc_tuning.py: no loop-stalling full collections in a reconnect storm
        server.run(sockets=[sock])
        if server.startup_error is not None:
            raise server.startup_error
        if not server.started:
            sys.exit(1)


@app.command()
def worker(
    generations: bool = typer.Option(
        True, "--generations/--no-generations", help="Run generation jobs in this process."
    ),
    processors: bool | None = PROCESSORS_OPTION,
    config: Path | None = CONFIG_OPTION,
    model: list[str] | None = MODEL_OPTION,
    log_level: str = LOG_LEVEL_OPTION,
    log_json: bool = LOG_JSON_OPTION,
) -> None:
    """Run generation workers (and the processor pipeline) against TOKENBRIDGE_REDIS_URL."""
    settings = load_settings(config, model or ())
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
    probe_redis(settings)
    configure_logging(log_level, log_json)
    asyncio.run(_run_worker(settings, generations, run_processors))


async def _run_worker(settings: Settings, generations: bool, processors: bool) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def graceful(sig: int) -> None:
        loop.call_soon_threadsafe(stop.set)

    signals = StopSignals(settings.shutdown_drain_s + CLOSE_GRACE_S, graceful)
    signals.install()
    try:
        async with Runtime(settings, worker=generations, processors=processors) as runtime:
            part = runtime.worker or runtime.processor
            assert part is not None
            print(f"tokenbridge worker {part.name} ready", flush=True)
            await stop.wait()
    finally:
        signals.restore()
