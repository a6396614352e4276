"""as_text: the one bytes-to-str helper for Redis replies (ids, names, counters, keys)."""

from __future__ import annotations

__all__ = ["as_text"]


def as_text(value: object) -> str:
    """A reply value as text: bytes decoded as UTF-8 (bad bytes replaced), None as ``""``,
    anything else through ``str``. Entry fields are decoded by ``wire/`` (strictly) instead."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if value is None:
        return ""
    return str(value)
