"""Model adapters of the producer, and :func:`build_model` that picks one from a model entry.

``adapter: "demo"`` is :class:`DemoModel` (no network), ``adapter: "openai"`` is
:class:`OpenAIChatModel` (any OpenAI-compatible API), ``adapter: "anthropic"`` is
:class:`AnthropicChatModel` (the Anthropic Messages API). Every adapter satisfies
:class:`ChatModel`.
"""

from __future__ import annotations

from tokenbridge.exceptions import ConfigurationError
from tokenbridge.producer.models.anthropic import AnthropicChatModel
from tokenbridge.producer.models.base import (
    ChatModel,
    ChatRequest,
    Delta,
    Finish,
    GenerationParams,
    ToolCallDelta,
)
from tokenbridge.producer.models.demo import DemoModel
from tokenbridge.producer.models.openai import OpenAIChatModel
from tokenbridge.settings import ModelConfig

__all__ = [
    "AnthropicChatModel",
    "ChatModel",
    "ChatRequest",
    "Delta",
    "DemoModel",
    "Finish",
    "GenerationParams",
    "OpenAIChatModel",
    "ToolCallDelta",
    "build_model",
]


def build_model(name: str, config: ModelConfig) -> ChatModel:
    """The adapter for model ``name``; ``config.model`` (the upstream name) defaults to it.

    The caller owns the result and must ``await model.aclose()``.
    """
    if config.adapter == "demo":
        return DemoModel(name, config)
    if config.adapter == "openai":
        return OpenAIChatModel(name, config)
    if config.adapter == "anthropic":
        return AnthropicChatModel(name, config)
    raise ConfigurationError(  # unreachable while ModelConfig.adapter is a Literal
        f"model {name!r}: unknown adapter {config.adapter!r}; use 'demo', 'openai' or 'anthropic'"
    )
