"""anthropic_request: a chat in OpenAI's format as the body of an Anthropic Messages request.

Pure data mapping, apart from the HTTP adapter (``anthropic.py``), so that it can be read and
tested on its own:

    system, developer      joined (blank line between) into the top-level ``system``
    user                   ``{"role": "user", "content": text}``
    assistant              text, and a ``tool_use`` block per entry of ``tool_calls``
                           (``input`` is the call's arguments, parsed: they must be a JSON object)
    tool                   a ``tool_result`` block (``tool_use_id`` = ``tool_call_id``) in a user
                           message
    same role in a row     merged into one message of blocks (the API wants turns to alternate,
                           and every result of one assistant turn in the user message after it)
    tools                  ``{"name", "description", "input_schema"}``
    tool_choice            auto | none | required -> any | {function: name} -> tool name;
                           ``parallel_tool_calls: false`` -> ``disable_parallel_tool_use``
    user                   ``metadata.user_id``

``seed`` and ``response_format`` have no Anthropic equivalent and are left out. Raises
``ValueError`` for a request Anthropic cannot express (tool call arguments that are not an
object).
"""

from __future__ import annotations

import json
from typing import Any

from tokenbridge.producer.models.base import ChatRequest, GenerationParams

__all__ = ["anthropic_request"]

_EMPTY_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}


def anthropic_request(request: ChatRequest, model: str, default_max_tokens: int) -> dict[str, Any]:
    """The Messages API body for ``request`` (without ``stream``)."""
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    for message in request.messages:
        role = message.get("role")
        if role in ("system", "developer"):
            system.append(message.get("content") or "")
            continue
        if role == "tool":
            _append(messages, "user", [_tool_result(message)])
        elif role == "assistant" and message.get("tool_calls"):
            _append(messages, "assistant", _assistant_blocks(message))
        else:
            _append(messages, "user" if role == "user" else "assistant", message.get("content"))
    params = request.params
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": params.max_tokens or default_max_tokens,
    }
    if system:
        body["system"] = "\n\n".join(system)
    if params.temperature is not None:
        body["temperature"] = params.temperature  # the API takes 0..1; it says so if not
    if params.top_p is not None:
        body["top_p"] = params.top_p
    if params.stop:
        body["stop_sequences"] = list(params.stop)
    if params.user is not None:
        body["metadata"] = {"user_id": params.user}
    body.update(_tools(params))
    return body  # seed, response_format: the API has none; rate and cache are tokenbridge's


def _append(messages: list[dict[str, Any]], role: str, content: Any) -> None:
    """Add a turn, merged into the previous one if it has the same role."""
    if messages and messages[-1]["role"] == role:
        last = messages[-1]
        last["content"] = _blocks(last["content"]) + _blocks(content)
    else:
        messages.append({"role": role, "content": content})


def _blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, list):
        return content
    return [{"type": "text", "text": content}] if content else []


def _assistant_blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    blocks = _blocks(message.get("content"))
    for call in message["tool_calls"]:
        function = call["function"]
        try:
            arguments = json.loads(function["arguments"] or "{}")
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            raise ValueError(
                f"the arguments of tool call {call['id']!r} are not a JSON object, "
                "which Anthropic's tool_use input must be"
            )
        blocks.append(
            {"type": "tool_use", "id": call["id"], "name": function["name"], "input": arguments}
        )
    return blocks


def _tool_result(message: dict[str, Any]) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": message["tool_call_id"]}
    if message.get("content"):
        block["content"] = message["content"]
    return block


def _tools(params: GenerationParams) -> dict[str, Any]:
    """``tools`` and ``tool_choice`` in Anthropic's form (nothing when there are no tools)."""
    out: dict[str, Any] = {}
    if params.tools:
        out["tools"] = [_tool(t.function.name, t.function.description, t.function.parameters)
                        for t in params.tools]  # fmt: skip
    choice = params.tool_choice
    mapped: dict[str, Any] | None = None
    if choice == "auto" or (choice is None and params.parallel_tool_calls is False):
        mapped = {"type": "auto"}
    elif choice == "none":
        mapped = {"type": "none"}
    elif choice == "required":
        mapped = {"type": "any"}
    elif choice is not None:
        mapped = {"type": "tool", "name": choice.function.name}
    if mapped is not None and params.tools:
        if params.parallel_tool_calls is False and mapped["type"] != "none":
            mapped["disable_parallel_tool_use"] = True
        out["tool_choice"] = mapped
    return out


def _tool(name: str, description: str | None, parameters: dict[str, Any] | None) -> dict[str, Any]:
    tool: dict[str, Any] = {"name": name}
    if description:
        tool["description"] = description
    tool["input_schema"] = parameters if parameters is not None else _EMPTY_SCHEMA
    return tool
