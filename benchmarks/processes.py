"""The processes a benchmark run starts, their CPU figures, and the machine they run on.

Every child gets its own session (a Ctrl-C in the terminal reaches only the bench, which then
stops its children in order) and, on Linux, ``PR_SET_PDEATHSIG`` (a SIGKILLed bench never
leaves one behind). Stopping is by PID: SIGTERM, then SIGKILL after a deadline. A child's
stdout is drained by a thread into a bounded buffer, so that a chatty child never blocks on a
full pipe, and its readiness is a line it prints, not a sleep.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

__all__ = [
    "FLOOR_READY",
    "ROOT",
    "Child",
    "FloorRelayProcess",
    "GatewayProcess",
    "ServerProcess",
    "free_port",
    "machine_info",
    "new_runner",
    "process_cpu_s",
    "process_rss_bytes",
    "raise_open_files_limit",
    "system_busy_s",
]

ROOT = Path(__file__).resolve().parent.parent
"""The source checkout: children run here, so that ``benchmarks`` is importable."""

_PR_SET_PDEATHSIG = 1
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def raise_open_files_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (thousands of sockets);
    returns the new soft limit. Children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _child_setup() -> None:  # runs in the child between fork and exec: fds, death signal
    raise_open_files_limit()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def process_rss_bytes(pid: int | None) -> int | None:
    """Resident memory of a live process (``VmRSS`` in /proc/<pid>/status); else None."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def process_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of a live process (all its threads), from /proc; else None."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def system_busy_s() -> float | None:
    """CPU seconds all cores spent busy since boot (/proc/stat), to tell others' load apart."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # guest time is already counted in user
    return busy / _CLK_TCK


class Child:
    """A child process with a drained stdout (stderr merged); ``stop()`` is safe to repeat."""

    def __init__(
        self,
        name: str,
        args: list[str],
        env: dict[str, str],
        ready_marker: str | None = None,
        keep_lines: int = 200,
        stdin_pipe: bool = False,
    ) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.ready_marker = ready_marker
        self.stdin_pipe = stdin_pipe
        self.lines: collections.deque[str] = collections.deque(maxlen=keep_lines)
        self.process: subprocess.Popen[str] | None = None
        self._settled = threading.Event()  # the marker was seen, or stdout ended
        self._ready = False
        self._reader: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"<Child {self.name} pid={self.pid}>"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.args,
            env=self.env,
            cwd=ROOT,
            stdin=subprocess.PIPE if self.stdin_pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            preexec_fn=_child_setup,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._drain, name=f"drain-{self.name}", daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            if self.ready_marker is not None and self.ready_marker in line:
                self._ready = True
                self._settled.set()
        self._settled.set()

    def send_line(self, line: str) -> None:
        """Write one line to the child's stdin (``stdin_pipe=True``)."""
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def output(self, last: int = 20) -> str:
        return "\n".join(list(self.lines)[-last:])

    async def wait_ready(self, timeout_s: float) -> None:
        """Wait for the ready line; raise with the child's last output if it never comes."""
        settled = await asyncio.to_thread(self._settled.wait, timeout_s)
        if not settled or not self._ready:
            why = "did not get ready" if not settled else "exited before it was ready"
            raise RuntimeError(f"{self.name} {why} within {timeout_s}s:\n{self.output()}")

    async def wait_exit(self, timeout_s: float) -> int:
        """Wait for the child to exit on its own; raise (after stopping it) past the deadline."""
        assert self.process is not None
        try:
            code = await asyncio.to_thread(self.process.wait, timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            raise RuntimeError(f"{self.name} did not finish within {timeout_s}s") from None
        if self._reader is not None:
            await asyncio.to_thread(self._reader.join, 5)
        return code

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``; then close the pipe."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=timeout_s)
        if self._reader is not None:
            self._reader.join(timeout=5)
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


class ServerProcess(Child):
    """A child serving HTTP on ``host``:``port`` (a free port): what the clients read from."""

    def __init__(
        self, name: str, args: list[str], env: dict[str, str], port: int, ready: str
    ) -> None:
        self.port = port
        super().__init__(name, args, env, ready_marker=ready)

    @property
    def host(self) -> str:
        return "127.0.0.1"


class GatewayProcess(ServerProcess):
    """``python -m tokenbridge serve --no-worker --no-processors`` on a free port."""

    def __init__(self, redis_url: str) -> None:
        port = free_port()
        # Delivery is measured, not auth: the clients read sessions by id without tokens
        # (checking a token is once per connection, not per token).
        env = {
            **os.environ,
            "TOKENBRIDGE_REDIS_URL": redis_url,
            "PYTHONUNBUFFERED": "1",
            "TOKENBRIDGE_AUTH_DISABLED": "true",
        }
        # Every client is on 127.0.0.1, and the connection scenarios hold thousands of them:
        # lift the per-address and per-session limits unless the environment sets them.
        for name in ("PER_ADDRESS", "PER_SESSION"):
            env.setdefault(f"TOKENBRIDGE_LIMITS_MAX_CONNECTIONS_{name}", "1000000")
        env.setdefault("TOKENBRIDGE_LIMITS_MAX_CONNECTIONS", "1000000")
        args = [sys.executable, "-m", "tokenbridge", "serve", "--port", str(port)]
        profile = os.environ.get("BENCH_GATEWAY_PROFILE")  # a path: cProfile the gateway
        if profile:
            args[1:1] = ["-m", "cProfile", "-o", profile]
        # Delivery only: the processors get a scenario and a process of their own (pipeline).
        args += ["--no-worker", "--no-processors", "--log-level", "warning"]
        super().__init__("gateway", args, env, port, "tokenbridge serving at")


FLOOR_READY = "floor relay serving"
"""The line ``python -m benchmarks.floor_relay`` prints once it listens."""


class FloorRelayProcess(ServerProcess):
    """``python -m benchmarks.floor_relay`` on a free port: the minimal Python relay that
    scenario ``live-floor`` measures in the gateway's place."""

    def __init__(self, redis_url: str) -> None:
        port = free_port()
        env = {**os.environ, "TOKENBRIDGE_REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1"}
        args = [sys.executable, "-m", "benchmarks.floor_relay", "--port", str(port)]
        args += ["--redis-url", redis_url]
        super().__init__("floor relay", args, env, port, FLOOR_READY)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loop_stack() -> str:
    """What uvicorn's ``auto`` picks in the gateway: uvloop and httptools when installed."""
    parts = []
    for module, fallback in (("uvloop", "asyncio"), ("httptools", "h11")):
        try:
            __import__(module)
            parts.append(module)
        except ImportError:
            parts.append(fallback)
    return " + ".join(parts)


def machine_info(redis_version: str) -> list[tuple[str, str]]:
    """Rows describing the machine and the software under test."""
    import redis as redis_py

    overrides = sorted(k for k in os.environ if k.startswith("TOKENBRIDGE_"))
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    return [
        ("CPU", _cpu_model()),
        ("cores", f"{cores} ({usable} usable by this process)"),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("Redis server", redis_version),
        ("redis-py", redis_py.__version__),
        ("gateway loop / HTTP", _loop_stack()),
        ("gateway settings", ", ".join(overrides) + " from env" if overrides else "defaults"),
        ("OS", f"{platform.system()} {platform.release()}"),
    ]


def new_runner() -> asyncio.Runner:
    """An asyncio runner on uvloop when installed (it comes with uvicorn[standard])."""
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)
