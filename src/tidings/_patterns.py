"""Event-name patterns: ``.`` separates segments, ``*`` matches within one segment and
``**`` matches any number of segments (zero included)."""

from __future__ import annotations

import functools
import re

from tidings.errors import ConfigurationError

__all__ = ["is_pattern", "matches", "validate_name"]


def validate_name(name: object) -> str:
    """Return ``name`` if it is a usable event name or pattern, else raise.

    Raises:
        ConfigurationError: not a string, empty, or with an empty segment.
    """
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"an event name must be a non-empty string, not {name!r}")
    if any(not segment for segment in name.split(".")):
        raise ConfigurationError(f"event name {name!r} has an empty segment")
    for segment in name.split("."):
        if "**" in segment and segment != "**":
            raise ConfigurationError(
                f"pattern {name!r}: '**' must be a whole segment (as in 'user.**')"
            )
    return name


def is_pattern(name: str) -> bool:
    """Whether ``name`` holds a wildcard."""
    return "*" in name


@functools.lru_cache(maxsize=1024)
def _segment_regex(segment: str) -> re.Pattern[str]:
    return re.compile(
        "".join(".*" if part == "*" else re.escape(part) for part in split_segment(segment)),
        re.DOTALL,
    )


def split_segment(segment: str) -> list[str]:
    out: list[str] = []
    for i, chunk in enumerate(segment.split("*")):
        if i:
            out.append("*")
        if chunk:
            out.append(chunk)
    return out


def matches(pattern: str, name: str) -> bool:
    """Whether event ``name`` matches ``pattern``."""
    if not is_pattern(pattern):
        return pattern == name
    return _match(tuple(pattern.split(".")), tuple(name.split(".")))


@functools.lru_cache(maxsize=4096)
def _match(pattern: tuple[str, ...], name: tuple[str, ...]) -> bool:
    if not pattern:
        return not name
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_match(rest, name[i:]) for i in range(len(name) + 1))
    if not name:
        return False
    ok = _segment_regex(head).fullmatch(name[0]) is not None if "*" in head else head == name[0]
    return ok and _match(rest, name[1:])
