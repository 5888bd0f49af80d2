"""An event's way from ``emit`` or ``publish`` to the backend, past the bus's flat path:
checked and routed, held while a request is handled, then handed over (or, for
``publish``, waited for until the backend accepted it)."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import TYPE_CHECKING, Any

from tidings._hold import Held, open_hold
from tidings._routing import Taken
from tidings.errors import NotStartedError
from tidings.events import Event
from tidings.outbox import publish_in
from tidings.outbox import require as outbox_of

if TYPE_CHECKING:
    from tidings.bus import Bus
    from tidings.listeners import Subscription
    from tidings.options import EmitOptions

__all__ = ["Sender"]

logger = logging.getLogger("tidings.bus")

_copy_context = contextvars.copy_context


class Sender:
    """Sends one bus's events that need more than its flat path."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    def event_of(
        self, name_or_event: str | Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Event:
        """The envelope of what ``emit`` was given."""
        if type(name_or_event) is str:
            return Event(name_or_event, args, kwargs)
        return self.bus.router.typed(name_or_event, args, kwargs)

    def emit(
        self,
        options: EmitOptions | None,
        name_or_event: str | Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        """``emit``, with ``options`` if given (see :class:`~tidings.options.EmitOptions`)."""
        event = self.event_of(name_or_event, args, kwargs)
        if options is not None and options.headers:
            event.headers = dict(options.headers)
        self.dispatch(event, None if options is None else options.due_in())

    def dispatch(self, event: Event, delay_s: float | None) -> None:
        """Check and route ``event``, then hold it (during a request) or hand it over."""
        prepared = self.prepare(event)
        if prepared is None:
            return
        subs, ctx, taken = prepared
        bus = self.bus
        hold = open_hold(bus) if bus.holders else None
        if hold is not None:
            # Emitted while a request is handled: validated now, queued once the response
            # is sent (tidings.asgi).
            held = Held(subs, ctx, event.name, event.args, event.kwargs, event.timestamp)
            held.event, held.delay_s, held.taken = event, delay_s, taken
            hold.items.append(held)
            return
        try:
            bus.inbox.hand_over(event, subs, ctx, delay_s)
        except Exception:
            bus.router.put_back(taken)
            raise

    def prepare(
        self, event: Event
    ) -> tuple[tuple[Subscription, ...], contextvars.Context, Taken] | None:
        """The subscriptions ``event`` reaches, the emitter's context it runs in, and the
        ``once`` listeners it took; ``None`` when it is not sent (nobody listens, or
        ``TIDINGS_DISABLE``).

        Raises:
            NotStartedError: the bus is not started, or closed.
            What :meth:`tidings.Bus.emit` raises for a refused event.
        """
        bus = self.bus
        if not bus.started:
            if bus.disabled:
                logger.debug("TIDINGS_DISABLE is set: event %r not emitted", event.name)
                return None
            state = "is closed" if bus.loop is not None else "is not started"
            raise NotStartedError(
                f"cannot emit {event.name!r}: the bus {state}; start it with "
                "'async with bus:' or 'await bus.start()' (a framework plugin does this "
                "in the app's lifespan)"
            )
        if bus.disabled:
            logger.debug("TIDINGS_DISABLE is set: event %r not emitted", event.name)
            return None
        backend = bus.backend
        durable = backend.durable
        here = bus.inbox.on_loop_thread()
        serialize = bus.router.check_serializable and not (backend.serializes_at_put and here)
        routed = bus.router.route(event, durable=durable, serialize=serialize)
        if routed is None:
            return None
        subs, taken = routed
        # An in-process backend delivers in the emitter's context, shared by the events
        # it emits in a row; a durable one has no use for more than a plain copy.
        if durable:
            return subs, _copy_context(), taken
        contexts = bus.contexts
        return subs, contexts.copy() if here else contexts.copy_elsewhere(), taken

    async def publish(
        self,
        options: EmitOptions | None,
        name_or_event: str | Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        """``publish``, with ``options`` if given: return once the backend accepted the
        event (stored, on a durable one; in the caller's transaction, with an outbox)."""
        bus = self.bus
        where = None if options is None else options.outbox
        outbox = None if where is None else outbox_of(bus.backend.outbox, where[0], bus.url)
        event = self.event_of(name_or_event, args, kwargs)
        if options is not None and options.headers:
            event.headers = dict(options.headers)
        prepared = self.prepare(event)
        if prepared is None:
            return
        subs, ctx, taken = prepared
        delay_s = None if options is None else options.due_in()
        try:
            if outbox is not None and where is not None:
                await publish_in(outbox, where, event, delay_s)
            else:
                await bus.inbox.put_wait(event, subs, ctx, delay_s)
        except asyncio.CancelledError:
            # Cancelled while it waited: in memory, that means before it was queued; a
            # durable backend may have it stored already.
            if not bus.backend.durable:
                bus.router.put_back(taken)
            raise
        except Exception:
            bus.router.put_back(taken)
            raise
