"""The benchmark harness still runs end to end: a short ``sessions-live`` and ``live-floor``
over SSE and WebSocket, on its own embedded Redis and gateway process. Figures are not
checked (speed is measured by the benchmark command, not asserted); that every token reaches
every reader is (the harness fails a scenario that does not finish). A change to the wire
between producers and gateways that breaks a writer the tests do not use was caught only by
this run once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_short_live_sessions_run_finishes() -> None:
    args = [sys.executable, "-m", "benchmarks", "--scenarios", "sessions-live,live-floor"]
    args += ["--live-sessions", "20", "--live-transports", "sse,ws", "--duration", "2"]
    args += ["--timeout", "60"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "did not finish" not in output, output[-4000:]
    assert "8f. floor" in output and "8. live, 20 sessions" in output, output[-4000:]
