"""Zero-config `serve` keeps its state in a data directory; `login-link` and the admin CLI find
the local server there with no configuration."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from pathlib import Path

import httpx

from tests.servers import GatewayProcess
from tests.sse_client import read_events
from tests.test_cli import clean_env, run_cli

KEY_LINE = re.compile(r"API key (\w+) \(shown once, keep it\): (tbk_\S+)")


async def session_events(http: httpx.AsyncClient, key: str, session_id: str) -> list[str]:
    """The kinds of the session's events, from the start to its first terminal event."""
    kinds: list[str] = []
    url = f"/v1/sessions/{session_id}/events?token={key}"
    async with asyncio.timeout(20), contextlib.aclosing(read_events(http, url)) as events:
        async for event in events:
            kinds.append(event.event)
            if event.event in ("end", "error"):
                break
    return kinds


async def start_serve(data_dir: Path) -> tuple[GatewayProcess, str]:
    """`tokenbridge serve --data-dir` with no Redis configured; returns it and its output so far."""
    serve = GatewayProcess({}, args=["serve", "--data-dir", str(data_dir)])
    serve.args += ["--port", str(serve.port)]
    serve.env = clean_env()
    serve.start()
    assert serve.process is not None and serve.process.stdout is not None
    stdout = serve.process.stdout
    seen: list[str] = []
    async with asyncio.timeout(30):
        while not any(line.startswith("open http") for line in seen):
            line = (await asyncio.to_thread(stdout.readline)).decode()
            assert line, f"serve exited early: {''.join(seen)}"
            seen.append(line)
    return serve, "".join(seen)


async def test_restart_on_the_same_data_dir_accepts_the_first_key(tmp_path: Path) -> None:
    first, output = await start_serve(tmp_path)
    try:
        found = KEY_LINE.search(output)
        assert found, output
        key = found.group(2)
        async with httpx.AsyncClient(base_url=first.url, timeout=30) as http:
            headers = {"authorization": f"Bearer {key}"}
            assert (await http.get("/v1/admin/keys", headers=headers)).status_code == 200
            started = await http.post(
                "/v1/generations",
                headers=headers,
                json={"model": "demo", "prompt": "kept", "params": {"max_tokens": 5, "rate": 0}},
            )
            assert started.status_code == 202, started.text
            session_id = started.json()["session_id"]
            before = await session_events(http, key, session_id)
            assert before[-1] == "end"
            # A second serve on the same directory is refused in one clear line.
            code, out, err = await run_cli(
                "serve", "--data-dir", str(tmp_path), "--port", "0", env=clean_env()
            )
            assert code == 1 and "another `tokenbridge serve` uses the data directory" in err
    finally:
        first.stop()
    assert (tmp_path / "redis" / "appendonlydir").is_dir()

    second, output = await start_serve(tmp_path)
    try:
        assert "shown once" not in output, output  # the key was made once, at the first start
        assert "kept in" in output
        async with httpx.AsyncClient(base_url=second.url, timeout=30) as http:
            response = await http.get("/v1/models", headers={"authorization": f"Bearer {key}"})
            assert response.status_code == 200, response.text
            # The session written before the restart is still there, event for event.
            assert await session_events(http, key, session_id) == before

            # `login-link` finds the local serve (URL and key) in the data directory.
            env = clean_env(TOKENBRIDGE_DATA_DIR=str(tmp_path))
            code, out, err = await run_cli("login-link", env=env)
            assert code == 0, err
            link = out.strip()
            assert link.startswith(second.url + "/?login="), link
            used = await http.get(link)
            assert used.status_code == 303 and "tb_console" in used.headers["set-cookie"]
            again = await http.get(link)  # a used link: a page that says what to do
            assert again.status_code == 401
            assert again.headers["content-type"].startswith("text/html")
            assert "tokenbridge login-link" in again.text

            code, out, err = await run_cli("keys", "list", env=env)
            assert code == 0 and "default" in out, err
    finally:
        second.stop()


async def test_default_data_dir_is_the_user_data_dir() -> None:
    """No --data-dir: the platform's user data directory (here XDG_DATA_HOME, which the test
    session points at a temporary directory)."""
    serve = GatewayProcess({}, args=["serve"])
    serve.args += ["--port", str(serve.port)]
    serve.env = clean_env()
    serve.start()
    try:
        await serve.wait_ready()
        expected = Path(os.environ["XDG_DATA_HOME"]) / "tokenbridge"
        assert (expected / "redis").is_dir() and (expected / "api_key").is_file()
        assert (expected / "api_key").stat().st_mode & 0o077 == 0  # the user's only
    finally:
        serve.stop()
