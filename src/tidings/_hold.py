"""Events held back while an HTTP request is handled, and handed to the bus once its
response is sent (see :mod:`tidings.asgi`)."""

from __future__ import annotations

import contextvars
import logging
import time
from typing import TYPE_CHECKING, Any

from tidings.errors import QueueFull
from tidings.events import Event

if TYPE_CHECKING:
    from tidings.bus import Bus
    from tidings.listeners import Subscription

__all__ = ["Held", "Hold", "current", "enter", "hold_named", "leave", "open_hold"]

logger = logging.getLogger("tidings.asgi")

_current: contextvars.ContextVar[Hold | None] = contextvars.ContextVar("tidings_hold", default=None)

#: The innermost hold of the request being handled in this context, if any.
current = _current.get
#: Make a hold the current one (returns the token ``leave`` takes).
enter = _current.set
#: Restore the hold that was current before ``enter``.
leave = _current.reset


class Held:
    """One event a request emitted, held until its response is sent.

    A plain bus holds a named event as it was emitted (``event`` is ``None``: no
    envelope yet); a bus with something to check holds the checked envelope, its delay
    and the ``once`` listeners the emit took.
    """

    __slots__ = (
        "args",
        "context",
        "delay_s",
        "emitted_at",
        "event",
        "kwargs",
        "name",
        "subs",
        "taken",
    )

    def __init__(
        self,
        subs: tuple[Subscription, ...],
        context: contextvars.Context,
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        emitted_at: float,
        event: Event | None = None,
        delay_s: float | None = None,
        taken: list[tuple[Subscription, int]] | None = None,
    ) -> None:
        self.subs = subs
        self.context = context
        self.name = name
        self.args = args
        self.kwargs = kwargs
        self.emitted_at = emitted_at
        self.event = event
        self.delay_s = delay_s
        self.taken = taken

    def envelope(self) -> Event:
        """The held event's envelope (built now for a plain one)."""
        if self.event is None:
            return Event(self.name, self.args, self.kwargs, self.emitted_at)
        return self.event


class Hold:
    """The events one request emitted to one bus, waiting for its response to be sent."""

    __slots__ = ("bus", "items", "open", "outer", "status")

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.open = True
        self.status = 200  # of the response, once it starts
        self.items: list[Held] = []
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
                ", ".join(item.name for item in items),
            )
            for item in items:
                if item.event is not None:
                    for hook in bus.router.drop_hooks:
                        hook(item.event)
            return
        plain: list[Held] = []
        for item in items:
            if item.event is None:
                plain.append(item)
                continue
            if plain:
                await self._put_held(plain)
                plain = []
            event, subs, ctx = item.event, item.subs, item.context
            try:
                try:
                    bus.inbox.hand_over(event, subs, ctx, item.delay_s)
                except QueueFull:
                    await bus.inbox.put_wait(event, subs, ctx)
            except Exception:
                logger.exception(
                    "event %s (%s), held until the response was sent, could not be queued",
                    event.id,
                    event.name,
                )
        if plain:
            await self._put_held(plain)

    async def _put_held(self, items: list[Held]) -> None:
        bus = self.bus
        backend = bus.backend
        try:
            if backend.has_room(len(items)):
                backend.put_held(items)
                return
            for item in items:
                if backend.has_room(1):
                    backend.put_held([item])
                else:
                    await bus.inbox.put_wait(item.envelope(), item.subs, item.context)
        except Exception:
            logger.exception(
                "events held until the response was sent could not all be queued (%s)",
                ", ".join(item.name for item in items),
            )

    def drop(self) -> None:
        """Forget the held events (the request failed), and give back the once-listeners
        they took."""
        self.open = False
        router = self.bus.router
        for item in self.items:
            if item.event is not None:
                router.put_back(item.taken or [])
                for hook in router.drop_hooks:
                    hook(item.event)
        if self.items:
            logger.info(
                "the request failed: %d event(s) it emitted are dropped (%s)",
                len(self.items),
                ", ".join(item.name for item in self.items),
            )
        self.items = []


def open_hold(bus: Bus) -> Hold | None:
    """The open hold of ``bus`` for the request being handled here, if any."""
    hold = _current.get()
    if hold is not None and hold.bus is not bus:
        hold = Hold.find(bus)  # another bus's, outside
    return hold if hold is not None and hold.open else None


def hold_named(
    bus: Bus,
    subs: tuple[Subscription, ...],
    ctx: contextvars.Context,
    name: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> bool:
    """Hold a plain named event of ``bus`` until the response is sent, if a request is
    being handled here; whether it did. Nothing to check on a plain bus, so not even an
    envelope yet."""
    hold = open_hold(bus)
    if hold is None:
        return False
    name = name if type(name) is str else str.__str__(name)  # a StrEnum member's value
    hold.items.append(Held(subs, ctx, name, args, kwargs, time.time()))
    return True
