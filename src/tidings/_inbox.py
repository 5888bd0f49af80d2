"""Events handed to the backend from whichever thread emitted them.

On the loop's thread an event goes straight to the backend. An emit from another thread
appends to a deque (atomic) and, for the first event of a burst, schedules one wake-up
of the loop; the loop then queues the whole burst.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from collections import deque
from typing import TYPE_CHECKING

import msgspec

from tidings.codec import decode_payload, encode_payload
from tidings.errors import QueueFull
from tidings.events import Event

if TYPE_CHECKING:
    from tidings.backends.base import Backend
    from tidings.listeners import Subscription

__all__ = ["Inbox"]

logger = logging.getLogger("tidings.bus")

# An event handed over from another thread: subscriptions, context and delay.
_Handed = tuple[Event, "tuple[Subscription, ...]", contextvars.Context, float | None]


_get_ident = threading.get_ident


class Inbox:
    """Hands events to a backend on its loop's thread, from any thread."""

    def __init__(self) -> None:
        self.backend: Backend | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        #: The loop's thread.
        self.thread = 0
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
        self.thread = _get_ident()
        self.closed = False
        self._handed.clear()
        self._scheduled = False
        self._waiter = None

    def on_loop_thread(self) -> bool:
        """Whether the calling thread is the loop's."""
        return _get_ident() == self.thread

    def hand_over(
        self,
        event: Event,
        subs: tuple[Subscription, ...],
        ctx: contextvars.Context,
        delay_s: float | None,
    ) -> None:
        """Queue an event in the backend now, or hand it to the loop's thread.

        Raises:
            QueueFull: the backend has no room for it.
            PayloadError: a backend that stores payloads cannot store this one.
        """
        backend = self.backend
        assert backend is not None
        if _get_ident() != self.thread:
            if backend.serializes_at_put:
                # Encoded here, on the emitting thread: a payload that cannot be stored
                # is this emit's error, and what the caller changes later is not stored.
                event = _frozen(event, backend.codec)
            self.hand(event, subs, ctx, delay_s)
        elif delay_s is not None:
            backend.put_later(event, subs, ctx, delay_s)
        else:
            backend.put(event, subs, ctx)

    async def put_wait(
        self,
        event: Event,
        subs: tuple[Subscription, ...],
        ctx: contextvars.Context,
        delay_s: float | None = None,
    ) -> None:
        """The backend's ``put_wait``, run on its loop whichever loop awaits it (a test
        client's, in a thread of its own)."""
        loop = self.loop
        assert loop is not None
        put = (
            self.backend.put_wait(event, subs, ctx)  # type: ignore[union-attr]
            if delay_s is None
            else self.backend.put_wait(event, subs, ctx, delay_s=delay_s)  # type: ignore[union-attr]
        )
        if asyncio.get_running_loop() is loop:
            await put
        else:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(put, loop))

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


def _frozen(event: Event, codec: str) -> Event:
    """A copy of ``event`` (same id) whose payload is what it encodes to now, in the
    backend's format (so it is stored as it would have been).

    Raises:
        PayloadError: the payload cannot be serialized.
    """
    args, kwargs, obj = decode_payload(encode_payload(event, codec))
    return msgspec.structs.replace(event, _id=event.id, args=args, kwargs=kwargs, obj=obj)
