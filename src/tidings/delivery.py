"""Running one delivery (one event for one listener): the call, its timeout, its retry
policy, the hooks and the log lines.

An async listener's coroutine is started eagerly: most listeners finish without ever
suspending, and those cost no task. Only a coroutine that really waits is parked in a
task, which resumes it where it stopped. Sync listeners run in a thread pool unless
they are ``inline``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import sys
import time
import traceback
import types
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import Executor
from contextvars import Context
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol

from tidings._units import seconds
from tidings.errors import BindingError, ConfigurationError
from tidings.events import Event

if TYPE_CHECKING:
    from tidings._contexts import ContextCopies
    from tidings.backends.base import Backend
    from tidings.listeners import ErrorHook, Registry, Subscription, SuccessHook

__all__ = [
    "Abandoned",
    "DeadLetter",
    "Delivery",
    "DeliveryObserver",
    "Retry",
    "Runner",
    "Tally",
]

# Tasks that run their first step at once, in the caller's turn (Python 3.12+).
_EAGER_TASKS = sys.version_info >= (3, 12)

logger = logging.getLogger("tidings.delivery")


@dataclass(frozen=True, slots=True)
class Retry:
    """How often a failing delivery is tried, and how long to wait between tries.

    Args:
        attempts: tries in all, the first included (1 means never retry).
        backoff: seconds (or a ``timedelta``) before the second try; doubled by
            ``factor`` for each further one, capped at ``max_backoff`` (``math.inf``: no
            cap).
        jitter: a fraction of the wait added or taken at random (0.1 = +/-10%), never
            past ``max_backoff``.
        on: the exception types worth retrying; any other fails at once.
    """

    attempts: int = 3
    backoff: float | timedelta = 0.1
    factor: float = 2.0
    max_backoff: float | timedelta = 60.0
    jitter: float = 0.1
    on: tuple[type[BaseException], ...] = field(default=(Exception,))

    def __post_init__(self) -> None:
        attempts = self.attempts
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ConfigurationError(
                f"Retry(attempts=...) must be a whole number of at least 1, not {attempts!r}"
            )
        for name in ("factor", "jitter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigurationError(f"Retry({name}=...) must be a number, not {value!r}")
        on = (self.on,) if isinstance(self.on, type) else self.on
        if not (
            isinstance(on, tuple | list)
            and all(isinstance(t, type) and issubclass(t, BaseException) for t in on)
        ):
            raise ConfigurationError(
                f"Retry(on=...) must be an exception class or a tuple of them, not {self.on!r}"
            )
        object.__setattr__(self, "on", tuple(on))
        if not 0 <= self.jitter <= 1:
            raise ConfigurationError(f"Retry(jitter=...) must be within 0..1, not {self.jitter}")
        if seconds(self.backoff, "Retry(backoff=...)") < 0 or self._cap_s() < 0:
            raise ConfigurationError(
                f"Retry(backoff=..., max_backoff=...) must not be negative, not "
                f"{self.backoff!r} and {self.max_backoff!r}"
            )

    def _cap_s(self) -> float:
        if self.max_backoff == math.inf:
            return math.inf
        return seconds(self.max_backoff, "Retry(max_backoff=...)")

    def delay_for(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        base = seconds(self.backoff, "Retry(backoff=...)")
        if base:
            try:
                base *= self.factor ** (attempt - 1)
            except OverflowError:  # far past the cap
                base = math.inf
        cap = self._cap_s()
        base = min(base, cap)
        if self.jitter:
            # Jittered below the cap too (so waits that reached it still spread out),
            # never above it.
            base = min(base * (1 + random.uniform(-self.jitter, self.jitter)), cap)
        return max(base, 0.0)


NO_RETRY = Retry(attempts=1)


def retry_policy(value: Any, what: str) -> Retry | None:
    """``retry=`` as a policy: ``None`` (none set) and a :class:`Retry` as they are, a
    whole number of attempts as ``Retry(attempts=value)``.

    ``what`` names the value in the error's message (``"retry of listener f"``).

    Raises:
        ConfigurationError: anything else (``"3"``, ``1.5``, ``True``, 0).
    """
    if value is None or isinstance(value, Retry):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return Retry(attempts=value)
    raise ConfigurationError(
        f"{what} must be a Retry or a whole number of attempts of at least 1, not {value!r}"
    )


@dataclass(frozen=True, slots=True)
class Abandoned:
    """A delivery whose task was cancelled while its sync listener still ran in a
    thread (a thread cannot be stopped): its outcome is known once the thread returns.

    Attributes:
        event: the event of the delivery.
        context: the delivery's copy of the emitter's context.
        running: the thread's call.
        timed_out: the timeout that had ended the delivery before it was cancelled
            (then its outcome, whatever the thread does), or ``None``.
    """

    event: Event
    context: Context
    running: asyncio.Future[Any]
    timed_out: BaseException | None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A delivery that failed its last attempt."""

    event: Event
    listener: str
    error: str
    traceback: str
    attempts: int
    failed_at: float

    @classmethod
    def of(cls, event: Event, listener: str, exc: BaseException, failed_at: float) -> DeadLetter:
        """Record ``exc`` as the last error of ``event``'s delivery to ``listener``."""
        return cls(
            event=event,
            listener=listener,
            error=error_text(exc),
            traceback="".join(traceback.format_exception(exc)),
            attempts=event.attempt,
            failed_at=failed_at,
        )


def error_text(exc: BaseException) -> str:
    """``exc`` on one line, ``"Type: message"``, even when its ``str()`` raises (as
    :mod:`traceback` words it): a listener's error never breaks the recording of it."""
    try:
        message = str(exc)
    except Exception:
        message = "<exception str() failed>"
    return f"{type(exc).__qualname__}: {message}"


#: Told of each delivery as it starts (``observer(event, subscription, context)``, the
#: context being the delivery's own); returns the callback told of its end:
#: ``finish(outcome, error)``, outcome ``"success"``, ``"retry"``, ``"dead"`` or
#: ``"cancelled"``. Tracing is one.
DeliveryObserver = Callable[
    [Event, "Subscription", Context], Callable[[str, BaseException | None], None]
]


class Tally(Protocol):
    """What an in-process backend counts for metrics as it goes, in plain numbers, so
    that metrics cost no call per delivery (an observer would take each delivery off
    the backend's fast path).

    A delivery that finishes without suspending is not timed on its own: the backend
    times each run of such deliveries, and only when a run lasted ``exact_below_s`` or
    more does it time every delivery one by one (for a while). The others are known to
    have lasted less than that, and so are the timed ones it adds to ``seconds``
    without a call: the reader counts them all under ``exact_below_s`` (the bus's
    delivered and failed counts, less the deliveries reported to :meth:`slow`).
    """

    #: Events by name, counted as the backend takes them to deliver (retries are not).
    emitted: dict[str, int]
    #: The bound under which a delivery needs no more than a count.
    exact_below_s: float
    #: Seconds that deliveries timed one by one and shorter than ``exact_below_s``
    #: took, by listener (qualified name); the backend adds to it.
    seconds: dict[str, float]

    def first_emit(self, name: str) -> None:
        """An event called ``name``, not in ``emitted`` yet, was taken to deliver."""

    def slow(self, listener: str, seconds: float) -> None:
        """A delivery of ``listener`` (qualified name) took ``seconds``, at least
        ``exact_below_s``."""


@types.coroutine
def _set_if_pending(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def cancelled_from_outside() -> bool:
    """Whether the running task is being cancelled, rather than handed a
    ``CancelledError`` that a listener raised (awaiting a cancelled future, say)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


# A delivery's state: not started, started (running or ended), cancelled unstarted.
_NEW, _STARTED, _CANCELLED = 0, 1, 2


class Delivery:
    """One event for one listener, ready to run with the bus's policy (its timeout, its
    retries, its hooks and, after the last attempt, its dead letter).

    What a backend's :meth:`~tidings.backends.base.Backend.deliver` is handed: it runs
    it now (``delivery.start()``), later (``await delivery()``, from any task), or
    elsewhere. A retry comes back as a new delivery, through the backend again.

    Attributes:
        event: the event (``event.attempt`` is this attempt's number).
        subscription: the listener's subscription.
        context: the emitter's context; the listener runs in a copy of it.
    """

    __slots__ = ("_ended", "_future", "_runner", "_state", "context", "event", "subscription")

    def __init__(
        self,
        event: Event,
        subscription: Subscription,
        context: Context,
        runner: Runner,
        ended: Callable[[Delivery], None] | None = None,
    ) -> None:
        self.event = event
        self.subscription = subscription
        self.context = context
        self._runner = runner
        self._ended = ended
        self._future: asyncio.Future[Any] | None = None
        self._state = _NEW

    @property
    def started(self) -> bool:
        """Whether :meth:`start` has run (the delivery may have ended since)."""
        return self._state == _STARTED

    @property
    def cancelled(self) -> bool:
        """Whether it was cancelled before it started (closing the bus reported it as
        undelivered): it never runs."""
        return self._state == _CANCELLED

    @property
    def listener(self) -> str:
        """The listener's qualified name."""
        return self.subscription.listener.qualname

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The bus's event loop, which the delivery runs on."""
        return self._runner.loop

    def start(
        self,
        *,
        executor: Executor | None = None,
        work: Callable[[Event], Awaitable[Any]] | None = None,
    ) -> asyncio.Future[Any] | None:
        """Start the delivery on the bus's loop (call it on that loop's thread): ``None``
        if it finished at once, else the task that runs it. Its outcome (success, a
        retry, a dead letter) is handled by the bus; this never raises for it. A
        delivery runs once: starting it again returns the task already running it.

        Args:
            executor: where a sync listener is called (default: the bus's threads).
            work: what runs in place of the listener, with its policy (timeout,
                retries, hooks, dead letter): ``await work(event)`` (a backend that
                forwards the delivery elsewhere).
        """
        if self._state == _CANCELLED:
            # Reported undelivered when the bus closed: running it now would deliver
            # what the bus said it never would (a framework's background task run late).
            logger.warning("%r was cancelled (the bus closed before it ran); not run", self)
            return None
        if self._state == _STARTED:
            # A delivery runs once; its retry comes to deliver() as a delivery of its own.
            logger.warning("%r was started already; not run again", self)
            return self._future if self._future is not None and not self._future.done() else None
        self._state = _STARTED
        runner = self._runner
        event, sub, ctx = self.event, self.subscription, self.context
        fut: asyncio.Future[Any] | None
        if work is not None:
            fut = runner.run_work(work, event, sub, ctx)
        elif executor is not None:
            fut = runner.run_in(executor, event, sub, ctx)
        else:
            fut = runner.run(event, sub, ctx)
        self._future = fut
        if fut is None:
            self._end()
        else:
            fut.add_done_callback(self._end)
        return fut

    async def __call__(self) -> None:
        """Run the delivery to its end (its retry, if any, is the backend's to run):
        what a framework's background task or any coroutine awaits."""
        loop = self._runner.loop
        if asyncio.get_running_loop() is not loop:
            # Awaited on another loop (a test client's thread): run on the bus's.
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self(), loop))
            return
        fut = self.start()
        if fut is not None:
            await asyncio.wait([fut])

    def cancel(self) -> None:
        """Cancel the delivery if it runs; if it never started, it never will (a later
        :meth:`start` or ``await delivery()`` returns without running it)."""
        if self._future is not None:
            self._future.cancel()
        elif self._state == _NEW:
            self._state = _CANCELLED
            self._end()

    def _end(self, _fut: object = None) -> None:
        ended, self._ended = self._ended, None
        if ended is not None:
            ended(self)

    def __repr__(self) -> str:
        return f"<Delivery of {self.event.name} {self.event.id} to {self.listener}>"


class Runner:
    """Runs deliveries for a bus and reports each outcome to the backend.

    The bus owns this policy; the backend only holds deliveries and is told to retry
    one later, dead-letter it or forget it.
    """

    def __init__(
        self,
        *,
        loop: asyncio.AbstractEventLoop,
        backend: Backend,
        executor: Executor | None,
        retry: Retry | None,
        timeout: float | None,
        on_error: tuple[ErrorHook, ...],
        on_success: tuple[SuccessHook, ...],
        on_dead: tuple[ErrorHook, ...],
        registry: Registry | None = None,
        observers: Sequence[DeliveryObserver] = (),
        contexts: ContextCopies | None = None,
    ) -> None:
        self.loop = loop
        #: The bus's listeners (a durable backend consumes for them).
        self.registry = registry
        #: The copy of the emitter's context the bus's emits share (the in-process
        #: backend lets go of it once their events are under way).
        self.contexts = contexts
        self.backend = backend
        self.executor = executor
        self.retry = retry or NO_RETRY
        self.timeout = timeout
        self.on_error = on_error
        self.on_success = on_success
        self.on_dead = on_dead
        self._hook_tasks: set[asyncio.Task[Any]] = set()
        #: Deliveries the backend raised on when handed a retry or a dead letter, kept
        #: here as dead letters (oldest first) rather than lost.
        self.kept: list[DeadLetter] = []
        #: Deliveries ``(event id, subscription)`` whose task was cancelled while their
        #: sync listener's thread still ran: not to be handed to another worker yet. A
        #: backend takes out those it handles (see :meth:`settle_abandoned`).
        self.abandoned: dict[tuple[str, Subscription], Abandoned] = {}
        self.observers = tuple(observers)
        # Observed deliveries not finished yet: (id(event), sub) -> (event, finishers).
        self._observed: dict[tuple[int, Subscription], tuple[Event, list[Any]]] = {}

    def run(self, event: Event, sub: Subscription, ctx: Context) -> asyncio.Future[Any] | None:
        """Start one delivery in a copy of ``ctx`` (the delivery's own copy of the
        emitter's context: a retry starts from it again, not from what the attempt set).
        ``None`` if it already finished, else the task running it."""
        if self.observers:
            return self._run_observed(self._start, event, sub, ctx)
        return self._start(event, sub, ctx)

    def _start(self, event: Event, sub: Subscription, ctx: Context) -> asyncio.Future[Any] | None:
        listener = sub.listener
        if listener.is_async:
            kwargs = event.kwargs
            run_ctx = ctx.copy()
            plan = listener.plan
            try:
                # The common case, called without planning: the keywords it takes exactly.
                if kwargs.keys() == plan.simple_names and not event.args and event.obj is None:
                    coro = plan.fn(**kwargs)
                else:
                    coro = sub.listener.plan.call(event)
            except (Exception, asyncio.CancelledError) as exc:
                self.failed(event, sub, ctx, exc)
                return None
            # In a task from its first step: what a listener starts there (an
            # asyncio.timeout, an anyio scope, a library asking for the current task)
            # belongs to its own task, never to whichever task started it.
            run = self._run_async(coro, event, sub, ctx)
            if _EAGER_TASKS:
                task = asyncio.Task(run, loop=self.loop, context=run_ctx, eager_start=True)  # type: ignore[call-arg,unused-ignore]
                return None if task.done() else task
            return self.loop.create_task(run, context=run_ctx)
        if listener.inline:
            run_ctx = ctx.copy()
            try:
                result = run_ctx.run(listener.plan.call, event)
            except (Exception, asyncio.CancelledError) as exc:
                self.failed(event, sub, ctx, exc)
                return None
            if asyncio.iscoroutine(result):
                # A plain function that returns a coroutine (a sync wrapper of an async
                # function, say): its work is that coroutine.
                return self.loop.create_task(
                    self._run_sync(event, sub, ctx, result), context=run_ctx
                )
            self.succeeded(event, sub)
            return None
        # The thread runs in a copy of its own; the task awaiting it (and what the
        # listener may return) in another.
        return self.loop.create_task(self._run_sync(event, sub, ctx), context=ctx.copy())

    def run_work(
        self,
        work: Callable[[Event], Awaitable[Any]],
        event: Event,
        sub: Subscription,
        ctx: Context,
    ) -> asyncio.Future[Any]:
        """Like :meth:`run`, awaiting ``work(event)`` in place of the listener."""

        def start(event: Event, sub: Subscription, ctx: Context) -> asyncio.Future[Any]:
            async def call() -> Any:
                return await work(event)

            run = self._run_async(call(), event, sub, ctx)
            return self.loop.create_task(run, context=ctx.copy())

        if self.observers:
            return self._run_observed(start, event, sub, ctx)  # type: ignore[return-value]
        return start(event, sub, ctx)

    def run_in(
        self, executor: Executor, event: Event, sub: Subscription, ctx: Context
    ) -> asyncio.Future[Any] | None:
        """Like :meth:`run`, calling a sync listener (``inline`` or not) in ``executor``."""
        if sub.listener.is_async:
            return self.run(event, sub, ctx)

        def start(event: Event, sub: Subscription, ctx: Context) -> asyncio.Future[Any]:
            run = self._run_sync(event, sub, ctx, executor=executor)
            return self.loop.create_task(run, context=ctx.copy())

        return (
            self._run_observed(start, event, sub, ctx) if self.observers else start(event, sub, ctx)
        )

    def _run_observed(
        self,
        start: Callable[[Event, Subscription, Context], asyncio.Future[Any] | None],
        event: Event,
        sub: Subscription,
        ctx: Context,
    ) -> asyncio.Future[Any] | None:
        key = (id(event), sub)
        self._observed[key] = (event, [observe(event, sub, ctx) for observe in self.observers])
        fut = start(event, sub, ctx)
        # A failure was reported by failed(); what is still here succeeded (or was cancelled).
        if fut is None:
            self._finish(key, "success", None)
        else:
            fut.add_done_callback(
                lambda f: self._finish(key, "cancelled" if f.cancelled() else "success", None)
            )
        return fut

    def _finish(
        self, key: tuple[int, Subscription], outcome: str, exc: BaseException | None
    ) -> None:
        entry = self._observed.pop(key, None)
        if entry is not None:
            for finish in entry[1]:
                try:
                    finish(outcome, exc)
                except Exception:
                    logger.exception("delivery observer %r raised", finish)

    async def _run_async(
        self, coro: Coroutine[Any, Any, Any], event: Event, sub: Subscription, ctx: Context
    ) -> None:
        timeout = sub.listener.timeout or self.timeout
        deadline = None
        try:
            if timeout is None:
                await coro
            else:
                deadline = asyncio.timeout(timeout)
                async with deadline:
                    await coro
        except (Exception, asyncio.CancelledError) as exc:
            error = self._failure_of(sub, exc, deadline)
            if error is None:
                raise
            self.failed(event, sub, ctx, error)
        else:
            self.succeeded(event, sub)

    async def _run_sync(
        self,
        event: Event,
        sub: Subscription,
        ctx: Context,
        returned: Any = None,
        executor: Executor | None = None,
    ) -> None:
        """Run a sync listener in a thread and await what it returns if that is awaitable
        (a coroutine); or with ``returned``, only await that."""
        timeout = sub.listener.timeout or self.timeout
        loop = self.loop
        executor = executor or self.executor
        deadline = None
        run = ctx.copy().run
        # The thread's call, awaited through a shield: it cannot be stopped, so its end
        # is still known after a timeout or a cancellation.
        running: asyncio.Future[Any] | None = None
        try:
            if returned is not None:
                deadline = asyncio.timeout(timeout)
                async with deadline:
                    await returned
            elif timeout is None:
                running = loop.run_in_executor(executor, run, sub.listener.plan.call, event)
                result = await asyncio.shield(running)
                if asyncio.iscoroutine(result):
                    await result
            else:
                began = loop.create_future()

                def call() -> Any:
                    loop.call_soon_threadsafe(_set_if_pending, began)
                    return run(sub.listener.plan.call, event)

                running = loop.run_in_executor(executor, call)
                # The timeout counts from when a thread starts the call, not while the
                # call waits for a free thread.
                await asyncio.wait((began, running), return_when=asyncio.FIRST_COMPLETED)
                deadline = asyncio.timeout(timeout)
                async with deadline:
                    result = await asyncio.shield(running)
                    if asyncio.iscoroutine(result):
                        await result
        except (Exception, asyncio.CancelledError) as exc:
            error = self._failure_of(sub, exc, deadline)
            if running is not None and not running.done():
                await self._outlive(running, event, sub, ctx, error)
            if error is None:
                raise
            self.failed(event, sub, ctx, error)
        else:
            self.succeeded(event, sub)

    async def _outlive(
        self,
        running: asyncio.Future[Any],
        event: Event,
        sub: Subscription,
        ctx: Context,
        timed_out: BaseException | None,
    ) -> None:
        """A sync listener's thread outlives its delivery's task (a timeout, or the bus
        stopping). A timed-out delivery is retried (or buried) only once the thread has
        returned, so one delivery never runs twice at once; a stopping one is marked
        ``abandoned``, so a durable backend does not hand it to another worker while
        the thread still runs (it holds the delivery until the thread returns)."""
        key = (event.id, sub)
        if timed_out is not None:
            try:
                await asyncio.wait([running])
                return
            except asyncio.CancelledError:
                self.abandoned[key] = Abandoned(event, ctx, running, timed_out)
                raise
        self.abandoned[key] = Abandoned(event, ctx, running, None)

    def settle_abandoned(self, sub: Subscription, abandoned: Abandoned) -> bool | None:
        """Record the outcome of an abandoned delivery once its thread has returned, as
        its task would have: ``True`` if it succeeded; ``False`` if it failed (retried
        or made a dead letter through the backend, as any failure); ``None`` if it did
        not finish (its call returned a coroutine, which is closed unrun)."""
        event, ctx, running = abandoned.event, abandoned.context, abandoned.running
        if abandoned.timed_out is not None:
            self.failed(event, sub, ctx, abandoned.timed_out)
            return False
        if running.cancelled():
            return None
        exc = running.exception()
        if exc is not None:
            self.failed(event, sub, ctx, exc)
            return False
        result = running.result()
        if asyncio.iscoroutine(result):
            result.close()
            return None
        self.succeeded(event, sub)
        return True

    # -- outcomes -------------------------------------------------------------------

    def succeeded(self, event: Event, sub: Subscription, *, counted: bool = False) -> None:
        """Record a delivery that returned."""
        if not counted:
            sub.delivered += 1
        if self.on_success or sub.has_success_hooks:
            for hook in (*sub.hooks("on_success"), *self.on_success):
                self._call_hook(hook, event, sub.listener)

    def _failure_of(
        self, sub: Subscription, exc: BaseException, deadline: asyncio.Timeout | None
    ) -> BaseException | None:
        """What a delivery task that raised ``exc`` records: its timeout when ``deadline``
        ended it, else ``exc``; ``None`` when the task itself is cancelled (re-raise)."""
        if deadline is not None and deadline.expired():
            return self.timed_out(sub, exc)
        if isinstance(exc, asyncio.CancelledError) and cancelled_from_outside():
            return None
        return exc

    def timed_out(self, sub: Subscription, exc: BaseException) -> TimeoutError:
        """The error of a delivery its timeout ended (``exc``: what ended it)."""
        timeout = sub.listener.timeout or self.timeout
        # Names the delivery, not the listener: the work a backend ran in its place
        # (``start(work=...)``) may be what timed out.
        error = TimeoutError(f"delivery to {sub.listener.qualname} timed out after {timeout}s")
        error.__cause__ = exc
        return error

    def failed(self, event: Event, sub: Subscription, ctx: Context, exc: BaseException) -> None:
        """Retry a delivery that raised, or make it a dead letter after its last attempt."""
        listener = sub.listener
        sub.failed += 1
        retry = listener.retry or self.retry
        attempt = event.attempt
        retryable = not isinstance(exc, BindingError) and isinstance(exc, retry.on)
        error_hooks = (*sub.hooks("on_error"), *self.on_error)
        if retryable and attempt < retry.attempts:
            delay = retry.delay_for(attempt)
            # One line per attempt; the traceback once, at the dead letter (or with DEBUG).
            logger.warning(
                "delivery of event %s (%s) to %s failed on attempt %d/%d: %s: %s; "
                "retrying in %.3fs",
                event.id,
                event.name,
                listener.qualname,
                attempt,
                retry.attempts,
                type(exc).__qualname__,
                exc,
                delay,
                exc_info=exc if logger.isEnabledFor(logging.DEBUG) else None,
            )
            for hook in error_hooks:
                self._call_hook(hook, event, listener, exc)
            if self._observed:
                self._finish((id(event), sub), "retry", exc)
            try:
                self.backend.retry(event.for_attempt(attempt + 1), sub, ctx, delay)
            except Exception as error:
                self._backend_failed("retry", event, sub, exc, error)
            return
        logger.error(
            "delivery of event %s (%s) to %s failed on attempt %d/%d; dead letter",
            event.id,
            event.name,
            listener.qualname,
            attempt,
            retry.attempts,
            exc_info=exc,
        )
        for hook in error_hooks:
            self._call_hook(hook, event, listener, exc)
        for hook in (*sub.hooks("on_dead"), *self.on_dead):
            self._call_hook(hook, event, listener, exc)
        if self._observed:
            self._finish((id(event), sub), "dead", exc)
        try:
            self.backend.dead(event, sub, exc)
        except Exception as error:
            self._backend_failed("dead", event, sub, exc, error)

    def deliver_failed(self, event: Event, sub: Subscription, error: Exception) -> None:
        """Keep a delivery that the backend's ``deliver()`` raised on, where no caller
        could be told (a retry or a delayed event coming due): as a dead letter of this
        process (``Bus.dead_letters()``), so it is never lost without a word."""
        self._backend_failed("deliver", event, sub, error, error)

    def _backend_failed(
        self, method: str, event: Event, sub: Subscription, exc: BaseException, error: Exception
    ) -> None:
        """Keep a delivery the backend failed to take back after ``exc``: as a dead letter
        of this process (``Bus.dead_letters()``), so it is never lost without a word."""
        backend = type(self.backend).__qualname__
        logger.error(
            "%s.%s() raised for event %s (%s) to %s: %s: %s; the delivery is kept as a "
            "dead letter in this process",
            backend,
            method,
            event.id,
            event.name,
            sub.listener.qualname,
            type(error).__qualname__,
            error,
            exc_info=error,
        )
        letter = DeadLetter.of(event, sub.listener.qualname, exc, time.time())
        if exc is not error:
            letter = dataclasses.replace(
                letter,
                traceback=f"{letter.traceback}\nand then {backend}.{method}() raised:\n"
                + "".join(traceback.format_exception(error)),
            )
        self.kept.append(letter)

    def take_kept(self, ids: Sequence[str] | None, listener: str | None) -> list[DeadLetter]:
        """Remove and return the kept dead letters of these event ids and/or listener."""
        taken = [
            d
            for d in self.kept
            if (ids is None or d.event.id in ids) and (listener is None or d.listener == listener)
        ]
        self.kept = [d for d in self.kept if d not in taken]
        return taken

    def _call_hook(self, hook: Any, *args: Any) -> None:
        try:
            result = hook(*args)
            if asyncio.iscoroutine(result):
                task = self.loop.create_task(result)
                self._hook_tasks.add(task)
                task.add_done_callback(self._hook_done)
        except Exception:
            logger.exception("hook %r raised", hook)

    def _hook_done(self, task: asyncio.Task[Any]) -> None:
        self._hook_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("hook task raised", exc_info=task.exception())

    @property
    def hooks_running(self) -> bool:
        """Whether async hooks are still running."""
        return bool(self._hook_tasks)

    async def drain_hooks(self) -> None:
        """Wait for hooks that are still running."""
        while self._hook_tasks:
            await asyncio.gather(*self._hook_tasks, return_exceptions=True)
