"""Events held back while an HTTP request is handled, and handed to the bus once its
response is sent (see :mod:`tidings.asgi`)."""

from __future__ import annotations

import contextvars
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tidings.bus import Bus
    from tidings.events import Event
    from tidings.listeners import Subscription

__all__ = ["Hold", "current"]

logger = logging.getLogger("tidings.asgi")

_current: contextvars.ContextVar[Hold | None] = contextvars.ContextVar("tidings_hold", default=None)


def current() -> Hold | None:
    """The hold of the request being handled in this context, if any."""
    return _current.get()


class Hold:
    """The events one request emitted to one bus, validated and waiting."""

    __slots__ = ("bus", "items", "open")

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.open = True
        self.items: list[tuple[Event, tuple[Subscription, ...], contextvars.Context, Any]] = []

    def enter(self) -> contextvars.Token[Hold | None]:
        return _current.set(self)

    @staticmethod
    def leave(token: contextvars.Token[Hold | None]) -> None:
        _current.reset(token)

    def release(self) -> None:
        """Hand the held events to the bus; from now on, emits go straight to it (a
        task the request spawned may emit after the response)."""
        self.open = False
        items, self.items = self.items, []
        for event, subs, ctx, delay_s in items:
            try:
                self.bus._hand_over(event, subs, ctx, delay_s)
            except Exception:
                logger.exception(
                    "event %s (%s), held until the response was sent, could not be queued",
                    event.id,
                    event.name,
                )

    def drop(self) -> None:
        """Forget the held events (the request failed)."""
        self.open = False
        if self.items:
            logger.info(
                "the request failed: %d event(s) it emitted are dropped (%s)",
                len(self.items),
                ", ".join(f"{e.name} {e.id}" for e, *_ in self.items),
            )
        self.items = []
