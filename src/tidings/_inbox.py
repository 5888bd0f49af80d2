"""Events emitted on other threads than the bus's loop's, handed over to that loop.

An emit from another thread appends to a deque (atomic) and, for the first event of a
burst, schedules one wake-up of the loop; the loop then queues the whole burst.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from typing import TYPE_CHECKING

from tidings.errors import QueueFull
from tidings.events import Event

if TYPE_CHECKING:
    from tidings.backends.base import Backend
    from tidings.listeners import Subscription

__all__ = ["Inbox"]

logger = logging.getLogger("tidings.bus")

# An event handed over from another thread: subscriptions, context and delay.
_Handed = tuple[Event, "tuple[Subscription, ...]", contextvars.Context, float | None]


class Inbox:
    """Hands events emitted on other threads to a backend, on its loop's thread."""

    def __init__(self) -> None:
        self.backend: Backend | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        #: Set when the bus closed: what arrives later is dropped, and logged.
        self.closed = False
        self._handed: deque[_Handed] = deque()
        self._scheduled = False
        # Set while the first event waits for room in the backend.
        self._waiter: asyncio.Task[None] | None = None

    def open(self, backend: Backend, loop: asyncio.AbstractEventLoop) -> None:
        """Hand events to ``backend`` on ``loop`` from now on."""
        self.backend = backend
        self.loop = loop
        self.closed = False
        self._handed.clear()
        self._scheduled = False
        self._waiter = None

    def hand(
        self,
        event: Event,
        subs: tuple[Subscription, ...],
        ctx: contextvars.Context,
        delay_s: float | None,
    ) -> None:
        """Hand an event emitted on this (another) thread over to the loop's.

        Raises:
            QueueFull: the backend has no room for it (nor for those handed before).
        """
        assert self.backend is not None
        assert self.loop is not None
        if delay_s is None and not self.backend.has_room(1 + len(self._handed)):
            raise QueueFull(
                f"the in-process queue is full; cannot queue event {event.name!r} "
                "(raise max_pending, or await bus.publish(...) to wait for room)"
            )
        # Handed over in bursts: one wake-up of the loop for the events other threads
        # emit before it gets to them. An append is atomic, and the flag is cleared
        # before the inbox is read, so no event waits without a wake-up on its way.
        self._handed.append((event, subs, ctx, delay_s))
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon_threadsafe(self._take)

    def _take(self) -> None:
        self._scheduled = False
        if self._waiter is not None:
            return  # the first waits for room; the rest follow it
        handed = self._handed
        if self.closed:
            # Emitted on another thread as the bus closed, and handed over too late.
            while handed:
                event = handed.popleft()[0]
                logger.error("event %s (%s) arrived after the bus closed", event.id, event.name)
            return
        backend = self.backend
        assert backend is not None
        while handed:
            event, subs, ctx, delay_s = handed[0]
            try:
                if delay_s is None:
                    backend.put(event, subs, ctx)
                else:
                    backend.put_later(event, subs, ctx, delay_s)
            except QueueFull:
                # The loop's own emits filled the queue first. Room was counted for this
                # one when it was emitted: it waits for room rather than be dropped.
                self._waiter = self.loop.create_task(self._wait_for_room())  # type: ignore[union-attr]
                return
            except Exception:
                # This one event's failure; it never stalls the events behind it.
                logger.exception(
                    "event %s (%s) emitted from a thread could not be queued", event.id, event.name
                )
            handed.popleft()

    async def _wait_for_room(self) -> None:
        event, subs, ctx, _delay = self._handed[0]
        try:
            await self.backend.put_wait(event, subs, ctx)  # type: ignore[union-attr]
        except Exception:
            logger.exception(
                "event %s (%s) emitted from a thread could not be queued", event.id, event.name
            )
        finally:
            self._waiter = None
        self._handed.popleft()
        self._take()

    async def empty(self) -> None:
        """Queue what other threads emitted, waiting for room if need be."""
        self._take()
        while self._waiter is not None:
            await asyncio.wait({self._waiter})

    async def close(self) -> list[str]:
        """Stop waiting for room; the ids of the events left (never queued)."""
        if self._waiter is not None:
            # Still no room: what other threads emitted stays out of a closing backend.
            self._waiter.cancel()
            await asyncio.gather(self._waiter, return_exceptions=True)
        left = [entry[0].id for entry in self._handed]
        self._handed.clear()
        return left
