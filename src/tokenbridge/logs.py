"""Logging configuration that the CLI applies: rich on a terminal, JSON lines with --log-json.

Library modules only call ``logging.getLogger(__name__)``; nothing else installs handlers.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any

__all__ = ["RedactingFilter", "configure_logging", "redact"]

_SECRETS = re.compile(
    r"(?P<param>(?:token|login|api_key)=)[^&\s\"']+"
    r"|(?P<bearer>Bearer\s+)\S+"
    r"|tbk_[A-Za-z0-9_-]+"
    r"|eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+"
)


def _mask(match: re.Match[str]) -> str:
    prefix = match.group("param") or match.group("bearer") or ""
    return prefix + "***"


def redact(text: str) -> str:
    """Mask API keys, tokens, login codes and Bearer credentials in a log line."""
    return _SECRETS.sub(_mask, text)


class RedactingFilter(logging.Filter):
    """Rewrites every record's message with :func:`redact` (defense in depth: tokenbridge
    never logs credentials itself, but access logs and third-party libraries might)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str = "INFO", json_lines: bool = False) -> None:
    """Install one handler on the root logger (replacing any), at ``level``."""
    handler: logging.Handler
    if json_lines or not sys.stderr.isatty():
        handler = logging.StreamHandler(sys.stderr)
        if json_lines:
            handler.setFormatter(_JsonFormatter())
        else:
            handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
            )
    else:
        from rich.logging import RichHandler

        handler = RichHandler(show_path=False, rich_tracebacks=True)
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
