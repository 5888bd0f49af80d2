"""A backend URL's query: tidings' own options taken out of it, and the URL as it may
be shown (no credential)."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from tidings.errors import ConfigurationError

__all__ = ["redact", "split_options"]


def split_options(
    url: str,
    *,
    floats: tuple[str, ...] = (),
    ints: tuple[str, ...] = (),
    strs: tuple[str, ...] = (),
    bools: tuple[str, ...] = (),
) -> tuple[str, dict[str, Any]]:
    """Take tidings' own options out of ``url``'s query: the URL with the rest of its
    query (the driver's parameters), and the options, converted.

    Raises:
        ConfigurationError: an option's value does not convert.
    """
    parts = urlsplit(url)
    rest: list[tuple[str, str]] = []
    options: dict[str, Any] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        try:
            if key in floats:
                options[key] = float(value)
            elif key in ints:
                options[key] = int(value)
            elif key in strs:
                options[key] = value
            elif key in bools:
                options[key] = value.lower() not in ("0", "false", "no", "off")
            else:
                rest.append((key, value))
        except ValueError as exc:
            raise ConfigurationError(f"bad {key!r} in {redact(url)!r}: {exc}") from exc
    return urlunsplit(parts._replace(query=urlencode(rest))), options


# Query parameters whose values are secrets, matched anywhere in the name (so that
# ``sslpassword``, ``api_key`` and ``access_token`` are caught too).
_SECRET_WORDS = ("pass", "pwd", "token", "secret", "key", "auth", "credential")


def _is_secret(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_WORDS)


def redact(url: str) -> str:
    """``url`` as it may be shown: its password and every credential-like query value
    (``password``, ``pass``, ``token``, ``secret``, ``key``...) replaced by ``***``."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not a URL one can take apart: show none of it
        return "<a URL that cannot be parsed>"
    # Edited in place rather than rebuilt, which would change what it does not redact
    # (``sqlite:///x.db`` would lose its slashes).
    shown = url
    if password is not None:
        user = parts.netloc.rpartition("@")[0].partition(":")[0]
        host = parts.netloc.rpartition("@")[2]
        shown = shown.replace(parts.netloc, f"{user}:***@{host}", 1)
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        if any(_is_secret(name) for name, _ in pairs):
            query = urlencode(
                [(name, "***" if _is_secret(name) else value) for name, value in pairs], safe="*"
            )
            head, _, _ = shown.partition("?")
            fragment = f"#{parts.fragment}" if parts.fragment else ""
            shown = f"{head}?{query}{fragment}"
    return shown
