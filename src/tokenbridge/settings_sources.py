"""Where settings come from besides ``TOKENBRIDGE_*`` variables, and how their errors read.

* model specs, as ``tokenbridge serve --model NAME=SPEC`` takes them (and as a string entry of
  the model table): ``openai:gpt-4o-mini``, ``openai:llama3.1@http://localhost:11434/v1``,
  ``anthropic:claude-sonnet-4-5``, ``demo``;
* the config file (``--config tokenbridge.toml``): TOML read with the standard library, one key
  per setting (``port = 8080``) and a ``[models.NAME]`` table per model;
* one-line messages for a bad value that name where it came from: the variable, the flag or
  the file and key, so a user knows what to change;
* the effective configuration with secrets masked (``tokenbridge config``).

Precedence, highest first: command-line flags, ``TOKENBRIDGE_*`` variables, the config file,
defaults. This module reads no environment itself: ``settings.py`` does.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import SecretStr, ValidationError

from tokenbridge.exceptions import ConfigurationError

__all__ = [
    "DEFAULT_KEY_ENV",
    "describe_errors",
    "masked",
    "parse_model_flag",
    "parse_model_spec",
    "read_config_file",
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


def read_config_file(path: Path, fields: Iterable[str]) -> dict[str, Any]:
    """The settings of a TOML file: top-level keys are setting names (``port = 8080``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(f"--config {path}: cannot read it ({exc.strerror})") from None
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"--config {path}: not valid TOML: {exc}") from None
    known = set(fields)
    unknown = sorted(key for key in values if key not in known)
    if unknown:
        hint = " (write setting names without TOKENBRIDGE_, in lower case)"
        raise ConfigurationError(f"--config {path}: unknown setting {unknown[0]!r}{hint}")
    return values


def describe_errors(exc: ValidationError, source: Mapping[str, str]) -> str:
    """One line for all of ``exc``'s problems, each naming where the bad value came from.

    ``source`` maps a field to its origin (``TOKENBRIDGE_PORT``, ``--port``,
    ``tokenbridge.toml: port``); a nested location (a model entry's field) is named after it.
    """
    problems = []
    for err in exc.errors():
        loc = [str(part) for part in err["loc"]]
        if not loc:
            problems.append(err["msg"].removeprefix("Value error, "))
            continue
        field, rest = loc[0], loc[1:]
        where = source.get(field, f"TOKENBRIDGE_{field.upper()}")
        if field == "models" and rest:
            inner = f"model {rest[0]!r}" + (f", field {'.'.join(rest[1:])}" if rest[1:] else "")
            where = f"{where} ({inner})"
        message = err["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message}")
    return "invalid settings: " + "; ".join(problems)


def masked(value: Any) -> Any:
    """``value`` with secrets masked, as plain JSON-able data; a Redis URL keeps its host."""
    if isinstance(value, SecretStr):
        secret = value.get_secret_value()
        if "://" in secret:
            scheme, _, rest = secret.partition("://")
            if "@" in rest:
                return f"{scheme}://***@{rest.rpartition('@')[2]}"
            return secret
        return "***" if secret else ""
    if isinstance(value, dict):
        return {str(k): masked(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [masked(v) for v in value]
    if hasattr(value, "model_dump"):
        return masked(dict(value)) if not hasattr(value, "api_key_env") else _model(value)
    return value


def _model(entry: Any) -> dict[str, Any]:
    data: dict[str, Any] = {k: v for k, v in entry.model_dump().items() if v not in (None, [])}
    if entry.api_key_env:
        data["api_key"] = "set" if entry.api_key() is not None else "UNSET"
    return data
