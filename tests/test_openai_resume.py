"""A Chat Completions stream cut mid-answer and resumed on a second gateway process, over raw
sockets: the concatenated content is byte-identical to an uninterrupted run's."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tests.servers import Gateway, GatewayProcess
from tokenbridge.settings import Settings
from tokenbridge.sse_parser import parse_sse

BODY = {
    "model": "demo",
    "messages": [{"role": "user", "content": "tell me about resumable streams"}],
    "max_tokens": 80,
    "stream": True,
    "stream_options": {"include_usage": True},
    "rate": 200,
    "cache": False,  # a real generation each time, not a cache replay
}


class RawStream:
    """An HTTP/1.1 request on a plain socket; the chunked body read as SSE blocks."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.headers: dict[str, str] = {}
        self.buffer = b""

    @classmethod
    async def open(
        cls, url: str, method: str, path: str, headers: dict[str, str], body: bytes = b""
    ) -> RawStream:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        lines = [f"{method} {path} HTTP/1.1", f"host: {host}", f"content-length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        stream = cls(reader, writer)
        status = await reader.readline()
        assert b" 200 " in status, status
        while (line := await reader.readline()) != b"\r\n":
            name, _, value = line.decode().partition(":")
            stream.headers[name.strip().lower()] = value.strip()
        assert stream.headers.get("transfer-encoding") == "chunked"
        return stream

    async def _chunk(self) -> bytes:
        size = int((await self.reader.readline()).strip(), 16)
        data = await self.reader.readexactly(size + 2)
        return data[:-2]

    async def blocks(self) -> Any:
        """Yield (id, data) per SSE block until the body ends; comment lines are skipped."""
        while True:
            while b"\n\n" not in self.buffer:
                chunk = await self._chunk()
                if not chunk:
                    return
                self.buffer += chunk
            block, self.buffer = self.buffer.split(b"\n\n", 1)
            fields = dict(
                line.split(": ", 1)
                for line in block.decode().split("\n")
                if not line.startswith(":")
            )
            yield fields.get("id"), fields.get("data")

    def cut(self) -> None:
        self.writer.transport.abort()  # like a dropped network: no FIN handshake


def _content(datas: list[str]) -> str:
    out = []
    for data in datas:
        if data == "[DONE]":
            continue
        chunk = json.loads(data)
        out.extend(c["delta"].get("content") or "" for c in chunk["choices"])
    return "".join(out)


async def _whole_run(url: str) -> list[str]:
    stream = await RawStream.open(
        url, "POST", "/v1/chat/completions", {"content-type": "application/json"},
        json.dumps(BODY).encode(),
    )  # fmt: skip
    datas = [data async for _, data in stream.blocks() if data is not None]
    stream.writer.close()
    return datas


async def test_cut_stream_resumes_on_another_process(settings: Settings) -> None:
    env = {
        "TOKENBRIDGE_REDIS_URL": settings.redis_url_value() or "",
        "TOKENBRIDGE_KEY_PREFIX": settings.key_prefix,
    }
    second = GatewayProcess(env)
    second.start()
    try:
        async with Gateway(settings) as first, asyncio.timeout(60):
            await second.wait_ready()
            whole = await _whole_run(first.url)

            cut = await RawStream.open(
                first.url, "POST", "/v1/chat/completions", {"content-type": "application/json"},
                json.dumps(BODY).encode(),
            )  # fmt: skip
            resume_url = cut.headers["x-resume-url"]
            head: list[tuple[str, str]] = []
            async for block_id, data in cut.blocks():
                assert block_id is not None and data is not None  # every data block has an id
                head.append((block_id, data))
                if len(head) == 20:  # mid-answer: 19 of 80 tokens
                    break
            cut.cut()

            rest = await RawStream.open(
                second.url, "GET", resume_url, {"last-event-id": head[-1][0]}
            )
            tail = [(i, d) async for i, d in rest.blocks()]
            rest.writer.close()
    finally:
        second.stop()
    datas = [d for _, d in head] + [d for _, d in tail]
    assert all(i is not None for i, _ in tail)
    assert _content(datas) == _content(whole) and len(_content(whole).split()) == 80
    chunks = [json.loads(d) for d in datas if d != "[DONE]"]
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert datas[-1] == "[DONE]" and chunks[-1]["usage"]["completion_tokens"] == 80
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    # the same chunk stream, chunk for chunk, apart from its id and created
    strip = [{**c, "id": "", "created": 0} for c in chunks]
    whole_strip = [{**json.loads(d), "id": "", "created": 0} for d in whole if d != "[DONE]"]
    assert strip == whole_strip


class CuttingProxy:
    """A TCP proxy to a gateway whose open connections can be cut at will (a network drop)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.connections = 0

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> CuttingProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        self.cut()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)  # cut (closed) by __aexit__ whatever happens next
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:  # the gateway is gone: drop the client as a network would
            writer.transport.abort()
            return
        self.writers.append(up_writer)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.ensure_future(self._pipe(src, dst))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.transport.abort()

    def cut(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()


async def test_resume_helper_survives_a_dropped_connection(settings: Settings) -> None:
    from tokenbridge.openai_resume import astream_chat_completion

    async with Gateway(settings) as gw, CuttingProxy(gw.port) as proxy, asyncio.timeout(30):
        whole = await _whole_run(gw.url)
        body = {k: v for k, v in BODY.items() if k != "stream"}
        chunks = []
        async for chunk in astream_chat_completion(proxy.url + "/v1", None, body):
            chunks.append(chunk)
            if len(chunks) == 15:
                proxy.cut()  # mid-answer; the helper resumes through the proxy
    expected = [json.loads(d) for d in whole if d != "[DONE]"]
    assert [{**c, "id": "", "created": 0} for c in chunks] == [
        {**c, "id": "", "created": 0} for c in expected
    ]
    assert len({c["id"] for c in chunks}) == 1
    assert proxy.connections == 2  # the first, cut, and the resume


async def _sse(
    http: Any, method: str, url: str, **kwargs: Any
) -> tuple[Any, list[tuple[str | None, str]]]:
    """(response, [(id, data)]) of a whole SSE answer read with httpx."""
    async with http.stream(method, url, **kwargs) as response:
        blocks = [(m.id, m.data) async for m in parse_sse(response.aiter_lines())]
    return response, blocks


async def test_resume_points_at_the_end_of_a_stream(gateway: Gateway) -> None:
    import httpx

    body = {**BODY, "max_tokens": 5, "rate": 0}
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        first, whole = await _sse(http, "POST", "/v1/chat/completions", json=body)
        url = first.headers["x-resume-url"]
        assert first.headers["content-location"] == url
        finish_id, usage_id, done_id = (str(i) for i, _ in whole[-3:])
        assert usage_id == finish_id + ".1" and done_id == finish_id + ".2"
        # from every id on, the rest of the same stream, byte for byte
        for k, (block_id, _) in enumerate(whole):
            _, rest = await _sse(http, "GET", url, headers={"last-event-id": block_id})
            assert rest == whole[k + 1 :]
        _, replay = await _sse(http, "GET", url)  # no Last-Event-ID: all of it
        assert replay == whole
        epoch, _, entry = str(whole[2][0]).partition(":")
        _, gap = await _sse(http, "GET", url, headers={"last-event-id": f"x{epoch}:{entry}"})
        assert [json.loads(d)["error"]["code"] for _, d in gap[:1]] == ["stream_gap"]
        assert gap[-1][1] == "[DONE]"
        bad = await http.get(url, headers={"last-event-id": "nonsense"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "Last-Event-ID"
        missing = await http.get("/v1/chat/completions/chatcmpl-s_nothing/stream")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "completion_not_found"
