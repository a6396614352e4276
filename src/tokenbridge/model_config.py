"""The model table: :class:`ModelConfig` (one entry) and the model specs that build entries.

A public model name maps to an adapter and its options. An entry is given as JSON/TOML
(``{"adapter": "openai", "base_url": ...}``) or as a spec string, as
``tokenbridge serve --model NAME=SPEC`` takes it: ``openai:gpt-4o-mini``,
``openai:llama3.1@http://localhost:11434/v1``, ``anthropic:claude-sonnet-4-5``, ``demo``.

This is the one module besides ``settings.py`` that reads the environment: an adapter's API
key, from the variable its entry *names* (:meth:`ModelConfig.api_key`).
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from tokenbridge.exceptions import ConfigurationError

__all__ = [
    "DEFAULT_KEY_ENV",
    "ModelConfig",
    "check_model_table",
    "default_models",
    "parse_model_flag",
    "parse_model_spec",
]

DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
"""The key variable a spec implies for the provider's own API (none for a custom base URL)."""

_SPEC = re.compile(
    r"^(?P<adapter>demo|openai|anthropic)(?::(?P<model>[^@\s]+))?(?:@(?P<url>\S+))?$"
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}$")
_SPEC_HELP = (
    "use ADAPTER:MODEL[@BASE_URL], e.g. openai:gpt-4o-mini, "
    "openai:llama3.1@http://localhost:11434/v1, anthropic:claude-sonnet-4-5 or demo"
)


class ModelConfig(BaseModel):
    """One entry of the model table: a public model name maps to an adapter and its options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    adapter: Literal["demo", "openai", "anthropic"] = Field(
        description="Which adapter serves this model."
    )
    base_url: str | None = Field(
        default=None,
        description="Base URL of the API: OpenAI-compatible, e.g. http://localhost:11434/v1, or "
        "Anthropic's (default https://api.anthropic.com/v1).",
    )
    model: str | None = Field(
        default=None, description="Upstream model name; defaults to the public name."
    )
    api_key_env: str | None = Field(
        default=None,
        description="Name of the environment variable that holds the API key (never the key).",
    )
    timeout_s: float = Field(default=60.0, gt=0, description="Per-read timeout of the provider.")
    connect_timeout_s: float = Field(default=10.0, gt=0, description="Connect timeout.")
    fallbacks: list[str] = Field(
        default_factory=list,
        max_length=8,
        description="Models of the table tried in order when this one fails before its first "
        "token (after its retries).",
    )

    @model_validator(mode="before")
    @classmethod
    def _spec(cls, value: object) -> object:
        """An entry may be a spec string: ``"openai:gpt-4o-mini"``."""
        return parse_model_spec(value) if isinstance(value, str) else value

    def api_key(self) -> SecretStr | None:
        """The API key read from the variable named by ``api_key_env``, if any."""
        if not self.api_key_env:
            return None
        value = os.environ.get(self.api_key_env)
        return SecretStr(value) if value else None


def default_models() -> dict[str, ModelConfig]:
    """The table when none is configured: the built-in ``demo`` model alone."""
    return {"demo": ModelConfig(adapter="demo")}


def check_model_table(table: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
    """``table`` if it names at least one model and every fallback is another of its models.

    Raises ``ValueError`` (a validation error of the ``models`` setting) otherwise.
    """
    if not table:
        raise ValueError("at least one model must be configured")
    for name, entry in table.items():
        for other in entry.fallbacks:
            if other == name or other not in table:
                known = ", ".join(sorted(set(table) - {name})) or "none"
                raise ValueError(
                    f"model {name!r}: fallback {other!r} is not another model of the "
                    f"table (others: {known})"
                )
    return table


def parse_model_spec(spec: str) -> dict[str, Any]:
    """A model entry (the fields of ``ModelConfig``) from ``ADAPTER[:MODEL][@BASE_URL]``.

    Raises ``ValueError`` with the accepted forms. The provider's own API implies its usual
    key variable (``OPENAI_API_KEY``, ``ANTHROPIC_API_KEY``); a custom base URL implies none.
    """
    found = _SPEC.fullmatch(spec.strip())
    if found is None:
        raise ValueError(f"{spec!r} is not a model spec: {_SPEC_HELP}")
    adapter, model, url = found.group("adapter", "model", "url")
    entry: dict[str, Any] = {"adapter": adapter}
    if adapter == "demo":
        if model or url:
            raise ValueError(f"{spec!r}: the demo model takes no name nor URL; write just demo")
        return entry
    if not model:
        raise ValueError(f"{spec!r} names no upstream model: {_SPEC_HELP}")
    entry["model"] = model
    if url:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{spec!r}: the base URL must start with http:// or https://")
        entry["base_url"] = url
    else:
        entry["api_key_env"] = DEFAULT_KEY_ENV[adapter]
    return entry


def parse_model_flag(flag: str) -> tuple[str, dict[str, Any]]:
    """``NAME=SPEC`` (or a bare ``SPEC``, named after its upstream model) of ``--model``."""
    name, sep, spec = flag.partition("=")
    if not sep:
        spec = flag
        entry = _flag_entry(flag, spec)
        name = entry.get("model", entry["adapter"])
    else:
        entry = _flag_entry(flag, spec)
    if not _NAME.fullmatch(name):
        raise ConfigurationError(
            f"--model {flag}: {name!r} is not a model name (letters, digits, _ . : / -)"
        )
    return name, entry


def _flag_entry(flag: str, spec: str) -> dict[str, Any]:
    try:
        return parse_model_spec(spec)
    except ValueError as exc:
        raise ConfigurationError(f"--model {flag}: {exc}") from None
