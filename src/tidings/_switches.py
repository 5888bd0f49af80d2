"""Switches read from the environment: ``TIDINGS_DISABLE`` (every emit a logged no-op)."""

from __future__ import annotations

import os

from tidings.errors import ConfigurationError

__all__ = ["disabled"]

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


def disabled() -> bool:
    """``TIDINGS_DISABLE`` as a boolean.

    Raises:
        ConfigurationError: a value that is neither true nor false.
    """
    value = os.environ.get("TIDINGS_DISABLE", "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigurationError(
        f"TIDINGS_DISABLE={value!r} is not a boolean: 1/true/yes/on disables emitting, "
        "0/false/no/off (or unset) enables it"
    )
