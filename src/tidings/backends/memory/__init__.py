"""The in-process backend: a bounded FIFO queue drained on the event loop.

At most once: what is queued is lost if the process dies, and drained on a graceful
stop. Deliveries start in queue order; a listener with ``concurrency=1`` sees its
events in emit order.

The queue and the workers that start and drive its deliveries are the fast path, in
:mod:`tidings.backends.memory._pump`; this module holds the rest: room and waiting for
it, listeners' concurrency limits, delayed and retried deliveries, dead letters,
draining and closing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterable
from contextvars import Context
from typing import TYPE_CHECKING, Any

from tidings._units import count
from tidings.backends.base import Backend
from tidings.backends.memory._pump import Pump, timed
from tidings.errors import NotStartedError, QueueFull
from tidings.events import Event, QueuedEvent

if TYPE_CHECKING:
    from tidings._hold import Held
    from tidings.delivery import Delivery, Runner, Tally
    from tidings.listeners import Subscription

__all__ = ["MemoryBackend"]

logger = logging.getLogger("tidings.backends.memory")

# Deliveries started per loop callback from a listener's backlog.
_BATCH = 8192

_time = time.time

# The positional arguments of a typed event's entry: never called with directly.
_TYPED = (None,)

_clock = time.perf_counter

_GateEntry = tuple[Event, "tuple[Subscription, ...]", Context]


class _Gate:
    """Per-listener concurrency: how many of its deliveries run, and who waits."""

    __slots__ = ("backlog", "limit", "running")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0
        self.backlog: deque[_GateEntry] = deque()


class MemoryBackend(Backend):
    """Deliveries in a bounded in-process queue.

    Args:
        max_pending: events that may wait to start at once, each counted once however
            many listeners it has (deliveries held back by a listener's concurrency
            limit count too); ``emit`` raises ``QueueFull`` past it, ``publish`` waits.
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
        super().__init__(max_dead_letters=max_dead_letters)
        self.max_pending = count(max_pending, "max_pending")
        self.concurrency = count(concurrency, "concurrency")
        # Deliveries the runner started as tasks of their own: sync listeners, those
        # behind a concurrency limit, observed ones.
        self._running: dict[asyncio.Future[Any], tuple[Event, Subscription]] = {}
        self._pump = Pump(
            max_pending=max_pending,
            concurrency=concurrency,
            running=self._running,
            start_other=self._start_other,
            changed=self._changed,
        )
        self._queue = self._pump.queue
        #: The bus's flat emit appends plain named events here.
        self.inlet = self._pump
        self._backlogged = 0  # deliveries waiting behind a listener's concurrency gate
        self._gates: dict[Subscription, _Gate] = {}
        self._timers: dict[asyncio.TimerHandle, list[Event]] = {}
        self._retrying = 0
        self._stopped = False  # closed: no delivery starts any more
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._room_waiters: deque[asyncio.Future[None]] = deque()
        self._runner: Runner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tally: Tally | None = None
        # With a tally: when each delivery in ``_running`` started (``perf_counter``).
        self._started: dict[asyncio.Future[Any], float] = {}

    def count_into(self, tally: Tally) -> None:
        """Count emits and time deliveries into ``tally`` for metrics, before start
        (see :class:`tidings.delivery.Tally`)."""
        self._tally = self._pump.tally = tally

    def in_progress(self) -> list[Subscription]:
        """The subscriptions of the deliveries running now, one per delivery (those
        suspended in line are known with a tally only)."""
        # Copied at once: a scrape may read this from another thread.
        running = list(self._running.values())
        return self._pump.in_progress() + [sub for _event, sub in running]

    async def start(self, runner: Runner) -> None:
        await super().start(runner)
        self._runner = runner
        self._loop = runner.loop
        self._stopped = False
        self._pump.start(runner)

    # -- queueing -------------------------------------------------------------------

    def has_room(self, count: int) -> bool:
        return len(self._queue) + count - 1 < self._pump.room

    def _full(self, name: str) -> QueueFull:
        return QueueFull(
            f"the in-process queue holds {len(self._queue) + self._backlogged} events "
            f"(max_pending={self.max_pending}); cannot queue event {name!r}: await "
            "bus.publish(...) to wait for room, or raise max_pending"
        )

    def put_held(self, items: list[Held]) -> None:
        pump = self._pump
        fits = max(pump.room - len(self._queue), 0)
        for item in items[:fits]:
            pump.put(
                QueuedEvent(
                    item.subs, item.context, item.name, item.args, item.kwargs, item.emitted_at
                )
            )
        if fits < len(items):
            raise self._full(items[fits].name)

    def put_named(
        self,
        subs: tuple[Subscription, ...],
        ctx: Context,
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        # Pump.put, inlined: this method is most of the cost of an emit.
        pump = self._pump
        queue = self._queue
        if len(queue) >= pump.room:
            raise self._full(name)
        queue.append(QueuedEvent(subs, ctx, name, args, kwargs, _time()))
        if not pump.pumping:
            pump.activate()

    def put(self, event: Event, subs: tuple[Subscription, ...], ctx: Context) -> None:
        if len(self._queue) >= self._pump.room:
            raise self._full(event.name)
        self._force(event, subs, ctx)

    async def put_wait(
        self,
        event: Event,
        subs: tuple[Subscription, ...],
        ctx: Context,
        delay_s: float | None = None,
    ) -> None:
        if delay_s is not None:
            if self._stopped:
                raise NotStartedError(f"cannot queue event {event.name!r}: the bus is closed")
            self.put_later(event, subs, ctx, delay_s)
            return
        while (
            not self._stopped
            and len(self._queue) >= self._pump.room
            and (self._queue or self._backlogged)
        ):
            waiter = self._loop.create_future()  # type: ignore[union-attr]
            self._room_waiters.append(waiter)
            self._pump.watched = True
            await waiter
        if self._stopped:
            raise NotStartedError(
                f"cannot queue event {event.name!r}: the bus closed while it waited for room"
            )
        self._force(event, subs, ctx)

    def _force(self, event: Event, subs: tuple[Subscription, ...], ctx: Context) -> None:
        # A typed event's listeners bind through their plans: non-empty "args" say so.
        args = event.args if event.obj is None else _TYPED
        self._pump.put(
            QueuedEvent(subs, ctx, event.name, args, event.kwargs, event.timestamp, event)
        )

    def put_later(
        self, event: Event, subs: tuple[Subscription, ...], ctx: Context, delay_s: float
    ) -> None:
        self._timer(delay_s, [event], self._force, event, subs, ctx)

    def retry(self, event: Event, sub: Subscription, ctx: Context, delay_s: float) -> None:
        self._retrying += 1
        self._timer(delay_s, [event], self._retry_now, event, sub, ctx)

    def _retry_now(self, event: Event, sub: Subscription, ctx: Context) -> None:
        self._retrying -= 1
        if self._tally is not None:
            self._pump.uncount(event.name)  # a retry is no emit
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

    # -- running --------------------------------------------------------------------

    def deliver(self, delivery: Delivery) -> None:
        """Start a delivery now, within its listener's concurrency limit (from here on,
        this backend's own counts track it)."""
        self._ended(delivery)
        self._start_other(delivery.event, delivery.subscription, delivery.context)

    def _start_other(self, event: Event, sub: Subscription, pristine: Context) -> None:
        """A delivery the runner starts: a sync listener, one whose deliveries pass its
        concurrency gate, or any when deliveries are observed."""
        ctx = pristine.copy()
        if sub.listener.concurrency is not None:
            self._gated(event, sub, ctx)
            return
        fut = self._run(event, sub, ctx)
        if fut is not None:
            self._running[fut] = (event, sub)
            fut.add_done_callback(self._done)

    def _gated(self, event: Event, sub: Subscription, ctx: Context) -> None:
        gate = self._gates.get(sub)
        if gate is None:
            gate = self._gates[sub] = _Gate(sub.listener.concurrency or 1)
        if gate.running < gate.limit and not gate.backlog:
            self._start_gated(gate, event, sub, ctx)
        else:
            # Behind earlier deliveries of the same listener: keeps its order.
            gate.backlog.append((event, (sub,), ctx))
            self._backlogged += 1
            self._pump.room -= 1

    def _start_gated(self, gate: _Gate, event: Event, sub: Subscription, ctx: Context) -> None:
        fut = self._run(event, sub, ctx)
        if fut is not None:
            gate.running += 1
            self._running[fut] = (event, sub)
            fut.add_done_callback(self._done)

    def _run(self, event: Event, sub: Subscription, ctx: Context) -> asyncio.Future[Any] | None:
        """Start a delivery through the runner (timed, with a tally)."""
        if self._tally is None:
            return self._runner.run(event, sub, ctx)  # type: ignore[union-attr]
        started = _clock()
        fut = self._runner.run(event, sub, ctx)  # type: ignore[union-attr]
        if fut is None:
            timed(self._tally, sub, _clock() - started)
        else:
            self._started[fut] = started
        return fut

    def _pump_gate(self, gate: _Gate) -> None:
        """Start a gate's backlogged deliveries while it has room (bounded per call)."""
        budget = _BATCH
        while gate.backlog and gate.running < gate.limit and budget:
            budget -= 1
            event, subs, ctx = gate.backlog.popleft()
            self._backlogged -= 1
            self._pump.room += 1
            self._start_gated(gate, event, subs[0], ctx)
        if gate.backlog and gate.running < gate.limit:
            self._loop.call_soon(self._pump_gate, gate)  # type: ignore[union-attr]
        elif not gate.backlog:
            self._wake()

    def _done(self, fut: asyncio.Future[Any]) -> None:
        _, sub = self._running.pop(fut)
        started = self._started.pop(fut, None)
        if started is not None and not fut.cancelled():
            timed(self._tally, sub, _clock() - started)  # type: ignore[arg-type]
        if not fut.cancelled() and fut.exception() is not None:
            logger.error(
                "delivery task of %s raised", sub.listener.qualname, exc_info=fut.exception()
            )
        if sub.listener.concurrency is not None:
            gate = self._gates.get(sub)
            if gate is not None:
                gate.running -= 1
                if gate.backlog:
                    self._pump_gate(gate)
        if self._queue:
            self._pump.activate()
        self._changed()

    def _changed(self) -> None:
        if self._room_waiters or self._idle_waiters:
            self._wake()

    def _wake(self) -> None:
        while self._room_waiters and len(self._queue) < self._pump.room:
            waiter = self._room_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
        if self._idle_waiters and self._idle():
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        self._pump.watched = bool(self._room_waiters or self._idle_waiters)

    def _idle(self) -> bool:
        return (
            not self._queue
            and not self._pump.busy()
            and not self._running
            and not self._retrying
            and not self._backlogged
        )

    async def drain(self) -> None:
        loop = self._loop
        if loop is None:
            return
        while not self._idle():
            waiter = loop.create_future()
            self._idle_waiters.append(waiter)
            self._pump.watched = True
            await waiter

    async def aclose(self, timeout_s: float | None) -> list[str]:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drain_due(timeout_s), timeout_s)
        # Nothing starts from now on, not even what a cancelled delivery makes room for;
        # and what waits for room is told it will never get any.
        self._stopped = True
        self._pump.stopped = True
        for waiter in self._room_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._room_waiters.clear()
        undelivered: list[str] = []
        for gate in self._gates.values():
            undelivered.extend(event.id for event, _subs, _ctx in gate.backlog)
            gate.backlog.clear()
        for handle, events in self._timers.items():
            handle.cancel()
            undelivered.extend(event.id for event in events)
        self._timers.clear()
        undelivered.extend(event.id for event in self._pump.suspended())
        for fut, (event, _sub) in list(self._running.items()):
            fut.cancel()
            undelivered.append(event.id)
        await self._pump.stop()
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        # Waiting, including what was queued while the running ones were cancelled.
        undelivered.extend(entry.envelope().id for entry in self._queue)
        self._queue.clear()
        self._backlogged = 0
        self._pump.room = self.max_pending
        self._retrying = 0
        return list(dict.fromkeys(undelivered))

    def _timers_waiting(self) -> Iterable[asyncio.TimerHandle]:
        return self._timers

    def stats(self) -> dict[str, Any]:
        return {
            "pending": self._pump.pending() + self._backlogged,
            "running": len(self._pump.suspended()) + len(self._running),
            "retrying": self._retrying,
            "scheduled": len(self._timers) - self._retrying,
            "dead": len(self._dead),
        }
