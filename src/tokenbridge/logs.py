"""Logging configuration that the CLI applies: rich on a terminal, JSON lines with --log-json.

Library modules only call ``logging.getLogger(__name__)``; nothing else installs handlers.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

__all__ = ["configure_logging"]


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
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
