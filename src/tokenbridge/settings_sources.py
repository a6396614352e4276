"""Where settings come from besides ``TOKENBRIDGE_*`` variables, and how their errors read.

* the config file (``--config tokenbridge.toml``): TOML read with the standard library, one key
  per setting (``port = 8080``) and a ``[models.NAME]`` table per model;
* one-line messages for a bad value that name where it came from: the variable, the flag or
  the file and key, so a user knows what to change;
* the effective configuration with secrets masked (``tokenbridge config``).

Precedence, highest first: command-line flags, ``TOKENBRIDGE_*`` variables, the config file,
defaults. This module reads no environment itself: ``settings.py`` does.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import SecretStr, ValidationError

from tokenbridge.exceptions import ConfigurationError

__all__ = [
    "describe_errors",
    "masked",
    "read_config_file",
    "safe_url",
]


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
            return safe_url(secret)
        return "***" if secret else ""
    if isinstance(value, dict):
        return {str(k): masked(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [masked(v) for v in value]
    if hasattr(value, "model_dump"):
        return masked(dict(value)) if not hasattr(value, "api_key_env") else _model(value)
    return value


def safe_url(url: str) -> str:
    """``url`` without its credentials (``redis://***@host:6379/0``), for messages and output."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    return f"{scheme}{sep}***@{rest.rpartition('@')[2]}"


def _model(entry: Any) -> dict[str, Any]:
    data: dict[str, Any] = {k: v for k, v in entry.model_dump().items() if v not in (None, [])}
    if entry.api_key_env:
        data["api_key"] = "set" if entry.api_key() is not None else "UNSET"
    return data
