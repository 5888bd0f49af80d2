"""Options of one emit, kept apart from its payload.

``emit`` and ``publish`` take the payload only: every keyword argument is the
listener's. What is about the event's journey travels in an :class:`EmitOptions`::

    bus.options(delay=60, key=order_id).emit("report.due", key="r1")  # key="r1" is payload
    await bus.options(headers={"tenant": "t1"}).publish("user.created", id=1)
    await bus.options(connection=conn).publish("user.created", id=1)  # PostgreSQL outbox

An options object is immutable and checked when made, so one may be kept and used for
many emits (``at=`` is read at each emit: once it has passed, the event is due at once).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from tidings._units import seconds
from tidings.errors import ConfigurationError, EmitError

if TYPE_CHECKING:
    from tidings.bus import Bus

__all__ = ["EmitOptions", "check_headers"]


class EmitOptions:
    """How one event travels: made by :meth:`Bus.options`, used with ``.emit(...)`` or
    ``await .publish(...)`` like the bus's own methods.

    Attributes:
        delay_s: seconds to wait before delivery (``None``: none; ``at=`` aside).
        at: an aware ``datetime`` to deliver at, or ``None``.
        key: the ordering key (reserved: events of one key will reach each listener in
            emit order).
        headers: the event's headers.
        connection, session: the caller's database connection or SQLAlchemy session, to
            store the event in its transaction (``publish`` on PostgreSQL only).
    """

    __slots__ = ("_bus", "at", "connection", "delay_s", "headers", "key", "session")

    _bus: Bus
    delay_s: float | None
    at: datetime | None
    key: Any
    headers: Mapping[str, str] | None
    connection: Any
    session: Any

    def __init__(
        self,
        bus: Bus,
        *,
        delay: float | timedelta | None = None,
        at: datetime | None = None,
        key: Any = None,
        headers: Mapping[str, str] | None = None,
        connection: Any = None,
        session: Any = None,
    ) -> None:
        if delay is not None and at is not None:
            raise EmitError("pass delay= or at=, not both")
        if connection is not None and session is not None:
            raise ConfigurationError("pass connection= or session=, not both")
        if at is not None:
            _check_at(at)
        fields = {
            "_bus": bus,
            "delay_s": None if delay is None else _delay_seconds(delay),
            "at": at,
            "key": key,
            "headers": None if headers is None else check_headers(headers),
            "connection": connection,
            "session": session,
        }
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"emit options are immutable: make new ones for {name}=")

    def emit(self, name_or_event: str | Any, /, *args: Any, **kwargs: Any) -> None:
        """Like :meth:`Bus.emit`, with these options (every keyword is payload).

        Raises:
            ConfigurationError: these options hold ``connection=`` or ``session=``,
                which only ``publish`` takes.
        """
        outbox = self.outbox
        if outbox is not None:
            raise ConfigurationError(
                f"only publish takes {outbox[0]}=: the event is stored in that "
                f"transaction, which emit cannot wait for (await "
                f"bus.options({outbox[0]}=...).publish(...))"
            )
        self._bus.sender.emit(self, name_or_event, args, kwargs)

    async def publish(self, name_or_event: str | Any, /, *args: Any, **kwargs: Any) -> None:
        """Like :meth:`Bus.publish`, with these options (every keyword is payload)."""
        await self._bus.sender.publish(self, name_or_event, args, kwargs)

    @property
    def outbox(self) -> tuple[str, Any] | None:
        """``("connection", conn)`` or ``("session", session)``, if one was given."""
        if self.connection is not None:
            return "connection", self.connection
        if self.session is not None:
            return "session", self.session
        return None

    def due_in(self) -> float | None:
        """Seconds from now until the event is due (0 once ``at`` has passed), or
        ``None`` for no delay."""
        if self.at is not None:
            return max((self.at - datetime.now(UTC)).total_seconds(), 0.0)
        return self.delay_s

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{name}={getattr(self, name)!r}"
            for name in ("delay_s", "at", "key", "headers")
            if getattr(self, name) is not None
        )
        outbox = self.outbox
        if outbox is not None:
            shown = f"{shown}, {outbox[0]}=..." if shown else f"{outbox[0]}=..."
        return f"<EmitOptions {shown}>"


def _delay_seconds(delay: Any) -> float:
    # A delay that has passed means now.
    return max(seconds(delay, "delay=", error=EmitError), 0.0)


def _check_at(at: Any) -> None:
    if not isinstance(at, datetime):
        raise EmitError(f"at= takes a datetime, not {at!r}")
    if at.tzinfo is None or at.utcoffset() is None:
        raise EmitError(
            f"at= needs an aware datetime (with a time zone), not the naive {at!r}: use "
            "datetime.now(UTC) + timedelta(...) or datetime(..., tzinfo=UTC)"
        )


def check_headers(headers: Any) -> dict[str, str]:
    """A copy of ``headers`` if it is a mapping of strings to strings that can be
    encoded (no lone surrogates), else raise.

    Raises:
        EmitError: not a mapping, a name or value that is not a string, or one that
            cannot be encoded.
    """
    if not isinstance(headers, Mapping):
        raise EmitError(f"headers= takes a dict of str to str, not {headers!r}")
    out: dict[str, str] = {}
    for name, value in headers.items():
        for what, text in (("name", name), ("value", value)):
            if not isinstance(text, str):
                raise EmitError(f"header {name!r}: its {what} must be a str, not {text!r}")
            try:
                text.encode()
            except UnicodeEncodeError as exc:
                raise EmitError(
                    f"header {name!r}: its {what} holds a lone surrogate and cannot be encoded"
                ) from exc
        if not name:
            raise EmitError("a header name cannot be empty")
        out[name] = value
    return out
