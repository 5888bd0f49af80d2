"""The backend protocol: what the bus needs from the place deliveries wait in.

The bus owns routing, retry policy, serialization and hooks. A backend only stores
deliveries, hands them to the bus's :class:`~tidings.delivery.Runner`, holds the ones to
retry later, and keeps dead letters.
"""

from __future__ import annotations

import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from contextvars import Context
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from tidings.errors import ConfigurationError
from tidings.events import Event

if TYPE_CHECKING:
    from tidings._contexts import ContextCopies
    from tidings.delivery import Runner
    from tidings.listeners import Subscription

__all__ = ["Backend", "DeadLetter", "backend_from_url", "redact", "split_options"]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A delivery that failed its last attempt."""

    event: Event
    listener: str
    error: str
    traceback: str
    attempts: int
    failed_at: float

    @classmethod
    def of(cls, event: Event, listener: str, exc: BaseException, failed_at: float) -> DeadLetter:
        """Record ``exc`` as the last error of ``event``'s delivery to ``listener``."""
        return cls(
            event=event,
            listener=listener,
            error=f"{type(exc).__qualname__}: {exc}",
            traceback="".join(traceback.format_exception(exc)),
            attempts=event.attempt,
            failed_at=failed_at,
        )


class Backend(ABC):
    """Holds deliveries and hands them to the bus's runner."""

    #: Whether deliveries survive the process (and payloads must serialize).
    durable: ClassVar[bool] = False
    #: Whether ``put``, ``put_later`` and ``put_wait`` serialize the payload at once,
    #: raising ``PayloadError``: the bus then skips its own check on the loop's thread.
    serializes_at_put: ClassVar[bool] = False

    @abstractmethod
    async def start(self, runner: Runner) -> None:
        """Begin handing deliveries to ``runner``."""

    @abstractmethod
    def put(self, event: Event, subs: tuple[Subscription, ...], ctx: Context) -> None:
        """Queue one delivery of ``event`` per subscription, without waiting.

        Raises:
            QueueFull: there is no room now.
        """

    def put_named(
        self,
        subs: tuple[Subscription, ...],
        ctx: Context,
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        """Queue a named event, emitted in ``ctx`` (a copy of the caller's context),
        like :meth:`put`.

        The bus's fast path for plain named events: a backend may queue them without
        building the envelope until something reads it.
        """
        self.put(Event(name, args, kwargs), subs, ctx)

    def put_held(self, entries: list[list[Any]]) -> None:
        """Queue named events that were emitted earlier and held until now (see
        :mod:`tidings.asgi`), like :meth:`put`. Each entry is ``[subscriptions, the
        emitter's context, name, args, kwargs, time of the emit]``.

        Raises:
            QueueFull: there is no room for all of them (those that fit are queued).
        """
        for subs, ctx, name, args, kwargs, timestamp in entries:
            self.put(Event(name, args, kwargs, timestamp=timestamp), subs, ctx)

    def fast_emit(
        self,
        routes: Mapping[str, tuple[Subscription, ...]],
        thread: int,
        fallback: Callable[..., None],
        contexts: ContextCopies,
    ) -> Callable[..., None] | None:
        """An ``emit`` function for a bus in its plain state, or ``None`` (the default).

        The bus installs it as its ``emit`` while nothing needs to see each event
        (no hooks, no strict checks, no serialization check) and removes it when that
        changes. It may queue a named event whose name is in ``routes``, emitted on the
        thread ``thread`` (every keyword is payload); anything else it hands to ``fallback`` (the
        bus's own ``emit``) with the same arguments. Its events are emitted in
        ``contexts.copy()`` (which it may inline).
        """
        return None

    @abstractmethod
    async def put_wait(
        self,
        event: Event,
        subs: tuple[Subscription, ...],
        ctx: Context,
        delay_s: float | None = None,
    ) -> None:
        """Queue like :meth:`put`, waiting for room (or for storage) instead of raising;
        with ``delay_s``, like :meth:`put_later` (a durable backend returns once stored)."""

    @abstractmethod
    def put_later(
        self, event: Event, subs: tuple[Subscription, ...], ctx: Context, delay_s: float
    ) -> None:
        """Queue the deliveries once ``delay_s`` seconds have passed."""

    @abstractmethod
    def retry(self, event: Event, sub: Subscription, ctx: Context, delay_s: float) -> None:
        """Run one delivery again (``event.attempt`` is the next attempt) after a delay."""

    @abstractmethod
    def dead(self, event: Event, sub: Subscription, exc: BaseException) -> None:
        """Keep a delivery that failed its last attempt as a dead letter."""

    @abstractmethod
    def has_room(self, count: int) -> bool:
        """Whether ``count`` more events fit now (may be read from any thread)."""

    @abstractmethod
    async def drain(self) -> None:
        """Wait until every queued, running and retrying delivery has finished."""

    @abstractmethod
    async def aclose(self, timeout_s: float | None) -> list[str]:
        """Drain for at most ``timeout_s`` seconds, stop, and return undelivered event ids."""

    @abstractmethod
    def dead_letters(self) -> list[DeadLetter]:
        """The dead letters kept, oldest first."""

    def stats(self) -> dict[str, Any]:
        """Counters of what waits and runs."""
        return {}

    async def claim_tick(self, schedule: str, tick: float) -> bool:
        """Whether this process fires ``schedule``'s ``tick`` (once across processes)."""
        return True


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
