"""Model adapters of the producer, and :func:`build_model` that picks one from a model entry.

``adapter: "demo"`` is :class:`DemoModel` (no network), ``adapter: "openai"`` is
:class:`OpenAIChatModel` (any OpenAI-compatible API), ``adapter: "anthropic"`` is
:class:`AnthropicChatModel` (the Anthropic Messages API). Every adapter satisfies
:class:`ChatModel`.
"""

from __future__ import annotations

import logging

from tokenbridge.exceptions import ConfigurationError
from tokenbridge.model_config import ModelConfig
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
from tokenbridge.producer.models.retry import ResilientModel, RetryPolicy
from tokenbridge.settings import Settings

__all__ = [
    "AnthropicChatModel",
    "ChatModel",
    "ChatRequest",
    "Delta",
    "DemoModel",
    "Finish",
    "GenerationParams",
    "OpenAIChatModel",
    "ResilientModel",
    "ToolCallDelta",
    "build_model",
    "build_models",
]

log = logging.getLogger(__name__)


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


def build_models(settings: Settings) -> dict[str, ChatModel]:
    """Every model of the table, each wrapped in a :class:`ResilientModel` (retries before
    the first token, then its ``fallbacks``); warns of a key variable that is not set.

    The caller owns the result and must ``await model.aclose()`` on each.
    """
    adapters: dict[str, ChatModel] = {}
    for name, config in settings.models.items():
        if config.api_key_env and config.api_key() is None:
            log.warning(
                "model %r: %s is not set; its requests go without an API key "
                "(set the variable, or drop api_key_env for a server that needs none)",
                name,
                config.api_key_env,
            )
        adapters[name] = build_model(name, config)
    policy = RetryPolicy(
        settings.provider_max_retries,
        settings.provider_retry_base_s,
        settings.provider_retry_max_wait_s,
    )
    return {
        name: ResilientModel(
            name,
            [(name, adapters[name])] + [(other, adapters[other]) for other in config.fallbacks],
            policy,
        )
        for name, config in settings.models.items()
    }
