"""Publishing inside the caller's database transaction: the event is stored with the
caller's connection, so it exists (and is delivered) only if the transaction commits::

    async with conn.transaction():
        await conn.execute("INSERT INTO orders ...")
        await bus.options(connection=conn).publish("order.placed", order_id=1)

A backend that can do this (PostgreSQL) offers an :class:`Outbox` as its ``outbox``;
the others have ``None`` there.
"""

from __future__ import annotations

from typing import Any, Protocol

from tidings.errors import ConfigurationError
from tidings.events import Event

__all__ = ["Outbox", "publish_in", "require"]


class Outbox(Protocol):
    """What a backend that stores events in the caller's transaction offers."""

    async def store_in(self, connection: Any, event: Event, delay_s: float | None) -> None:
        """Store ``event`` (due ``delay_s`` seconds after it was emitted, or at once)
        with the driver's ``connection``, in its current transaction if it is in one."""
        ...


def require(outbox: Outbox | None, kind: str, url: str) -> Outbox:
    """``outbox``, the backend's; a backend without one is refused.

    Raises:
        ConfigurationError: the backend (at ``url``) has no outbox.
    """
    if outbox is None:
        raise ConfigurationError(
            f"publish({kind}=...) stores the event in the caller's transaction, "
            f"which only the PostgreSQL backend can do (this bus is on {url})"
        )
    return outbox


async def publish_in(
    outbox: Outbox, where: tuple[str, Any], event: Event, delay_s: float | None
) -> None:
    """Store ``event`` with ``outbox`` in the transaction of ``where``: ``("connection",
    conn)`` or ``("session", an SQLAlchemy AsyncSession)``."""
    kind, handle = where
    if kind == "session":
        # A SQLAlchemy AsyncSession: its connection, down to the driver's own.
        connection = await handle.connection()
        raw = await connection.get_raw_connection()
        handle = raw.driver_connection
        if not handle.is_in_transaction():
            # SQLAlchemy's asyncpg adapter sends BEGIN only with the session's first
            # statement: written before that, the event would commit on its own, even
            # if the session then rolled back. A statement through the session begins
            # its transaction (on an autocommit engine there is none, and it writes as
            # the session would).
            await connection.exec_driver_sql("SELECT 1")
    await outbox.store_in(handle, event, delay_s)
