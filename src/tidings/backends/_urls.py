"""The backend a URL names. It imports the backends (each when its scheme is asked
for); no backend imports it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from tidings.backends._options import redact, split_options
from tidings.backends.base import Backend
from tidings.errors import ConfigurationError

__all__ = ["backend_for", "backend_from_url"]


def backend_from_url(url: str, **options: Any) -> Backend:
    """Build the backend a URL names: ``memory://`` (its query may set ``max_pending``
    and ``concurrency``), ``sqlite:///path.db``,
    ``redis://host:port/db`` (also ``rediss://`` and ``unix://``) or
    ``postgresql://user@host/db`` (also ``postgres://``).

    ``options`` are the bus's settings; each backend takes those it knows.

    Raises:
        ConfigurationError: an unknown scheme.
    """
    scheme = url.split("://", 1)[0].lower() if "://" in url else url.lower()
    if scheme == "memory":
        from tidings.backends.memory import MemoryBackend

        options.pop("consume", None)
        rest, ours = split_options(url, ints=("max_pending", "concurrency"))
        for key, _ in parse_qsl(urlsplit(rest).query, keep_blank_values=True):
            raise ConfigurationError(
                f"unknown option {key!r} in {redact(url)!r}: memory:// takes max_pending "
                "and concurrency"
            )
        return MemoryBackend(**{**options, **ours})
    if scheme == "sqlite":
        from tidings.backends.sqlite import SQLiteBackend

        return SQLiteBackend.from_url(url, **options)
    if scheme in ("postgres", "postgresql"):
        from tidings.backends.postgres import PostgresBackend

        return PostgresBackend.from_url(url, **options)
    if scheme in ("redis", "rediss", "unix"):
        from tidings.backends.redis import RedisBackend

        return RedisBackend.from_url(url, **options)
    raise ConfigurationError(
        f"unknown backend URL {redact(url)!r}: expected 'memory://', 'sqlite:///path.db', "
        "'redis://host:port/db' or 'postgresql://host/db'"
    )


def backend_for(
    backend: Backend | str | None, *, max_pending: int, concurrency: int, consume: bool
) -> tuple[Backend, str, Callable[[], Backend] | None]:
    """The backend a bus was given (an object, a URL, or ``None`` for memory), the URL
    it may be shown as (no credential), and how to make it anew (from a URL only: a
    durable backend does not start twice, so a bus that starts again makes another).

    Raises:
        ConfigurationError: neither a URL nor a backend, or an unknown scheme.
    """
    if backend is not None and not isinstance(backend, str):
        if not isinstance(backend, Backend):
            raise ConfigurationError(f"backend must be a URL or a Backend, not {backend!r}")
        if not consume and backend.durable:
            backend.consume = False
        return backend, repr(backend), None
    url = backend or "memory://"
    options: dict[str, Any] = {"max_pending": max_pending}
    if url.startswith("memory"):
        options["concurrency"] = concurrency
    else:
        options["consume"] = consume
    return backend_from_url(url, **options), redact(url), lambda: backend_from_url(url, **options)
