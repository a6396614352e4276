"""Request bodies of the OpenAI-compatible routes, checked and turned into a generation.

A body becomes the job request of CONTRACTS (docs/wire-format.md): ``messages`` in OpenAI chat
form (content parts flattened to text) and ``params``. Parameters we cannot honour with a
meaning OpenAI's clients rely on (``n > 1``, audio, logprobs, non-function tools) are refused
with a 400 that names the ``param``; parameters that only tune sampling or bookkeeping and
that our models do not take (``frequency_penalty``, ``metadata``, ...) are accepted and ignored,
as OpenAI-compatible servers commonly do, so that existing clients work unchanged.
tokenbridge's own parameters (the demo model's ``rate``, ``cache``) travel in the body: with
the ``openai`` SDK, ``extra_body={"rate": 50}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokenbridge.gateway.openai_errors import OpenAIParamError, unsupported

__all__ = ["ChatBody", "ResponsesBody", "parse_chat", "parse_responses"]

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
_EXTRA_PARAMS = ("rate", "cache")  # tokenbridge-only, passed through to GenerationParams


def _require(cond: bool, param: str, message: str) -> None:
    if not cond:
        raise OpenAIParamError(param, message, "invalid_value")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= high
    _require(ok, name, f"{name} must be a number from {low} to {high}")
    return float(value)


def _positive_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    _require(_is_int(value) and value >= 1, name, f"{name} must be an integer >= 1")
    return int(value)


def _text_of(content: Any, param: str, part_types: frozenset[str]) -> str | None:
    """A message's content as text: a string, null, or an array of text parts."""
    if content is None or isinstance(content, str):
        return content
    _require(isinstance(content, list), param, "content must be a string or an array of parts")
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in part_types:
            raise unsupported(f"{param}[{i}]", f"content part of type {kind!r}")
        text = part.get("text")
        _require(isinstance(text, str), f"{param}[{i}].text", "a text part needs 'text'")
        texts.append(text)
    return "".join(texts)


def _tool_calls(value: Any, param: str) -> list[dict[str, Any]]:
    _require(isinstance(value, list), param, "tool_calls must be an array")
    calls = []
    for i, call in enumerate(value):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(call.get("id"), str):
            raise OpenAIParamError(f"{param}[{i}]", "invalid tool call", "invalid_value")
        _require(isinstance(fn.get("name"), str), f"{param}[{i}]", "invalid tool call")
        arguments = fn.get("arguments", "")
        _require(isinstance(arguments, str), f"{param}[{i}].function.arguments", "not a string")
        calls.append(
            {
                "id": call["id"],
                "type": "function",
                "function": {"name": fn["name"], "arguments": arguments},
            }
        )
    return calls


_CHAT_PARTS = frozenset({"text"})


def chat_messages(value: Any) -> list[dict[str, Any]]:
    """``messages`` of a Chat Completions body, in the job's chat form."""
    _require(isinstance(value, list) and len(value) > 0, "messages", "messages must be a list")
    out = []
    for i, msg in enumerate(value):
        param = f"messages[{i}]"
        _require(isinstance(msg, dict), param, "a message must be an object")
        role = msg.get("role")
        if role == "function":
            raise unsupported(f"{param}.role", "the legacy 'function' role (use 'tool')")
        _require(role in _ROLES, f"{param}.role", f"role must be one of {sorted(_ROLES)}")
        item: dict[str, Any] = {
            "role": role,
            "content": _text_of(msg.get("content"), f"{param}.content", _CHAT_PARTS),
        }
        if role == "assistant" and msg.get("tool_calls"):
            item["tool_calls"] = _tool_calls(msg["tool_calls"], f"{param}.tool_calls")
        if role == "tool":
            call_id = msg.get("tool_call_id")
            _require(isinstance(call_id, str), f"{param}.tool_call_id", "tool_call_id needed")
            item["tool_call_id"] = call_id
        if isinstance(msg.get("name"), str):
            item["name"] = msg["name"]
        if item["content"] is None and "tool_calls" not in item:
            item["content"] = ""
        out.append(item)
    return out


def _stop(value: Any) -> list[str] | None:
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    ok = isinstance(stops, list) and all(isinstance(s, str) and s for s in stops)
    _require(ok and len(stops) <= 4, "stop", "stop must be a string or up to 4 strings")
    return list(stops)


def _chat_tools(value: Any, param: str = "tools") -> list[dict[str, Any]] | None:
    if value is None:
        return None
    _require(isinstance(value, list), param, "tools must be an array")
    for i, tool in enumerate(value):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise unsupported(f"{param}[{i}].type", f"tool type {kind!r} (only 'function')")
        fn = tool.get("function")
        ok = isinstance(fn, dict) and isinstance(fn.get("name"), str)
        _require(ok, f"{param}[{i}].function", "a function tool needs function.name")
    return list(value)


def _common_params(body: dict[str, Any], max_tokens: int | None) -> dict[str, Any]:
    params: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": _number(body, "temperature", 0, 2),
        "top_p": _number(body, "top_p", 0, 1),
        "parallel_tool_calls": body.get("parallel_tool_calls"),
        "user": body.get("user") if isinstance(body.get("user"), str) else None,
    }
    seed = body.get("seed")
    if seed is not None:
        _require(_is_int(seed), "seed", "seed must be an integer")
        params["seed"] = seed
    for name in _EXTRA_PARAMS:
        if body.get(name) is not None:
            params[name] = body[name]
    return {k: v for k, v in params.items() if v is not None}


@dataclass(slots=True)
class ChatBody:
    """A checked ``POST /v1/chat/completions`` body."""

    model: str
    messages: list[dict[str, Any]]
    params: dict[str, Any]
    stream: bool = False
    include_usage: bool = False


def _refuse_unsupported_chat(body: dict[str, Any]) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise unsupported("n", "n other than 1 (one choice per request)")
    if body.get("audio") is not None:
        raise unsupported("audio", "audio output")
    modalities = body.get("modalities")
    if isinstance(modalities, list) and any(m != "text" for m in modalities):
        raise unsupported("modalities", "output modalities other than 'text'")
    if body.get("logprobs"):
        raise unsupported("logprobs", "logprobs")
    if body.get("prediction") is not None:
        raise unsupported("prediction", "predicted outputs")


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    _require(isinstance(model, str) and 0 < len(model) <= 128, "model", "model is required")
    return str(model)


def parse_chat(body: Any) -> ChatBody:
    """Check a Chat Completions body; OpenAIParamError (400, naming the param) if it is bad."""
    _require(isinstance(body, dict), "body", "the body must be a JSON object")
    _refuse_unsupported_chat(body)
    model = _model(body)
    messages = chat_messages(body.get("messages"))
    max_tokens = _positive_int(body, "max_completion_tokens") or _positive_int(body, "max_tokens")
    params = _common_params(body, max_tokens)
    if (stop := _stop(body.get("stop"))) is not None:
        params["stop"] = stop
    if (tools := _chat_tools(body.get("tools"))) is not None:
        params["tools"] = tools
    for name in ("tool_choice", "response_format"):
        if body.get(name) is not None:
            params[name] = body[name]
    stream = body.get("stream") is True
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return ChatBody(model, messages, params, stream, include_usage)


@dataclass(slots=True)
class ResponsesBody:
    """A checked ``POST /v1/responses`` body, with its input in chat form."""

    model: str
    input: list[dict[str, Any]]
    instructions: str | None
    params: dict[str, Any]
    stream: bool = False
    background: bool = False
    store: bool = True
    previous_response_id: str | None = None
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: Any = "auto"
    metadata: dict[str, Any] | None = None


_INPUT_PARTS = frozenset({"input_text", "output_text", "text"})


def _input_item(item: Any, param: str) -> dict[str, Any]:
    """One Responses input item as a chat message (function calls and outputs included)."""
    _require(isinstance(item, dict), param, "an input item must be an object")
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        ok = role in ("system", "developer", "user", "assistant")
        _require(ok, f"{param}.role", "role must be system, developer, user or assistant")
        return {
            "role": role,
            "content": _text_of(item.get("content"), f"{param}.content", _INPUT_PARTS) or "",
        }
    if kind == "function_call":
        ok = all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments"))
        _require(ok, param, "a function_call item needs call_id, name and arguments")
        function = {"name": item["name"], "arguments": item["arguments"]}
        call = {"id": item["call_id"], "type": "function", "function": function}
        return {"role": "assistant", "content": None, "tool_calls": [call]}
    if kind == "function_call_output":
        output = item.get("output")
        ok = isinstance(item.get("call_id"), str) and isinstance(output, str)
        _require(ok, param, "a function_call_output item needs call_id and a string output")
        return {"role": "tool", "tool_call_id": item["call_id"], "content": output}
    raise unsupported(f"{param}.type", f"input item of type {kind!r}")


def responses_input(value: Any) -> list[dict[str, Any]]:
    """``input``: a string (one user message) or a list of items; adjacent calls merged."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    _require(isinstance(value, list) and len(value) > 0, "input", "input must be text or items")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        message = _input_item(item, f"input[{i}]")
        last = out[-1] if out else None
        if "tool_calls" in message and last is not None and "tool_calls" in last:
            last["tool_calls"].extend(message["tool_calls"])  # one assistant turn, many calls
        else:
            out.append(message)
    return out


def _responses_tools(value: Any) -> list[dict[str, Any]]:
    """Function tools of the Responses API (flat) in chat form (``function`` nested)."""
    if value is None:
        return []
    _require(isinstance(value, list), "tools", "tools must be an array")
    tools = []
    for i, tool in enumerate(value):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise unsupported(f"tools[{i}].type", f"tool type {kind!r} (only 'function')")
        _require(isinstance(tool.get("name"), str), f"tools[{i}].name", "a function needs a name")
        tools.append(tool)
    return tools


def chat_tools_of(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses function tools (flat) as Chat Completions tools (``function`` nested)."""
    out = []
    for tool in tools:
        fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
        out.append({"type": "function", "function": fn})
    return out


def _chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def parse_responses(body: Any) -> ResponsesBody:
    """Check a Responses body; OpenAIParamError (400, naming the param) if it is bad."""
    _require(isinstance(body, dict), "body", "the body must be a JSON object")
    model = _model(body)
    instructions = body.get("instructions")
    _require(instructions is None or isinstance(instructions, str), "instructions", "a string")
    params = _common_params(body, _positive_int(body, "max_output_tokens"))
    tools = _responses_tools(body.get("tools"))
    tool_choice = body.get("tool_choice", "auto")
    if tools:
        params["tools"] = chat_tools_of(tools)
        params["tool_choice"] = _chat_tool_choice(tool_choice)
    background = body.get("background") is True
    store = body.get("store") is not False
    if background and not store:
        raise OpenAIParamError("store", "background responses must be stored (store: true)")
    previous = body.get("previous_response_id")
    _require(previous is None or isinstance(previous, str), "previous_response_id", "a string")
    metadata = body.get("metadata")
    return ResponsesBody(
        model=model,
        input=responses_input(body.get("input")),
        instructions=instructions,
        params=params,
        stream=body.get("stream") is True,
        background=background,
        store=store,
        previous_response_id=previous,
        tools=tools,
        tool_choice=tool_choice,
        metadata=metadata if isinstance(metadata, dict) else None,
    )
