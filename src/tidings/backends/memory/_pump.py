"""The in-process fast path: the queued events, and the workers that start their
deliveries in order and drive them (the bus's flat ``emit`` queues them through
``MemoryBackend.put_named``).

Measured, because this module is the cost of every in-process delivery
(``bench/inproc.py``). Why it is shaped as it is:

- The queue holds one :class:`QueuedEvent` per event, not per delivery; when one of its
  deliveries suspends, the event is put back first in line with the subscriptions
  whose deliveries have not started. The envelope
  (:class:`~tidings.events.Event`) is only built when something reads it.
- A few long-lived worker tasks (at most ``concurrency``) start the deliveries. A worker
  runs a *pump*: a coroutine that takes the events in a row that share one emitter's
  context and awaits their async listeners one after the other, so a listener that
  finishes without suspending costs a plain ``await``: no task, no ``StopIteration``.
- The pump runs in a copy of the emitter's context, stepped with ``Context.run`` by the
  worker (:meth:`Pump._drive`), so the worker's own task context is never the listener's.
  A listener that sets a context variable ends the pump (the copy no longer equals its
  original), and the next pump gets a fresh copy: what one delivery sets is never seen
  by another.
- When a delivery suspends, its worker stays with it, and another worker (idle, or new
  while there are fewer than ``concurrency``) goes on with the queue where it is. A
  delivery that suspends therefore costs a step of a task that already exists, not a
  task of its own; its timeout is armed then (a timer that cancels the worker, as
  :func:`asyncio.timeout` would).
- With metrics (a :class:`~tidings.delivery.Tally`), a pump adds to a count by name as
  it takes an event, and a worker reads the clock when its pump starts and ends and
  when a delivery suspends and ends: a delivery that does not suspend costs nothing
  more. A run of them
  too long to know each short has the next ones timed one by one, for a while.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import operator
import time
import types
from collections import deque
from collections.abc import Callable, Coroutine, Generator, Iterator, Mapping
from contextvars import Context
from typing import TYPE_CHECKING, Any

from tidings._binding import keyword_caller
from tidings.delivery import cancelled_from_outside
from tidings.events import Event, QueuedEvent

if TYPE_CHECKING:
    from tidings._contexts import ContextCopies
    from tidings.delivery import Runner, Tally
    from tidings.listeners import Subscription

__all__ = ["Pump", "timed"]

logger = logging.getLogger("tidings.backends.memory")

# Deliveries a worker starts before it lets the loop's other callbacks run.
_BATCH = 8192

_clock = time.perf_counter
# What a pump counts into without a tally: never written to (every count is behind a
# check of the tally), shared so that a pump allocates nothing for it.
_NONE_COUNTED: dict[str, float] = {}
_NONE_EMITTED: dict[str, int] = {}
# How long deliveries are timed one by one once a run of them was too long to tell
# (many short ones, or a slow one), and once one of them was slow.
_RECHECK_S = 0.05
_TIMED_FOR_S = 10.0


def timed(tally: Tally, sub: Subscription, took_s: float) -> None:
    """Count a delivery timed on its own into ``tally``."""
    name = sub.listener.qualname
    if took_s < tally.exact_below_s:
        tally.seconds[name] = tally.seconds.get(name, 0.0) + took_s
    else:
        tally.slow(name, took_s)


def _binds_when_called(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` is a plain ``async def`` (or a method of one): calling it with
    keywords it does not take raises ``TypeError`` before any of its code runs, so a
    call can be tried first and planned only if it does not bind."""
    func = fn.__func__ if isinstance(fn, types.MethodType) else fn
    return (
        isinstance(func, types.FunctionType)
        and inspect.iscoroutinefunction(func)
        and not hasattr(func, "__wrapped__")
        and "__signature__" not in func.__dict__
    )


class _Worker:
    """One long-lived worker task and the delivery it is in."""

    __slots__ = (
        "entry",
        "expired",
        "mark",
        "rest",
        "sub",
        "suspended",
        "suspended_at",
        "task",
        "timer",
        "wake",
    )

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        #: The event whose delivery the worker runs: its last started one.
        self.entry: QueuedEvent | None = None
        #: The iterator over that event's subscriptions the worker's pump is in.
        self.rest: Iterator[Subscription] | None = None
        #: Whether that delivery has suspended (the worker then waits with it).
        self.suspended = False
        self.timer: asyncio.TimerHandle | None = None
        #: Set when the delivery's timeout cancelled the worker.
        self.expired = False
        #: What an idle worker waits for.
        self.wake: asyncio.Future[None] | None = None
        #: With a tally: the clock when the worker's current run of deliveries (or its
        #: delivery timed on its own) began, when its delivery suspended, and that
        #: delivery's subscription if the rest of its event was put back.
        self.mark = 0.0
        self.suspended_at = 0.0
        self.sub: Subscription | None = None


# How a listener is awaited in line: (function, keyword) to call ``fn(kwargs[keyword])``,
# (function, None) to call ``fn(kwargs)``, (None, None) to call it through its binding
# plan; ``None``: not in line (the runner starts it).
_Call = tuple[Callable[..., Any] | None, str | None] | None


class Pump:
    """The queue of waiting events and the workers that start their deliveries.

    Args:
        max_pending: events that may wait at once.
        concurrency: deliveries that may be suspended at once (with ``running``).
        running: the deliveries the runner started as tasks of their own (sync
            listeners, listeners with a concurrency limit, observed deliveries), owned
            by the backend; they count against ``concurrency`` too.
        start_other: starts a delivery through the runner: ``(event, sub, context)``.
        changed: called when room was made or work may have ended.
    """

    def __init__(
        self,
        *,
        max_pending: int,
        concurrency: int,
        running: Mapping[asyncio.Future[Any], Any],
        start_other: Callable[[Event, Subscription, Context], None],
        changed: Callable[[], None],
    ) -> None:
        self.queue: deque[QueuedEvent] = deque()
        #: Events the queue has room for: ``max_pending`` less the deliveries held back
        #: by listeners' concurrency limits.
        self.room = max_pending
        self.concurrency = concurrency
        #: Set when the backend closes: nothing starts any more.
        self.stopped = False
        #: Set while the backend waits for room or for the end of the work: ``changed``
        #: is called then.
        self.watched = False
        self._running = running
        self._start_other = start_other
        self._changed = changed
        self._workers: list[_Worker] = []
        self._idle: list[_Worker] = []
        self._active = 0  # workers not idle
        #: Active workers not waiting with a suspended delivery (while 0, a new event
        #: needs :meth:`activate`).
        self.pumping = 0
        self._calls: dict[Subscription, _Call] = {}
        self._timed = False  # whether a delivery awaited in line may have a timeout
        # Workers woken at once when a delivery suspends and events wait. As many as
        # wait, so that a burst of deliveries that suspend starts in one turn of the
        # loop (what batching forwarders count on); halved each time a worker woke to
        # find nothing left (the deliveries behind did not suspend, one worker ran them
        # all), doubled each time a delivery suspends while events wait.
        self._burst = concurrency
        self._runner: Runner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._contexts: ContextCopies | None = None
        # Workers and their timers run in an empty context of their own: a worker task
        # made while an emitter's context is current would keep it alive.
        self._quiet = Context()
        #: What metrics count (see :class:`tidings.delivery.Tally`), set before start.
        self.tally: Tally | None = None
        # Until when (``_clock()``) every delivery is timed one by one.
        self._timed_until = 0.0

    def start(self, runner: Runner) -> None:
        """Begin starting deliveries with ``runner`` (on its loop)."""
        self._runner = runner
        self._loop = runner.loop
        self._contexts = runner.contexts
        self._calls.clear()
        self._timed = runner.timeout is not None
        self._workers = []
        self._idle = []
        self._active = self.pumping = 0
        self._burst = self.concurrency
        self._timed_until = 0.0
        self.stopped = False
        # One worker from the start, so that listeners that never suspend cost no task.
        worker = self._new_worker()
        worker.wake = runner.loop.create_future()
        self._idle.append(worker)

    # -- queueing -------------------------------------------------------------------

    def put(self, entry: QueuedEvent) -> None:
        """Queue an event (room is the caller's to check)."""
        self.queue.append(entry)
        if not self.pumping:
            self.activate()

    def pending(self) -> int:
        """Deliveries waiting to start."""
        return sum(len(entry.subs) for entry in self.queue)

    def busy(self) -> bool:
        """Whether a worker is starting or running deliveries."""
        return self._active > 0

    def suspended(self) -> list[Event]:
        """The events of the deliveries suspended in workers now."""
        return [w.entry.envelope() for w in self._workers if w.suspended and w.entry is not None]

    async def stop(self) -> None:
        """Stop every worker: what they were running is cancelled."""
        self.stopped = True
        tasks = [w.task for w in self._workers if w.task is not None and not w.task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._workers = []
        self._idle = []
        self._active = self.pumping = 0

    # -- workers --------------------------------------------------------------------

    def activate(self) -> None:
        """Set workers to start what waits, unless one is at it already: as many as
        there are events waiting, within the places to run and ``_burst``."""
        if self.pumping or self.stopped:
            return
        free = self.concurrency - self._active - len(self._running)
        if free <= 0:
            return
        for _ in range(min(len(self.queue), free, self._burst)):
            self._active += 1
            self.pumping += 1
            if self._idle:
                wake = self._idle.pop().wake
                assert wake is not None
                wake.set_result(None)
            else:
                self._new_worker()

    def _new_worker(self) -> _Worker:
        worker = _Worker()
        worker.task = self._loop.create_task(  # type: ignore[union-attr]
            self._work(worker), name="tidings.memory.worker", context=self._quiet
        )
        self._workers.append(worker)
        return worker

    async def _work(self, worker: _Worker) -> None:
        loop = self._loop
        assert loop is not None
        queue = self.queue
        if worker.wake is not None:
            await worker.wake  # made idle: the bus's first worker
        woken = True
        while True:
            if queue and not self.stopped and self._active + len(self._running) <= self.concurrency:
                woken = False
                pristine = queue[0].context
                ctx = pristine.copy()
                if self.tally is not None:
                    worker.mark = _clock()
                try:
                    spent = await self._drive(worker, ctx, self._pump(worker, ctx, pristine))
                except Exception:
                    # A fault of this module, not of a listener: logged, and the worker
                    # goes on (a worker that ended would leave the queue unattended).
                    logger.exception("an in-process worker failed")
                    if worker.suspended:
                        worker.suspended = False
                        self.pumping += 1
                        if worker.timer is not None:
                            self._disarm(worker)
                    spent = False
                if self.tally is not None:
                    self._ran(worker, _clock())
                del pristine, ctx  # keep no emitter's context alive while idle
                if spent:
                    await asyncio.sleep(0)  # let the loop's other callbacks run
                continue
            self._active -= 1
            self.pumping -= 1
            if woken and self._burst > 1:
                self._burst >>= 1  # woken for nothing: wake fewer next time
            worker.entry = worker.rest = None
            if not queue and self._contexts is not None:
                # Keep no emitter's context (and its variables' objects) alive once its
                # events are under way: the next emit makes a new copy.
                self._contexts.release()
            if self.watched:
                self._changed()
            worker.wake = loop.create_future()
            self._idle.append(worker)
            await worker.wake
            woken = True

    @types.coroutine
    def _drive(
        self, worker: _Worker, ctx: Context, pump: Coroutine[Any, Any, bool]
    ) -> Generator[Any, None, bool]:
        """Run ``pump`` to its end inside ``ctx``, one step at a time (what a task does
        with its own context), from the worker's task."""
        send = pump.send
        queue = self.queue
        running = self._running
        tally = self.tally
        try:
            yielded = ctx.run(send, None)
        except StopIteration as stop:
            return bool(stop.value)
        while True:
            if not worker.suspended:
                # The worker's delivery suspended: the worker waits with it, another
                # goes on with the queue.
                worker.suspended = True
                self.pumping -= 1
                if tally is not None:
                    worker.suspended_at = _clock()
                if self._timed or operator.length_hint(worker.rest):
                    self._suspended(worker)
                if queue and not self.pumping and self._active + len(running) < self.concurrency:
                    if self._burst < self.concurrency:
                        self._burst <<= 1
                    self.activate()
                if self.watched:
                    self._changed()
            try:
                yield yielded
            except GeneratorExit:
                ctx.run(pump.close)
                raise
            except BaseException as exc:
                try:
                    yielded = ctx.run(pump.throw, exc)
                except StopIteration as stop:
                    return bool(stop.value)
            else:
                try:
                    yielded = ctx.run(send, None)
                except StopIteration as stop:
                    return bool(stop.value)

    def _ran(self, worker: _Worker, now: float) -> None:
        """A run of deliveries the worker started without timing each ended ``now``: if
        it was too long for them to be known short, the next ones are timed one by one."""
        if now - worker.mark >= self.tally.exact_below_s:  # type: ignore[union-attr]
            self._timed_until = max(self._timed_until, now + _RECHECK_S)

    def in_progress(self) -> list[Subscription]:
        """The subscriptions of the deliveries suspended in workers now (with a tally)."""
        out: list[Subscription] = []
        for worker in list(self._workers):
            entry = worker.entry
            if worker.suspended and entry is not None:
                # Unless the rest of its event was put back, the delivery is its last.
                out.append(worker.sub or entry.subs[-1])
        return out

    def _suspended(self, worker: _Worker) -> None:
        """Arm the timeout of the worker's delivery that suspended, and put the rest of
        its event's deliveries back first in line."""
        entry = worker.entry
        rest = worker.rest
        assert entry is not None
        assert rest is not None
        if self._timed or self.tally is not None:
            sub = entry.subs[len(entry.subs) - operator.length_hint(rest) - 1]
            worker.sub = sub
            timeout = sub.listener.timeout or self._runner.timeout  # type: ignore[union-attr]
            if timeout is not None:
                worker.timer = self._loop.call_later(  # type: ignore[union-attr]
                    timeout, self._expire, worker, context=self._quiet
                )
        self._put_back(entry, rest)

    def _disarm(self, worker: _Worker) -> None:
        # The worker's suspended delivery, which had a timeout, ended.
        worker.timer.cancel()  # type: ignore[union-attr]
        worker.timer = None
        if worker.expired:
            # The listener swallowed its timeout's cancellation (as asyncio.timeout).
            worker.expired = False
            worker.task.uncancel()  # type: ignore[union-attr]

    def _expire(self, worker: _Worker) -> None:
        worker.expired = True
        worker.task.cancel()  # type: ignore[union-attr]

    def _error_of(
        self, worker: _Worker, sub: Subscription, exc: BaseException
    ) -> BaseException | None:
        """What a delivery that raised ``exc`` records: its timeout if that ended it,
        else ``exc``; ``None`` when the worker itself is cancelled (re-raise)."""
        if worker.expired:
            worker.expired = False
            if worker.task.uncancel() == 0 and isinstance(exc, asyncio.CancelledError):  # type: ignore[union-attr]
                return self._runner.timed_out(sub, exc)  # type: ignore[union-attr]
        if (
            worker.suspended
            and isinstance(exc, asyncio.CancelledError)
            and cancelled_from_outside()
        ):
            return None
        return exc

    def _call_of(self, sub: Subscription) -> _Call:
        """How ``sub``'s listener is awaited in line (cached)."""
        calls = self._calls
        if len(calls) > 4096:
            calls.clear()  # subscriptions come and go: keep no dead ones for ever
        listener = sub.listener
        call: _Call = None
        runner = self._runner
        assert runner is not None
        if listener.is_async and listener.concurrency is None and not runner.observers:
            if listener.timeout is not None:
                self._timed = True
            plan = listener.plan
            fn = plan.fn
            names = plan.required_names
            if plan.simple_names is None or not _binds_when_called(fn):
                call = (None, None)
            elif names is not None and len(names) == 1:
                call = (fn, names[0])
            else:
                call = (keyword_caller(fn, names), None)
        calls[sub] = call
        return call

    async def _pump(self, worker: _Worker, ctx: Context, pristine: Context) -> bool:
        # Runs inside ``ctx`` (``pristine`` is the emitter's context it copies). Kept
        # flat: this loop is the cost of every in-process delivery. Returns whether it
        # stopped because it spent its batch.
        queue = self.queue
        calls = self._calls
        running = self._running
        runner = self._runner
        assert runner is not None
        on_success = runner.on_success
        tally = self.tally
        seconds = _NONE_COUNTED if tally is None else tally.seconds
        emitted = _NONE_EMITTED if tally is None else tally.emitted
        exact_below_s = 0.0 if tally is None else tally.exact_below_s
        # Whether each delivery is timed on its own (see tidings.delivery.Tally).
        timing = tally is not None and worker.mark < self._timed_until
        for _ in range(_BATCH):
            try:
                entry = queue.popleft()
            except IndexError:
                return False
            if entry.context is not pristine:
                queue.appendleft(entry)
                return False  # another emitter's context: another pump
            if tally is not None:
                # Counted as it is taken: an event put back is taken off again.
                try:
                    emitted[entry.name] += 1
                except KeyError:
                    tally.first_emit(entry.name)
            # The worker's iterator over the event's subscriptions: the rest of them
            # are taken from it (and put back in line) when a delivery suspends.
            rest = iter(entry.subs)
            worker.entry = entry
            worker.rest = rest
            for sub in rest:
                try:
                    call = calls[sub]
                except KeyError:
                    call = self._call_of(sub)
                if call is None:
                    self._start_other(entry.envelope(), sub, pristine)
                    if self._active + len(running) > self.concurrency:
                        # Every place to run is taken: this worker stops.
                        self._put_back(entry, rest)
                        return False
                    continue
                fn, key = call
                try:
                    if fn is None or entry.args:
                        await sub.listener.plan.call(entry.envelope())
                    else:
                        kwargs = entry.kwargs
                        try:
                            coro = fn(kwargs) if key is None else fn(kwargs[key])
                        except (KeyError, TypeError):
                            # Keywords that do not fit the listener's parameters as they
                            # are: bind through its plan from now on.
                            calls[sub] = (None, None)
                            coro = sub.listener.plan.call(entry.envelope())
                        await coro
                except (Exception, asyncio.CancelledError) as exc:
                    error = self._error_of(worker, sub, exc)
                    if error is None:
                        raise  # the worker is cancelled: the bus is closing
                    runner.failed(entry.envelope(), sub, pristine.copy(), error)
                else:
                    sub.delivered += 1
                    if on_success or sub.has_success_hooks:
                        runner.succeeded(entry.envelope(), sub, counted=True)
                if worker.suspended:
                    # The rest of the event's deliveries were put back when this one
                    # suspended (``rest`` is empty now): the worker goes on.
                    worker.suspended = False
                    self.pumping += 1
                    if worker.timer is not None:
                        self._disarm(worker)
                    if tally is not None:
                        # Timed from when it suspended (kept in line: this is the cost
                        # of every delivery that suspends).
                        now = _clock()
                        took_s = now - worker.suspended_at
                        if worker.suspended_at - worker.mark >= exact_below_s:
                            # Its own start (when each is timed), or the run before it.
                            if timing:
                                took_s = now - worker.mark
                            self._ran(worker, worker.suspended_at)
                        worker.mark = now
                        worker.sub = None
                        name = sub.listener.qualname
                        if took_s < exact_below_s:
                            try:
                                seconds[name] += took_s
                            except KeyError:
                                seconds[name] = took_s
                        else:
                            tally.slow(name, took_s)
                        timing = now < self._timed_until
                    if self.stopped:
                        return False
                elif timing:
                    now = _clock()
                    took_s = now - worker.mark
                    worker.mark = now
                    timed(tally, sub, took_s)  # type: ignore[arg-type]
                    if took_s >= exact_below_s:
                        # A listener that blocks the loop: keep timing each delivery.
                        self._timed_until = now + _TIMED_FOR_S
                    timing = now < self._timed_until
                if ctx != pristine:
                    # The listener set a context variable: a fresh copy for the rest.
                    self._put_back(entry, rest)
                    return False
        return True

    def _put_back(self, entry: QueuedEvent, rest: Iterator[Subscription]) -> None:
        """Put an event back first in line if ``rest`` (the iterator over its
        subscriptions a pump is in) holds some: they are taken from it."""
        if operator.length_hint(rest):
            entry.subs = tuple(rest)  # consumed: the pump's loop ends
            self.queue.appendleft(entry)
            if self.tally is not None:
                self.uncount(entry.name)

    def uncount(self, name: str) -> None:
        """Take an event called ``name`` off the tally's emits, before it is taken from
        the queue (again): it was put back, or it is a retry."""
        emitted = self.tally.emitted  # type: ignore[union-attr]
        emitted[name] = emitted.get(name, 0) - 1
