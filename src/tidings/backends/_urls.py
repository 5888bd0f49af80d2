"""The backend a URL names. It imports the backends (each when its scheme is asked
for); no backend imports it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tidings.backends._options import redact
from tidings.errors import ConfigurationError

if TYPE_CHECKING:
    from tidings.backends.base import Backend

__all__ = ["backend_from_url"]


def backend_from_url(url: str, **options: Any) -> Backend:
    """Build the backend a URL names: ``memory://``, ``sqlite:///path.db``,
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
        return MemoryBackend(**options)
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
