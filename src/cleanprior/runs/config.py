"""Run configurations written by an earlier version, read back with today's options."""

from __future__ import annotations

from typing import Any

__all__ = ["with_defaults"]


def with_defaults(saved: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``saved`` with every entry it lacks taken from ``defaults``, recursively.

    A run folder written before an option existed holds no value for it; the option then
    counts as having had its default, so that the folder resumes under today's configuration.

    Arguments:
        saved: The configuration as written (plain data).
        defaults: Today's defaults (plain data).

    Returns:
        A new dict; ``saved``'s values win wherever both have an entry.
    """
    merged = dict(defaults)
    for key, value in saved.items():
        old = merged.get(key)
        merged[key] = with_defaults(value, old) if isinstance(old, dict) and isinstance(value, dict) else value
    return merged
