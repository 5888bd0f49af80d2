"""Durations and counts: the one reading of a number of seconds or a ``timedelta``,
and of a whole number of things.

Every duration tidings takes (a timeout, a delay, a backoff, a lease) is a number of
seconds or a :class:`~datetime.timedelta`, read here, so that each is checked alike;
so is every count that must be at least 1 (a concurrency, a number of attempts).
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

from tidings.errors import ConfigurationError, TidingsError

__all__ = ["count", "positive_seconds", "positive_seconds_or_none", "seconds"]


def seconds(value: Any, what: str, *, error: type[TidingsError] = ConfigurationError) -> float:
    """``value`` in seconds: a number (not a bool) or a ``timedelta``, finite.

    ``what`` names the value in the error's message (``"timeout of listener f"``).

    Raises:
        ConfigurationError: (or ``error``) anything else, ``nan`` or an infinity.
    """
    if isinstance(value, timedelta):
        result = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        try:
            result = float(value)
        except OverflowError:  # an int too large for a float
            result = math.inf
    else:
        raise error(f"{what} takes seconds or a timedelta, not {value!r}")
    if not math.isfinite(result):
        raise error(f"{what} must be a finite number of seconds, not {value!r}")
    return result


def positive_seconds(value: Any, what: str) -> float:
    """``value`` in seconds, as :func:`seconds` reads it, and more than 0: a timeout, a
    lease, a poll interval.

    Raises:
        ConfigurationError: what :func:`seconds` raises, or 0 seconds or less.
    """
    result = seconds(value, what)
    if result <= 0:
        raise ConfigurationError(f"{what} must be more than 0 seconds, not {value!r}")
    return result


def positive_seconds_or_none(value: Any, what: str) -> float | None:
    """``None`` (none set) as is, else :func:`positive_seconds`."""
    return None if value is None else positive_seconds(value, what)


def count(value: Any, what: str) -> int:
    """``value`` if it is a whole number (an ``int``, not a bool) of at least 1.

    ``what`` names the value in the error's message (``"concurrency of listener f"``).

    Raises:
        ConfigurationError: anything else (``"2"``, ``2.5``, ``True``, 0).
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{what} must be a whole number of at least 1, not {value!r}")
    return value
