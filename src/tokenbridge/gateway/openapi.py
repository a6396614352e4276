"""The OpenAPI 3.1 description of the HTTP API, served at ``/openapi.json``.

Request and response bodies come from the same pydantic models that validate them, so the
schema cannot drift from what the code accepts; a schemathesis run in the test suite checks the
running app against it (no 5xx, every response conforming).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from tokenbridge.gateway.admin_schema import admin_components, admin_paths
from tokenbridge.gateway.api import GenerationRequest
from tokenbridge.gateway.openai_openapi import openai_components, openai_paths
from tokenbridge.wire.keys import ID_PATTERN

__all__ = ["openapi_schema"]

_REF = "#/components/schemas/{model}"


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. unknown_model.")
    message: str = Field(description="For people.")


class ErrorBody(BaseModel):
    error: ErrorDetail


class GenerationAccepted(BaseModel):
    session_id: str
    generation_id: str
    token: str = Field(description="Subscribe token for this session (JWT).")
    token_expires_in_s: int
    events_url: str = Field(description="SSE URL, token included.")
    ws_url: str = Field(description="WebSocket URL, token included.")


class ModelInfo(BaseModel):
    """OpenAI's Model object, plus the adapter that serves it."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time (s) when this gateway loaded its model table.")
    owned_by: str = "tokenbridge"
    adapter: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelInfo]


class CancelAccepted(BaseModel):
    generation_id: str
    state: str


class LoginRequest(BaseModel):
    api_key: str = Field(max_length=200)


def _errors(*statuses: int) -> dict[str, Any]:
    return {
        str(status): {
            "description": "error",
            "content": {"application/json": {"schema": {"$ref": _REF.format(model="ErrorBody")}}},
        }
        for status in statuses
    }


def _ok(model: str, status: int = 200) -> dict[str, Any]:
    return {
        str(status): {
            "description": "ok",
            "content": {"application/json": {"schema": {"$ref": _REF.format(model=model)}}},
        }
    }


def _id_param(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": ID_PATTERN.pattern},
    }


_AUTH: list[dict[str, list[str]]] = [{"bearer": []}, {"console": []}]


def openapi_schema(version: str) -> dict[str, Any]:
    """The whole document."""
    components: dict[str, Any] = {}
    for model in (
        GenerationRequest,
        GenerationAccepted,
        ErrorBody,
        ModelList,
        CancelAccepted,
        LoginRequest,
    ):
        schema = model.model_json_schema(ref_template=_REF)
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
    sse = {
        "200": {
            "description": "SSE: start, token, end, error, gap (docs/wire-format.md)",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        }
    }
    paths: dict[str, Any] = {
        "/v1/generations": {
            "post": {
                "summary": "Start a generation (queued for a worker); answers at once",
                "security": _AUTH,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": _REF.format(model="GenerationRequest")}
                        }
                    },
                },
                "responses": {
                    **_ok("GenerationAccepted", 202),
                    **_errors(400, 401, 403, 404, 413, 422, 429, 503),
                },
            }
        },
        "/v1/generations/{generation_id}": {
            "delete": {
                "summary": "Cancel a generation, wherever it runs",
                "security": _AUTH,
                "parameters": [_id_param("generation_id")],
                "responses": {
                    **_ok("CancelAccepted", 202),
                    **_errors(400, 401, 403, 404, 409, 503),
                },
            }
        },
        "/v1/sessions/{session_id}/events": {
            "get": {
                "summary": "The session's events over SSE, resuming after Last-Event-ID",
                "security": [{"token": []}, *_AUTH],
                "parameters": [
                    _id_param("session_id"),
                    {"name": "last_event_id", "in": "query", "schema": {"type": "string"}},
                    {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}},
                ],
                "responses": {**sse, **_errors(400, 401, 403, 429, 503)},
            }
        },
        "/v1/models": {
            "get": {
                "summary": "The model table",
                "security": _AUTH,
                "responses": {**_ok("ModelList"), **_errors(401, 403)},
            }
        },
        "/v1/models/{model}": {
            "get": {
                "summary": "One model of the table",
                "security": _AUTH,
                "parameters": [
                    {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {**_ok("ModelInfo"), **_errors(401, 403, 404)},
            }
        },
        "/v1/status": {
            "get": {
                "summary": "This node's fan-out, connections, consumers, groups, dead letters",
                "security": _AUTH,
                "responses": {
                    "200": {
                        "description": "ok",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    **_errors(401, 403, 503),
                },
            }
        },
        "/v1/stats": {
            "get": {
                "summary": "Analytics totals and per model (the processor pipeline's figures)",
                "security": _AUTH,
                "responses": {**_health(), **_errors(401, 403, 503)},
            }
        },
        "/v1/sessions/{session_id}/stats": {
            "get": {
                "summary": "Analytics of one session and its generations",
                "security": [{"token": []}, *_AUTH],
                "parameters": [
                    _id_param("session_id"),
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                    },
                ],
                "responses": {**_health(), **_errors(400, 401, 403, 404, 503)},
            }
        },
        "/v1/auth/login": {
            "post": {
                "summary": "Trade an API key for the console cookie",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": _REF.format(model="LoginRequest")}}
                    },
                },
                "responses": {
                    "200": {
                        "description": "cookie set",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    **_errors(400, 401, 413, 422),
                },
            }
        },
        "/healthz": {"get": {"summary": "Liveness", "responses": _health()}},
        "/readyz": {
            "get": {
                "summary": "Readiness: Redis answers and a worker is alive",
                "responses": {**_health(), **_errors(503)},
            }
        },
    }
    paths.update(admin_paths())  # gateway/admin_schema.py
    components.update(admin_components())
    paths.update(openai_paths())
    components.update(openai_components())
    return {
        "openapi": "3.1.0",
        "info": {"title": "tokenbridge", "version": version},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "API key"},
                "token": {"type": "apiKey", "in": "query", "name": "token"},
                "console": {"type": "apiKey", "in": "cookie", "name": "tb_console"},
                "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "api-key"},
                "xApiKeyHeader": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
        },
    }


def _health() -> dict[str, Any]:
    return {
        "200": {
            "description": "ok",
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    }
