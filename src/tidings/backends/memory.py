"""The in-process backend: a bounded FIFO queue drained on the event loop.

At most once: what is queued is lost if the process dies, and drained on a graceful
stop. Deliveries run in queue order; a listener with ``concurrency=1`` sees its events
in emit order. The queue holds one entry per event (not per delivery) and is flushed in
bounded batches by a loop callback, so emitting and delivering cost no task unless a
listener really waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from contextvars import Context
from typing import TYPE_CHECKING, Any

from tidings.backends.base import Backend, DeadLetter
from tidings.errors import QueueFull
from tidings.events import Event

if TYPE_CHECKING:
    from tidings.delivery import Runner
    from tidings.listeners import Subscription

__all__ = ["MemoryBackend"]

logger = logging.getLogger("tidings.backends.memory")

_Entry = tuple[Event, "tuple[Subscription, ...]", Context]

# Deliveries started per loop callback, so a burst never starves other callbacks.
_BATCH = 8192


class _Gate:
    """Per-listener concurrency: how many of its deliveries run, and who waits."""

    __slots__ = ("backlog", "limit", "running")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0
        self.backlog: deque[_Entry] = deque()


class MemoryBackend(Backend):
    """Deliveries in a bounded in-process queue.

    Args:
        max_pending: deliveries that may wait at once; ``emit`` raises ``QueueFull``
            past it, ``publish`` waits.
        concurrency: deliveries that may be suspended (awaiting) at once, all listeners
            together.
        max_dead_letters: how many recent dead letters are kept for inspection.
    """

    def __init__(
        self,
        *,
        max_pending: int = 100_000,
        concurrency: int = 1000,
        max_dead_letters: int = 1000,
    ) -> None:
        self.max_pending = max_pending
        self.concurrency = concurrency
        self._queue: deque[_Entry] = deque()
        self._pending = 0  # deliveries queued or in a backlog, not started
        self._running: dict[asyncio.Future[Any], tuple[Event, Subscription]] = {}
        self._gates: dict[Subscription, _Gate] = {}
        self._timers: dict[asyncio.TimerHandle, list[Event]] = {}
        self._retrying = 0
        self._dead: deque[DeadLetter] = deque(maxlen=max_dead_letters)
        self._scheduled = False
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._room_waiters: deque[asyncio.Future[None]] = deque()
        self._runner: Runner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self, runner: Runner) -> None:
        self._runner = runner
        self._loop = runner.loop

    # -- queueing -------------------------------------------------------------------

    def has_room(self, count: int) -> bool:
        return self._pending + count <= self.max_pending

    def put(self, event: Event, subs: tuple[Subscription, ...], ctx: Context) -> None:
        n = len(subs)
        if self._pending + n > self.max_pending:
            raise QueueFull(
                f"the in-process queue holds {self._pending} deliveries (max_pending="
                f"{self.max_pending}); cannot queue event {event.name!r}: await "
                "bus.publish(...) to wait for room, or raise max_pending"
            )
        self._pending += n
        self._queue.append((event, subs, ctx))
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)  # type: ignore[union-attr]

    async def put_wait(self, event: Event, subs: tuple[Subscription, ...], ctx: Context) -> None:
        while not self.has_room(len(subs)) and self._pending:
            waiter = self._loop.create_future()  # type: ignore[union-attr]
            self._room_waiters.append(waiter)
            await waiter
        self._pending += len(subs)
        self._queue.append((event, subs, ctx))
        self._schedule()

    def _force(self, event: Event, subs: tuple[Subscription, ...], ctx: Context) -> None:
        self._pending += len(subs)
        self._queue.append((event, subs, ctx))
        self._schedule()

    def put_later(
        self, event: Event, subs: tuple[Subscription, ...], ctx: Context, delay_s: float
    ) -> None:
        self._timer(delay_s, [event], self._force, event, subs, ctx)

    def retry(self, event: Event, sub: Subscription, ctx: Context, delay_s: float) -> None:
        self._retrying += 1
        self._timer(delay_s, [event], self._retry_now, event, sub, ctx)

    def _retry_now(self, event: Event, sub: Subscription, ctx: Context) -> None:
        self._retrying -= 1
        self._force(event, (sub,), ctx)

    def _timer(self, delay_s: float, events: list[Event], fn: Any, *args: Any) -> None:
        loop = self._loop
        assert loop is not None
        handle: asyncio.TimerHandle

        def fire() -> None:
            self._timers.pop(handle, None)
            fn(*args)

        handle = loop.call_later(delay_s, fire)
        self._timers[handle] = events

    def dead(self, event: Event, sub: Subscription, exc: BaseException) -> None:
        self._dead.append(DeadLetter.of(event, sub.listener.qualname, exc, time.time()))

    def dead_letters(self) -> list[DeadLetter]:
        return list(self._dead)

    def take_dead(self, ids: Sequence[str] | None, listener: str | None) -> list[DeadLetter]:
        """Remove and return the dead letters of these event ids and/or this listener."""
        wanted = None if ids is None else set(ids)
        taken: list[DeadLetter] = []
        kept: deque[DeadLetter] = deque(maxlen=self._dead.maxlen)
        for letter in self._dead:
            if (wanted is None or letter.event.id in wanted) and (
                listener is None or letter.listener == listener
            ):
                taken.append(letter)
            else:
                kept.append(letter)
        self._dead = kept
        return taken

    # -- running --------------------------------------------------------------------

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)  # type: ignore[union-attr]

    def _flush(self) -> None:
        self._scheduled = False
        queue = self._queue
        run = self._runner.run  # type: ignore[union-attr]
        running = self._running
        limit = self.concurrency
        budget = _BATCH
        # The concurrency limit is checked per event: one event's deliveries all start.
        while queue and budget > 0 and len(running) < limit:
            event, subs, ctx = queue.popleft()
            if len(subs) == 1:
                sub = subs[0]
                budget -= 1
                if sub.listener.concurrency is not None:
                    self._gated(event, sub, ctx)
                    continue
                self._pending -= 1
                fut = run(event, sub, ctx)
                if fut is not None:
                    running[fut] = (event, sub)
                    fut.add_done_callback(self._done)
                continue
            last = len(subs) - 1
            budget -= last + 1
            for i, sub in enumerate(subs):
                # Each delivery gets its own copy of the emitter's context, the last one
                # the original: what one listener sets is never seen by another.
                dctx = ctx if i == last else ctx.copy()
                if sub.listener.concurrency is not None:
                    self._gated(event, sub, dctx)
                    continue
                self._pending -= 1
                fut = run(event, sub, dctx)
                if fut is not None:
                    running[fut] = (event, sub)
                    fut.add_done_callback(self._done)
        if queue and len(running) < limit:
            self._schedule()
        if self._room_waiters or self._idle_waiters:
            self._wake()

    def _gated(self, event: Event, sub: Subscription, ctx: Context) -> None:
        gate = self._gates.get(sub)
        if gate is None:
            gate = self._gates[sub] = _Gate(sub.listener.concurrency or 1)
        if gate.running < gate.limit and not gate.backlog:
            self._start_gated(gate, event, sub, ctx)
        else:
            # Behind earlier deliveries of the same listener: keeps its order.
            gate.backlog.append((event, (sub,), ctx))

    def _start_gated(self, gate: _Gate, event: Event, sub: Subscription, ctx: Context) -> None:
        self._pending -= 1
        fut = self._runner.run(event, sub, ctx)  # type: ignore[union-attr]
        if fut is not None:
            gate.running += 1
            self._running[fut] = (event, sub)
            fut.add_done_callback(self._done)

    def _pump(self, gate: _Gate) -> None:
        """Start a gate's backlogged deliveries while it has room (bounded per call)."""
        budget = _BATCH
        while gate.backlog and gate.running < gate.limit and budget:
            budget -= 1
            event, subs, ctx = gate.backlog.popleft()
            self._start_gated(gate, event, subs[0], ctx)
        if gate.backlog and gate.running < gate.limit:
            self._loop.call_soon(self._pump, gate)  # type: ignore[union-attr]
        elif not gate.backlog:
            self._wake()

    def _done(self, fut: asyncio.Future[Any]) -> None:
        _, sub = self._running.pop(fut)
        gate = self._gates.get(sub)
        if gate is not None:
            gate.running -= 1
            if gate.backlog:
                self._pump(gate)
        if self._queue:
            self._schedule()
        self._wake()

    def _wake(self) -> None:
        while self._room_waiters and self._pending < self.max_pending:
            waiter = self._room_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
        if self._idle_waiters and self._idle():
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _idle(self) -> bool:
        return not self._queue and not self._running and not self._retrying and not self._pending

    async def drain(self) -> None:
        loop = self._loop
        if loop is None:
            return
        while not self._idle():
            waiter = loop.create_future()
            self._idle_waiters.append(waiter)
            await waiter

    async def aclose(self, timeout_s: float | None) -> list[str]:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.drain(), timeout_s)
        undelivered: list[str] = []
        for event, _subs, _ctx in self._queue:
            undelivered.append(event.id)
        for gate in self._gates.values():
            undelivered.extend(event.id for event, _subs, _ctx in gate.backlog)
            gate.backlog.clear()
        for handle, events in self._timers.items():
            handle.cancel()
            undelivered.extend(event.id for event in events)
        self._timers.clear()
        for fut, (event, _sub) in list(self._running.items()):
            fut.cancel()
            undelivered.append(event.id)
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        self._queue.clear()
        self._pending = 0
        self._retrying = 0
        return list(dict.fromkeys(undelivered))

    def stats(self) -> dict[str, Any]:
        return {
            "pending": self._pending,
            "running": len(self._running),
            "retrying": self._retrying,
            "scheduled": len(self._timers) - self._retrying,
            "dead": len(self._dead),
        }
