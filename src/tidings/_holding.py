"""Events held back while an HTTP request is handled, and handed to the bus once its
response is sent (see :mod:`tidings.asgi`)."""

from __future__ import annotations

import contextvars
import logging
from typing import TYPE_CHECKING, Any

from tidings.errors import QueueFull
from tidings.events import Event

if TYPE_CHECKING:
    from tidings.bus import Bus

__all__ = ["Hold", "current"]

logger = logging.getLogger("tidings.asgi")

_current: contextvars.ContextVar[Hold | None] = contextvars.ContextVar("tidings_hold", default=None)


#: The innermost hold of the request being handled in this context, if any.
current = _current.get


class Hold:
    """The events one request emitted to one bus, waiting for its response to be sent.

    ``items`` holds, in emit order, named events of a plain bus as lists (``[subscriptions,
    the emitter's context, name, args, kwargs, time of the emit]``, see
    ``Backend.put_held``) and events the bus checked and enveloped as tuples (``(event,
    subscriptions, context, delay, the once-listeners it took)``: it had something to
    check).
    """

    __slots__ = ("bus", "items", "open", "outer", "status")

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.open = True
        self.status = 200  # of the response, once it starts
        self.items: list[Any] = []
        #: The hold this one was made inside of (another bus's middleware), if any.
        self.outer: Hold | None = _current.get()

    @staticmethod
    def find(bus: Bus) -> Hold | None:
        """The open hold of ``bus`` in this context, if any."""
        hold = _current.get()
        while hold is not None and hold.bus is not bus:
            hold = hold.outer
        return hold if hold is not None and hold.open else None

    async def release(self) -> None:
        """Hand the held events to the bus; from now on, emits go straight to it (a
        task the request spawned may emit after the response). What does not fit in
        the queue waits for room: the request emitted it, so it was accepted."""
        self.open = False
        items = self.items
        if not items:
            return
        self.items = []
        bus = self.bus
        if not bus.started:
            logger.error(
                "the bus closed before the response was sent: %d event(s) the request "
                "emitted are dropped (%s)",
                len(items),
                ", ".join(_name(item) for item in items),
            )
            for item in items:
                if type(item) is tuple:
                    for hook in bus.router.drop_hooks:
                        hook(item[0])
            return
        plain: list[list[Any]] = []
        for item in items:
            if type(item) is list:
                plain.append(item)
                continue
            if plain:
                await self._put_held(plain)
                plain = []
            event, subs, ctx, delay_s, _taken = item
            try:
                try:
                    bus._hand_over(event, subs, ctx, delay_s)
                except QueueFull:
                    await bus._put_wait(event, subs, ctx)
            except Exception:
                logger.exception(
                    "event %s (%s), held until the response was sent, could not be queued",
                    event.id,
                    event.name,
                )
        if plain:
            await self._put_held(plain)

    async def _put_held(self, entries: list[list[Any]]) -> None:
        backend = self.bus.backend
        try:
            if backend.has_room(len(entries)):
                backend.put_held(entries)
                return
            for entry in entries:
                if backend.has_room(1):
                    backend.put_held([entry])
                else:
                    subs, ctx, name, args, kwargs, stamp = entry
                    await self.bus._put_wait(Event(name, args, kwargs, stamp), subs, ctx)
        except Exception:
            logger.exception(
                "events held until the response was sent could not all be queued (%s)",
                ", ".join(entry[2] for entry in entries),
            )

    def drop(self) -> None:
        """Forget the held events (the request failed), and give back the once-listeners
        they took."""
        self.open = False
        for item in self.items:
            if type(item) is tuple:
                self.bus.router.put_back(item[4])
                for hook in self.bus.router.drop_hooks:
                    hook(item[0])
        if self.items:
            logger.info(
                "the request failed: %d event(s) it emitted are dropped (%s)",
                len(self.items),
                ", ".join(_name(item) for item in self.items),
            )
        self.items = []


def _name(item: Any) -> str:
    return str(item[2] if type(item) is list else item[0].name)
