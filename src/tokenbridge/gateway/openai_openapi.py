"""The OpenAI-compatible routes in the OpenAPI document (``/openapi.json``).

Bodies are described as OpenAI's API documents them, loosely (``additionalProperties``: we
accept and ignore sampling knobs our models do not take); docs/openai.md has the table of
what is supported.
"""

from __future__ import annotations

from typing import Any

__all__ = ["openai_components", "openai_paths"]

_REF = "#/components/schemas/{}"
_AUTH: list[dict[str, list[str]]] = [{"bearer": []}, {"apiKeyHeader": []}, {"xApiKeyHeader": []}]


def _json(schema: dict[str, Any], description: str = "ok") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    ref = {"$ref": _REF.format("OpenAIError")}
    return {str(s): _json(ref, "error in OpenAI's shape") for s in statuses}


_SSE: dict[str, Any] = {
    "description": "text/event-stream",
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
}
_MESSAGE = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {"type": ["string", "array", "null"]},
        "tool_calls": {"type": "array"},
        "tool_call_id": {"type": "string"},
        "name": {"type": "string"},
    },
}
_COMMON = {
    "model": {"type": "string", "minLength": 1, "maxLength": 128},
    "stream": {"type": "boolean"},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "minimum": 0, "maximum": 1},
    "seed": {"type": "integer"},
    "user": {"type": "string"},
    "tools": {"type": "array", "description": "function tools only"},
    "tool_choice": {"type": ["string", "object"]},
    "parallel_tool_calls": {"type": "boolean"},
    "rate": {"type": "number", "minimum": 0, "description": "tokenbridge: demo model tokens/s"},
    "cache": {"type": "boolean", "description": "tokenbridge: false skips the response cache"},
}
COMPONENTS: dict[str, Any] = {
    "OpenAIError": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": "string"},
                },
            }
        },
    },
    "ChatCompletionRequest": {
        "type": "object",
        "required": ["model", "messages"],
        "properties": {
            **_COMMON,
            "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
            "max_tokens": {"type": "integer", "minimum": 1},
            "max_completion_tokens": {"type": "integer", "minimum": 1},
            "stop": {"type": ["string", "array"]},
            "stream_options": {"type": "object"},
            "response_format": {"type": "object"},
            "n": {"const": 1, "description": "only 1"},
        },
    },
    "ChatCompletion": {"type": "object", "description": "object: chat.completion"},
    "ResponseRequest": {
        "type": "object",
        "required": ["model", "input"],
        "properties": {
            **_COMMON,
            "input": {"type": ["string", "array"]},
            "instructions": {"type": "string"},
            "max_output_tokens": {"type": "integer", "minimum": 1},
            "background": {"type": "boolean"},
            "store": {"type": "boolean"},
            "previous_response_id": {"type": "string"},
            "metadata": {"type": "object"},
        },
    },
    "Response": {
        "type": "object",
        "required": ["id", "object", "status", "output"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "response"},
            "status": {
                "enum": ["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"]
            },
            "output": {"type": "array"},
        },
    },
    "ResponseDeleted": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "response.deleted"},
            "deleted": {"type": "boolean"},
        },
    },
}


def openai_components() -> dict[str, Any]:
    return dict(COMPONENTS)


def _body(model: str) -> dict[str, Any]:
    schema = {"$ref": _REF.format(model)}
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string"},
    }


_RESPONSE_ID = _path_param("response_id", "resp_...")


def openai_paths() -> dict[str, Any]:
    """The paths of the OpenAI-compatible routes (docs/openai.md)."""
    response = _json({"$ref": _REF.format("Response")})
    return {
        "/v1/chat/completions": {
            "post": {
                "summary": "OpenAI Chat Completions (stream or not); resumable streams",
                "security": _AUTH,
                "requestBody": _body("ChatCompletionRequest"),
                "responses": {
                    "200": {
                        **_json({"$ref": _REF.format("ChatCompletion")}),
                        "content": {
                            "application/json": {"schema": {"$ref": _REF.format("ChatCompletion")}},
                            **_SSE["content"],
                        },
                    },
                    **_errors(400, 401, 403, 404, 413, 422, 429, 500, 503),
                },
            }
        },
        "/v1/chat/completions/{completion_id}/stream": {
            "get": {
                "summary": "The rest of a streamed completion after Last-Event-ID",
                "security": _AUTH,
                "parameters": [
                    _path_param("completion_id", "chatcmpl-..."),
                    {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}},
                    {"name": "last_event_id", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {"200": _SSE, **_errors(400, 401, 403, 404, 429, 503)},
            }
        },
        "/v1/responses": {
            "post": {
                "summary": "OpenAI Responses: stream, background, store, previous_response_id",
                "security": _AUTH,
                "requestBody": _body("ResponseRequest"),
                "responses": {
                    "200": {**response, "content": {**response["content"], **_SSE["content"]}},
                    **_errors(400, 401, 403, 404, 409, 413, 422, 429, 503),
                },
            }
        },
        "/v1/responses/{response_id}": {
            "get": {
                "summary": "Poll a stored response, or re-stream it (stream, starting_after)",
                "security": _AUTH,
                "parameters": [
                    _RESPONSE_ID,
                    {"name": "stream", "in": "query", "schema": {"type": "boolean"}},
                    {
                        "name": "starting_after",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 0},
                    },
                ],
                "responses": {
                    "200": {**response, "content": {**response["content"], **_SSE["content"]}},
                    **_errors(400, 401, 403, 404, 429, 503),
                },
            },
            "delete": {
                "summary": "Delete a stored response (cancelling it if it runs)",
                "security": _AUTH,
                "parameters": [_RESPONSE_ID],
                "responses": {
                    "200": _json({"$ref": _REF.format("ResponseDeleted")}),
                    **_errors(401, 403, 404, 503),
                },
            },
        },
        "/v1/responses/{response_id}/cancel": {
            "post": {
                "summary": "Cancel a response (idempotent); answers the Response",
                "security": _AUTH,
                "parameters": [_RESPONSE_ID],
                "responses": {"200": response, **_errors(401, 403, 404, 429, 503)},
            }
        },
    }
