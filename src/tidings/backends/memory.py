"""The in-process backend: a bounded FIFO queue drained on the event loop.

At most once: what is queued is lost if the process dies, and drained on a graceful
stop. Deliveries run in queue order; a listener with ``concurrency=1`` sees its events
in emit order.

Why it is fast: the queue holds one entry per event (not per delivery), laid out flat
(a waiting event is no object of its own for the garbage collector to follow and
promote), and the envelope (:class:`~tidings.events.Event`) is only built when
something reads it. A loop callback drains the queue through a *pump*: one coroutine
that takes the waiting events at once and awaits the async
listeners one after the other, so a listener that finishes without suspending costs a
plain ``await``, with no task and no ``StopIteration``. When a listener really
suspends, the pump is handed, with that one delivery, to a task of its own, and a new
pump carries on with the rest, where it is (what a pump took and did not start stays
first in line, never copied back into the queue). A listener that suspended has its
next deliveries started one by one (a task each only if it suspends) until one of them
finishes without suspending: handing a pump over costs more than a task.

A pump runs in a copy of the emitter's context and only takes the events that share it
(events emitted in a row from one context share one copy, see :mod:`tidings._contexts`);
a listener that sets a context variable ends the pump, so what one delivery sets is
never seen by another. A listener is called with the payload's values taken by name
and passed by position (see :func:`tidings._binding.keyword_caller`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import operator
import threading
import time
import types
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from contextvars import Context
from typing import TYPE_CHECKING, Any, cast

from tidings._contexts import ContextCopies
from tidings.backends.base import Backend, DeadLetter
from tidings.delivery import _resume, cancelled_from_outside
from tidings.errors import NotStartedError, QueueFull
from tidings.events import Event

if TYPE_CHECKING:
    from tidings.delivery import Runner
    from tidings.listeners import Subscription

__all__ = ["MemoryBackend"]

logger = logging.getLogger("tidings.backends.memory")

# The queue holds each event as _SLOTS items in a row: subscriptions, the emitter's
# context (copy), name, args, kwargs, and the emit's timestamp (or the event, once built).
# Flat, so that a waiting event adds no object the garbage collector has to follow.
_SLOTS = 6
_Entry = tuple[Any, Any, Any, Any, Any, Any]
_GateEntry = tuple[Event, "tuple[Subscription, ...]", Context]

# Deliveries started per loop callback, so a burst never starves other callbacks.
_BATCH = 8192

# The positional arguments of a typed event's entry: never called with directly.
_TYPED = (None,)

_copy_context = contextvars.copy_context
_DETACHED: contextvars.ContextVar[object] = contextvars.ContextVar("tidings.pump_detached")
_time = time.time
_get_ident = threading.get_ident


def _envelope(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], stamp: Any) -> Event:
    """The event of a queued entry: ``stamp`` itself once built, else built now. (The
    fast emit queues a ``str`` subclass, a ``StrEnum`` member, as it is: its event is
    named with the plain value.)"""
    if type(stamp) is Event:
        return stamp
    return Event(name if type(name) is str else str.__str__(name), args, kwargs, stamp)


def _entries(items: Iterable[Any]) -> Iterator[_Entry]:
    """The queued events of flat queue items, each as a tuple (``items`` may be an
    iterator: what is left of it after any event is the items that follow)."""
    it = iter(items)
    return zip(it, it, it, it, it, it, strict=False)


class _Gate:
    """Per-listener concurrency: how many of its deliveries run, and who waits."""

    __slots__ = ("backlog", "limit", "running")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0
        self.backlog: deque[_GateEntry] = deque()


class _PumpState:
    """Set by the flush when the pump's delivery suspended: the pump then stops, and
    records that delivery's outcome with the event the flush built for it."""

    __slots__ = ("detached", "event")

    def __init__(self) -> None:
        self.detached = False
        self.event: Event | None = None


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
        self.max_pending = max_pending
        self.concurrency = concurrency
        self._queue: deque[Any] = deque()
        # Work taken from the queue and not yet started, first in line: events (and the
        # rest of events' deliveries) put back by a pump that stopped early, then what
        # is left of the last batch taken (flat items; the list, and an iterator on it).
        self._front: deque[_Entry] = deque()
        self._head: Iterator[Any] | None = None
        self._head_batch: list[Any] = []
        self._backlogged = 0  # deliveries waiting behind a listener's concurrency gate
        self._held = 0  # queue items' worth of work taken and not started (see _hold_room)
        # Queue items (_SLOTS an event) there is room for: max_pending less the backlogs
        # and what pumps took and did not start.
        self._room = max_pending * _SLOTS
        self._running: dict[asyncio.Future[Any], tuple[Event, Subscription]] = {}
        self._gates: dict[Subscription, _Gate] = {}
        self._timers: dict[asyncio.TimerHandle, list[Event]] = {}
        self._retrying = 0
        self._dead: deque[DeadLetter] = deque(maxlen=max_dead_letters)
        self._scheduled = False
        self._stopped = False  # closed: no delivery starts any more
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._room_waiters: deque[asyncio.Future[None]] = deque()
        self._runner: Runner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._contexts: ContextCopies | None = None

    async def start(self, runner: Runner) -> None:
        self._runner = runner
        self._loop = runner.loop
        self._contexts = runner.contexts
        self._stopped = False
        self._scheduled = False  # a flush scheduled on a loop that has since closed

    # -- queueing -------------------------------------------------------------------

    def has_room(self, count: int) -> bool:
        return len(self._queue) + (count - 1) * _SLOTS < self._room

    def _full(self, name: str) -> QueueFull:
        return QueueFull(
            f"the in-process queue holds "
            f"{(len(self._queue) + self._held) // _SLOTS + self._backlogged} events "
            f"(max_pending={self.max_pending}); cannot queue event {name!r}: await "
            "bus.publish(...) to wait for room, or raise max_pending"
        )

    def put_held(self, entries: list[list[Any]]) -> None:
        # Held entries are already what the queue holds: in they go, all at once.
        queue = self._queue
        fits = max((self._room - len(queue)) // _SLOTS, 0)
        for entry in entries[:fits]:
            queue.extend(entry)
        if fits < len(entries):
            self._schedule()
            raise self._full(entries[fits][2])
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)  # type: ignore[union-attr]

    def put_named(
        self,
        subs: tuple[Subscription, ...],
        ctx: Context,
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        queue = self._queue
        if len(queue) >= self._room:
            raise self._full(name)
        queue.extend((subs, ctx, name, args, kwargs, _time()))
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)  # type: ignore[union-attr]

    def fast_emit(
        self,
        routes: Mapping[str, tuple[Subscription, ...]],
        thread: int,
        fallback: Callable[..., None],
        contexts: ContextCopies,
    ) -> Callable[..., None]:
        queue = self._queue
        extend = queue.extend
        renew = contexts.renew

        # What put_named does, without a method call or an attribute read more than
        # needed: this function is the whole cost of an emit. A name that is no key of
        # the routes (a typed event, unhashable or not) is the method's to handle.
        def emit(name_or_event: Any, /, *args: Any, **kwargs: Any) -> None:
            if _get_ident() == thread and len(queue) < self._room:
                try:
                    subs = routes.get(name_or_event)
                except TypeError:
                    subs = None
                if subs:
                    ctx = contexts.shared
                    if _copy_context() != ctx:
                        ctx = renew()
                    extend((subs, ctx, name_or_event, args, kwargs, _time()))
                    if not self._scheduled:
                        self._scheduled = True
                        self._loop.call_soon(self._flush)  # type: ignore[union-attr]
                    return
            fallback(name_or_event, *args, **kwargs)

        return emit

    def put(self, event: Event, subs: tuple[Subscription, ...], ctx: Context) -> None:
        if len(self._queue) >= self._room:
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
            and len(self._queue) >= self._room
            and (self._queue or self._backlogged)
        ):
            waiter = self._loop.create_future()  # type: ignore[union-attr]
            self._room_waiters.append(waiter)
            await waiter
        if self._stopped:
            raise NotStartedError(
                f"cannot queue event {event.name!r}: the bus closed while it waited for room"
            )
        self._force(event, subs, ctx)

    def _force(self, event: Event, subs: tuple[Subscription, ...], ctx: Context) -> None:
        # A typed event's listeners bind through their plans: non-empty "args" say so.
        args = event.args if event.obj is None else _TYPED
        self._queue.extend((subs, ctx, event.name, args, event.kwargs, event))
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
        try:
            self._flush_now()
        except BaseException:
            # Whatever went wrong (it is logged by the loop), the rest still runs.
            if self._has_work():
                self._schedule()
            raise

    def _flush_now(self) -> None:
        self._scheduled = False
        if self._stopped:
            return
        queue = self._queue
        front = self._front
        running = self._running
        limit = self.concurrency
        loop = self._loop
        assert loop is not None
        spent = 0
        if self._runner.observers:  # type: ignore[union-attr]
            # Each delivery is observed (traced) as the runner starts it: no pump.
            while len(running) < limit and spent < _BATCH:
                entry = self._next_entry()
                if entry is None:
                    break
                subs, emitted, name, args, kwargs, stamp = entry
                event = _envelope(name, args, kwargs, stamp)
                for sub in subs:
                    self._start_other(event, sub, emitted)
                    if len(running) >= limit:
                        # The rest of this event's deliveries wait for room, first in line.
                        self._requeue_after((subs, emitted, name, args, kwargs, event), sub)
                        break
                spent += 1
        while len(running) < limit:
            # The next pump runs in a copy of the first waiting event's context, and
            # goes on with the events that share it. Entries' contexts are only ever
            # copied, never entered.
            if not front:
                entry = self._next_entry(queue_too=spent < _BATCH)
                if entry is None:
                    break
                front.append(entry)
            pristine: Context = front[0][1]
            ctx = pristine.copy()
            state = _PumpState()
            pump = self._pump(ctx, pristine, state, _BATCH - spent)
            try:
                yielded = ctx.run(pump.send, None)
            except StopIteration as stop:
                spent += stop.value
                continue
            spent += 1
            # The delivery the pump was running suspended: it keeps the pump, in a task.
            state.detached = True
            # And its context no longer equals its pristine copy, which the pump checks
            # after every delivery anyway: so it sees this without a check of its own.
            # (A value of this pump's own: the context may hold another pump's already.)
            ctx.run(_DETACHED.set, state)
            # Where the pump stopped is in its frame: reading it here, on this rare
            # path, spares every delivery two stores.
            frame = cast("types.CoroutineType[Any, Any, int]", pump).cr_frame
            assert frame is not None
            where = frame.f_locals
            sub = where["sub"]
            event = state.event = _envelope(
                where["name"], where["args"], where["kwargs"], where["stamp"]
            )
            # A listener that suspends is likely to again: until one of its deliveries
            # finishes without suspending, each is started on its own (a task if it
            # suspends), not awaited in line, which would hand a pump to a task each time.
            if sub.pumped:
                sub.parked = (sub.pump_fn,)
                sub.pumped = False
                sub.pump_fn = None
            # The events after it stay where they are, for the next pump.
            self._requeue_after(
                (where["subs"], pristine, event.name, where["args"], where["kwargs"], event), sub
            )
            task = loop.create_task(
                self._resume_pump(pump, yielded, event, sub, pristine), context=ctx
            )
            running[task] = (event, sub)
            task.add_done_callback(self._done)
        self._hold_room()
        if self._has_work() and len(running) < limit:
            self._schedule()
        elif not queue and self._contexts is not None:
            # Keep no emitter's context (and its variables' objects) alive once its
            # events are under way: the next emit makes a new copy.
            self._contexts.release()
        if self._room_waiters or self._idle_waiters:
            self._wake()

    def _next_entry(self, *, queue_too: bool = True) -> _Entry | None:
        """Take the first waiting event: put back, left of the last batch, or (when
        ``queue_too``) queued."""
        if self._front:
            return self._front.popleft()
        head = self._head
        if head is not None:
            for entry in _entries(head):
                return entry
            self._drop_head()
        queue = self._queue
        if queue and queue_too:
            return cast(_Entry, tuple(queue.popleft() for _ in range(_SLOTS)))
        return None

    def _waiting(self) -> list[_Entry]:
        """The events waiting to start, in order (without taking them)."""
        waiting = list(self._front)
        if self._head is not None:
            batch = self._head_batch
            waiting.extend(_entries(batch[len(batch) - operator.length_hint(self._head) :]))
        waiting.extend(_entries(list(self._queue)))
        return waiting

    def _drop_head(self) -> None:
        self._head = None
        self._head_batch = []

    def _hold_room(self) -> None:
        """Count what pumps took and did not start (put back, or left of the last batch
        taken) against ``max_pending``, as of the end of a flush: it waits as much as
        what is still in the queue."""
        head = self._head
        held = len(self._front) * _SLOTS + (operator.length_hint(head) if head is not None else 0)
        self._room += self._held - held
        self._held = held

    def _has_work(self) -> bool:
        return bool(self._front or self._head is not None or self._queue)

    async def _pump(self, ctx: Context, pristine: Context, state: _PumpState, budget: int) -> int:
        # Runs inside ``ctx`` (``pristine`` is an untouched copy of it). Kept flat: this
        # loop is the cost of every in-process delivery. Returns the events it took
        # from the queue.
        queue = self._queue
        front = self._front
        runner = self._runner
        assert runner is not None
        running = self._running
        limit = self.concurrency
        on_success = runner.on_success
        taken = 0
        while True:
            entries: Iterable[_Entry]
            items: Iterator[Any] | None = None
            if front:
                # Put back first in line: one at a time, while they share the context.
                if front[0][1] is not pristine:
                    return taken
                entries = (front.popleft(),)
            else:
                # What is left of the last batch taken, else the events waiting now,
                # taken at once (those emitted meanwhile wait for the next round). While
                # taken they count as started, not pending; a pump that stops early
                # leaves the rest for the next one, where it is.
                items = self._head
                if items is None:
                    if not queue or taken >= budget:
                        return taken
                    take = (budget - taken) * _SLOTS
                    if len(queue) <= take:
                        batch = list(queue)
                        queue.clear()
                    else:
                        batch = [queue.popleft() for _ in range(take)]
                    taken += len(batch) // _SLOTS
                    self._head_batch = batch
                    items = self._head = iter(batch)
                entries = _entries(items)
            for subs, emitted, name, args, kwargs, stamp in entries:
                if emitted is not pristine:
                    # Another emitter context: another pump.
                    front.appendleft((subs, emitted, name, args, kwargs, stamp))
                    return taken
                for sub in subs:
                    fn = sub.pump_fn
                    if fn is None and not sub.pumped:
                        stamp = _envelope(name, args, kwargs, stamp)
                        self._start_other(stamp, sub, pristine)
                        if len(running) >= limit:
                            self._requeue_after((subs, pristine, name, args, kwargs, stamp), sub)
                            return taken
                        continue
                    try:
                        if fn is None or args:
                            stamp = _envelope(name, args, kwargs, stamp)
                            await sub.listener.plan.call(stamp)
                        else:
                            key = sub.pump_key
                            try:
                                coro = fn(kwargs) if key is None else fn(kwargs[key])
                            except (KeyError, TypeError):
                                # Keywords that do not fit the listener's parameters as
                                # they are: bind through its plan from now on.
                                sub.pump_fn = None
                                stamp = _envelope(name, args, kwargs, stamp)
                                coro = sub.listener.plan.call(stamp)
                            await coro
                    except (Exception, asyncio.CancelledError) as exc:
                        if state.detached and cancelled_from_outside():
                            raise  # the task this pump was handed to is cancelled
                        stamp = state.event or _envelope(name, args, kwargs, stamp)
                        runner.failed(stamp, sub, pristine.copy(), exc)
                    else:
                        sub.delivered += 1
                        if on_success or sub.has_success_hooks:
                            stamp = state.event or _envelope(name, args, kwargs, stamp)
                            runner.succeeded(stamp, sub, counted=True)
                    if ctx != pristine:
                        if state.detached:
                            # Resumed in a task of its own (the flush marked ``ctx``):
                            # the rest was left for the next pump when it was detached.
                            return taken
                        # This listener set a context variable: the next ones must not
                        # see it.
                        self._requeue_after((subs, pristine, name, args, kwargs, stamp), sub)
                        return taken
            if items is not None:
                self._drop_head()  # the batch is done

    def _requeue_after(self, entry: _Entry, sub: Subscription) -> None:
        """Put back, first in line, the deliveries of ``entry`` after ``sub``'s (in a
        copy of the entry's context: another pump's)."""
        subs, pristine, name, args, kwargs, stamp = entry
        rest = subs[subs.index(sub) + 1 :]
        if rest:
            self._front.appendleft((rest, pristine.copy(), name, args, kwargs, stamp))

    async def _resume_pump(
        self,
        pump: Coroutine[Any, Any, int],
        yielded: Any,
        event: Event,
        sub: Subscription,
        pristine: Context,
    ) -> None:
        # The pump itself records the delivery's outcome when it returns or raises;
        # only a timeout (a cancellation that leaves the pump) is recorded here.
        runner = self._runner
        assert runner is not None
        timeout = sub.listener.timeout or runner.timeout
        if timeout is None:
            await _resume(pump, yielded)
            return
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                await _resume(pump, yielded)
        except TimeoutError as exc:
            if not deadline.expired():
                raise
            runner.failed(event, sub, pristine.copy(), runner.timed_out(sub, exc))

    def _start_other(self, event: Event, sub: Subscription, pristine: Context) -> None:
        """A delivery the runner starts: a sync listener, one whose deliveries pass its
        concurrency gate, or any when deliveries are observed."""
        ctx = pristine.copy()
        if sub.listener.concurrency is not None:
            self._gated(event, sub, ctx)
            return
        fut = self._runner.run(event, sub, ctx)  # type: ignore[union-attr]
        if fut is not None:
            self._running[fut] = (event, sub)
            fut.add_done_callback(self._done)
        elif sub.parked is not None:
            # It finished without suspending: awaited in line again from now on.
            (sub.pump_fn,) = sub.parked
            sub.pumped = True
            sub.parked = None

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
            self._room -= _SLOTS

    def _start_gated(self, gate: _Gate, event: Event, sub: Subscription, ctx: Context) -> None:
        fut = self._runner.run(event, sub, ctx)  # type: ignore[union-attr]
        if fut is not None:
            gate.running += 1
            self._running[fut] = (event, sub)
            fut.add_done_callback(self._done)

    def _pump_gate(self, gate: _Gate) -> None:
        """Start a gate's backlogged deliveries while it has room (bounded per call)."""
        budget = _BATCH
        while gate.backlog and gate.running < gate.limit and budget:
            budget -= 1
            event, subs, ctx = gate.backlog.popleft()
            self._backlogged -= 1
            self._room += _SLOTS
            self._start_gated(gate, event, subs[0], ctx)
        if gate.backlog and gate.running < gate.limit:
            self._loop.call_soon(self._pump_gate, gate)  # type: ignore[union-attr]
        elif not gate.backlog:
            self._wake()

    def _done(self, fut: asyncio.Future[Any]) -> None:
        _, sub = self._running.pop(fut)
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
        if not self._scheduled and self._has_work():
            self._schedule()
        if self._room_waiters or self._idle_waiters:
            self._wake()

    def _wake(self) -> None:
        while self._room_waiters and len(self._queue) < self._room:
            waiter = self._room_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
        if self._idle_waiters and self._idle():
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _idle(self) -> bool:
        return (
            not self._has_work()
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
            await waiter

    async def aclose(self, timeout_s: float | None) -> list[str]:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.drain(), timeout_s)
        # Nothing starts from now on, not even what a cancelled delivery makes room for;
        # and what waits for room is told it will never get any.
        self._stopped = True
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
        for fut, (event, _sub) in list(self._running.items()):
            fut.cancel()
            undelivered.append(event.id)
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        # Waiting, including what was queued while the running ones were cancelled.
        undelivered.extend(
            _envelope(name, args, kwargs, stamp).id
            for _subs, _ctx, name, args, kwargs, stamp in self._waiting()
        )
        self._queue.clear()
        self._front.clear()
        self._drop_head()
        self._backlogged = 0
        self._held = 0
        self._room = self.max_pending * _SLOTS
        self._retrying = 0
        return list(dict.fromkeys(undelivered))

    def stats(self) -> dict[str, Any]:
        return {
            "pending": sum(len(entry[0]) for entry in self._waiting()) + self._backlogged,
            "running": len(self._running),
            "retrying": self._retrying,
            "scheduled": len(self._timers) - self._retrying,
            "dead": len(self._dead),
        }
