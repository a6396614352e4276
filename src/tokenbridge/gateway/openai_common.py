"""What the Chat Completions and Responses routes share: credentials, submit, connections.

Credentials are the API key of the native API, presented as OpenAI clients do
(``Authorization: Bearer``) or as Azure-style clients do (``api-key``, ``x-api-key``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from tokenbridge.exceptions import InvalidRequest
from tokenbridge.gateway.auth import Principal, key_principal
from tokenbridge.gateway.connection_manager import ConnectionManager
from tokenbridge.gateway.openai_errors import OpenAIParamError
from tokenbridge.gateway.openai_store import OpenAIStore
from tokenbridge.producer.jobs import GenerationJob, Message, submit_job
from tokenbridge.producer.models.base import GenerationParams
from tokenbridge.runtime import Runtime
from tokenbridge.wire.events import now_ms
from tokenbridge.wire.keys import new_generation_id

__all__ = ["Submitted", "openai_principal", "parts", "submit"]


def parts(request: Request) -> tuple[Runtime, ConnectionManager, OpenAIStore]:
    runtime: Runtime = request.state.runtime
    manager: ConnectionManager = request.state.connections
    return runtime, manager, OpenAIStore(runtime.redis, runtime.keys)


async def openai_principal(request: Request, unsafe: bool = False) -> Principal:
    """The API key from ``Authorization: Bearer``, ``api-key`` or ``x-api-key``."""
    runtime: Runtime = request.state.runtime
    auth = runtime.auth
    if not auth.disabled and "authorization" not in request.headers:
        presented = request.headers.get("api-key") or request.headers.get("x-api-key")
        if presented:
            return await auth.check_key(presented.strip())
    return await key_principal(auth, request, unsafe=unsafe)


@dataclass(frozen=True, slots=True)
class Submitted:
    generation_id: str
    created_s: int


def _job_messages(messages: list[dict[str, Any]]) -> list[Message]:
    out = []
    for m in messages:
        role = {"developer": "system", "tool": "user"}.get(m["role"], m["role"])
        out.append(Message(role=role, content=m.get("content") or ""))
    return out


async def submit(
    request: Request,
    principal: Principal,
    session_id: str,
    model: str,
    messages: list[dict[str, Any]],
    params: dict[str, Any],
    background: bool = False,
) -> Submitted:
    """Queue the generation on the job stream (the native path's checks and admission)."""
    runtime: Runtime = request.state.runtime
    settings = runtime.settings
    if model not in runtime.models:
        known = ", ".join(sorted(runtime.models))
        raise InvalidRequest("unknown_model", f"unknown model {model!r}; known: {known}", 404)
    if len(messages) > settings.max_messages:
        raise InvalidRequest("too_many_messages", f"at most {settings.max_messages} messages", 413)
    if sum(len(m.get("content") or "") for m in messages) > settings.max_prompt_chars:
        raise InvalidRequest(
            "prompt_too_large", f"prompt over {settings.max_prompt_chars} characters", 413
        )
    if (params.get("max_tokens") or 0) > settings.max_tokens_limit:
        raise OpenAIParamError(
            "max_tokens", f"max_tokens over {settings.max_tokens_limit}", "max_tokens_too_large"
        )
    param_fields = GenerationParams.model_fields
    try:
        job_params = GenerationParams.model_validate(
            {k: v for k, v in params.items() if k in param_fields}
        )
    except ValueError as exc:
        raise OpenAIParamError("body", f"invalid parameter: {exc}", "invalid_value") from None
    await runtime.admit(principal.identity, model)
    job = GenerationJob(
        generation_id=new_generation_id(),
        session_id=session_id,
        model=model,
        messages=_job_messages(messages),
        params=job_params,
        identity=principal.identity,
    )
    lookup_ttl_s = settings.stream_max_generation_s + settings.stream_retention_s
    await submit_job(runtime.redis, runtime.keys, job, settings.jobs_max_len, lookup_ttl_s)
    return Submitted(job.generation_id, now_ms() // 1000)
