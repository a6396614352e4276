"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis), with a bounded budget.

Every operation gets examples, coverage cases and random inputs; the run fails on any 5xx, any
response that breaks the schema, or a schema-valid request that is refused. The SSE endpoints are
left out: their 200 is an endless stream (its errors are covered by tests/test_api_errors.py).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.servers import GatewayProcess, RedisServer

KEY = "tbk_fuzz_" + os.urandom(8).hex()


async def test_api_conforms_to_its_openapi_schema(redis_server: RedisServer) -> None:
    gateway = GatewayProcess(
        {
            "TOKENBRIDGE_REDIS_URL": redis_server.url,
            "TOKENBRIDGE_KEY_PREFIX": "fz" + os.urandom(3).hex(),
            "TOKENBRIDGE_AUTH_DISABLED": "false",
            "TOKENBRIDGE_API_KEYS": KEY,
        },
        args=["serve", "--log-level", "warning"],
    )
    gateway.args += ["--port", str(gateway.port)]
    gateway.start()
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or "schemathesis"
    try:
        await gateway.wait_ready()
        done = await asyncio.to_thread(
            subprocess.run,
            [
                cli, "run", f"{gateway.url}/openapi.json",
                "--header", f"Authorization: Bearer {KEY}",
                "--max-examples", "25",
                "--phases", "examples,coverage,fuzzing",
                "--checks", "all",
                "--generation-deterministic",
                "--exclude-path", "/v1/sessions/{session_id}/events",
                "--exclude-path", "/v1/admin/dashboard/events",
                # Each of these starts a generation (seconds of demo tokens, up to
                # max_tokens_limit): tests/test_openai_*.py cover them with the openai SDK.
                "--exclude-path", "/v1/chat/completions",
                "--exclude-path", "/v1/responses",
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )  # fmt: skip
    finally:
        gateway.stop()
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
