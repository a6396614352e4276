"""The admin endpoints' part of the OpenAPI document (``gateway/admin_api.py``).

Request bodies come from the models that validate them; answers are described as objects
with their main fields, so the schemathesis run checks them without pinning every figure.
"""

from __future__ import annotations

from typing import Any

from tokenbridge.gateway.admin_api import KEY_ID_PATTERN, DeadLetterSelection, KeyCreate

__all__ = ["admin_components", "admin_paths"]

_REF = "#/components/schemas/{model}"
_AUTH: list[dict[str, list[str]]] = [{"bearer": []}, {"console": []}]


def _errors(*statuses: int) -> dict[str, Any]:
    return {
        str(status): {
            "description": "error",
            "content": {"application/json": {"schema": {"$ref": _REF.format(model="ErrorBody")}}},
        }
        for status in statuses
    }


def _object(status: int = 200, required: tuple[str, ...] = ()) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object"}
    if required:
        schema["required"] = list(required)
    return {str(status): {"description": "ok", "content": {"application/json": {"schema": schema}}}}


def _get(summary: str, required: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "security": _AUTH,
            "responses": {**_object(200, required), **_errors(400, 401, 403, 503)},
            **extra,
        }
    }


def _post(summary: str, model: str, status: int, required: tuple[str, ...]) -> dict[str, Any]:
    return {
        "summary": summary,
        "security": _AUTH,
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": _REF.format(model=model)}}},
        },
        "responses": {**_object(status, required), **_errors(400, 401, 403, 413, 422, 503)},
    }


def admin_components() -> dict[str, Any]:
    """Schemas of the admin request bodies."""
    out: dict[str, Any] = {}
    for model in (DeadLetterSelection, KeyCreate):
        schema = model.model_json_schema(ref_template=_REF)
        out.update(schema.pop("$defs", {}))
        for name, prop in schema.get("properties", {}).items():
            # `null` means "not given" to the model, but would count as given in `oneOf`:
            # the schema offers only real values.
            variants = [v for v in prop.get("anyOf", ()) if v.get("type") != "null"]
            if len(variants) == 1:
                prop.pop("anyOf")
                prop.pop("default", None)
                schema["properties"][name] = {**prop, **variants[0]}
        out[model.__name__] = schema
    return out


def admin_paths() -> dict[str, Any]:
    """The ``/v1/admin/...`` paths."""
    limit = {
        "name": "limit",
        "in": "query",
        "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
    }
    stream = {"name": "stream", "in": "query", "schema": {"type": "string", "maxLength": 256}}
    return {
        "/v1/admin/overview": _get(
            "The whole deployment: processes, connections, generations (last 15 minutes), "
            "consumer groups, dead letters, processors",
            ("processes", "connections", "series", "consumers", "dead_letters", "processors"),
        ),
        "/v1/admin/dashboard/events": {
            "get": {
                "summary": "The overview as an SSE stream (event `overview`), for the dashboard",
                "security": _AUTH,
                "responses": {
                    "200": {
                        "description": "SSE: one `overview` event every dashboard_update_s",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    **_errors(401, 403, 429, 503),
                },
            }
        },
        "/v1/admin/processes": _get(
            "Every live process (gateway, worker, processor) and connections per node",
            ("processes", "connections"),
        ),
        "/v1/admin/consumers": _get(
            "Consumer groups of the job and pipeline streams: consumers, pending, lag, "
            "oldest pending age",
            ("groups",),
        ),
        "/v1/admin/dead-letters": _get(
            "Dead letters, oldest first", ("count", "letters"), parameters=[limit, stream]
        ),
        "/v1/admin/dead-letters/replay": {
            "post": _post(
                "Put dead letters back into their source streams",
                "DeadLetterSelection",
                200,
                ("replayed",),
            )
        },
        "/v1/admin/dead-letters/purge": {
            "post": _post("Delete dead letters for good", "DeadLetterSelection", 200, ("purged",))
        },
        "/v1/admin/keys": {
            **_get("API keys: ids and names, never the keys", ("keys",)),
            "post": _post(
                "Create an API key; the answer is the only place it is shown",
                "KeyCreate",
                201,
                ("id", "name", "key"),
            ),
        },
        "/v1/admin/login-link": {
            "post": {
                "summary": "A one-time console login link (valid 10 minutes)",
                "security": _AUTH,
                "responses": {**_object(201, ("url", "expires_in_s")), **_errors(401, 403, 503)},
            }
        },
        "/v1/admin/keys/{key_id}": {
            "delete": {
                "summary": "Revoke a stored API key, on every gateway at once",
                "security": _AUTH,
                "parameters": [
                    {
                        "name": "key_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "pattern": KEY_ID_PATTERN},
                    }
                ],
                "responses": {**_object(200, ("id", "revoked")), **_errors(400, 401, 403, 404)},
            }
        },
    }
