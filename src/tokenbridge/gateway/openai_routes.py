"""The OpenAI-compatible routes, registered by ``create_app`` with one line."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tokenbridge.gateway import encodings, openai_chat, openai_responses
from tokenbridge.gateway.encodings.openai_chat import ChatCompletionsEncoding
from tokenbridge.gateway.encodings.openai_responses import ResponsesEncoding

__all__ = ["routes"]

encodings.register(ChatCompletionsEncoding(), replace=True)
encodings.register(ResponsesEncoding(), replace=True)

Endpoint = Callable[[Request], Awaitable[Response]]


async def _retrieve_or_delete(request: Request) -> Response:
    if request.method == "DELETE":
        return await openai_responses.delete_response(request)
    return await openai_responses.retrieve_response(request)


def routes(stream_endpoint: Callable[[Endpoint], Any]) -> list[Route]:
    """``stream_endpoint`` wraps endpoints that may answer with a long-lived stream."""
    return [
        Route(
            "/v1/chat/completions",
            stream_endpoint(openai_chat.create_chat_completion),
            methods=["POST"],
        ),
        Route(
            "/v1/chat/completions/{completion_id}/stream",
            stream_endpoint(openai_chat.resume_chat_completion),
            methods=["GET"],
        ),
        Route("/v1/responses", stream_endpoint(openai_responses.create_response), methods=["POST"]),
        Route(  # one route for both methods, so that a 405 lists both in Allow
            "/v1/responses/{response_id}",
            stream_endpoint(_retrieve_or_delete),
            methods=["GET", "DELETE"],
        ),
        Route(
            "/v1/responses/{response_id}/cancel",
            openai_responses.cancel_response,
            methods=["POST"],
        ),
    ]
