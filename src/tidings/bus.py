"""The bus: what you emit on. It holds the listeners, one backend and the delivery
policy, starts and drains with ``async with``, and routes each event to the
subscriptions its name resolves to.

The rest of its methods it inherits from the modules whose job they front: what is
checked at emit (:mod:`tidings._routing`), cron schedules (:mod:`tidings.scheduling`),
``with bus:`` and sync waits (:mod:`tidings._sync`), inspecting and dead-letter admin
(:mod:`tidings._inspecting`)."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from enum import Enum
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from tidings import _debug
from tidings._contexts import ContextCopies
from tidings._hold import hold_named
from tidings._inbox import Inbox
from tidings._inspecting import Inspecting
from tidings._routing import Checks, Router
from tidings._running import Running
from tidings._sending import Sender
from tidings._switches import disabled
from tidings._sync import SyncFront
from tidings._units import count, positive_seconds_or_none, seconds
from tidings.backends._urls import backend_for
from tidings.backends.base import Backend
from tidings.delivery import DeliveryObserver, Retry, retry_policy
from tidings.errors import NotStartedError
from tidings.events import Event, QueuedEvent
from tidings.listeners import (
    ErrorHook,
    Listener,
    Registry,
    Subscription,
    SuccessHook,
    hooks_of,
)
from tidings.options import EmitOptions
from tidings.scheduling import Scheduler, Schedules

__all__ = ["Bus"]

P = ParamSpec("P")
R = TypeVar("R")

_copy_context = contextvars.copy_context
_time = time.time
_get_ident = threading.get_ident


class Bus(Checks, Schedules, SyncFront, Inspecting):
    """Emit events to listeners, in process or through a durable backend.

    Args:
        backend: ``None`` or ``"memory://"`` for the in-process backend, a URL, or a
            :class:`~tidings.backends.Backend`.
        listeners: listeners (made with ``@listener``) to subscribe.
        strict: raise ``NoListenersError`` for an event nobody listens to, and check at
            emit that every listener can be called with it.
        max_pending: in-process events that may wait to start (``emit`` raises
            ``QueueFull`` past it).
        concurrency: deliveries that may be suspended at once, all listeners together.
        retry: the default :class:`Retry` for listeners that set none (default: no retry).
        timeout: the default per-attempt timeout in seconds for listeners that set none
            (not for the call of an ``inline`` sync listener: nothing can interrupt it).
        on_error, on_success, on_dead: hooks called for every listener.
        check_serializable: reject at emit, with ``PayloadError``, a payload a durable
            backend could not store (always on for durable backends); in process, also
            reject, with ``BindingError``, a value that would not fit its listener's
            annotation once read back from a store (a durable worker's dead letter).
        shutdown_timeout: seconds ``aclose()`` drains before giving up.
        sync_workers: threads for sync listeners (default: the executor's default).
        consume: with a durable backend, also run the listeners in this process (the
            default); ``False`` makes a producer-only bus, and ``tidings worker`` runs
            them elsewhere.
        debug: log each emit, each delivery's start and end (with its duration) and
            each retry at DEBUG on ``tidings.debug`` (default: ``TIDINGS_DEBUG``, read
            here; off costs nothing).
    """

    def __init__(
        self,
        backend: Backend | str | None = None,
        *,
        listeners: Iterable[Listener[..., Any]] = (),
        strict: bool = False,
        max_pending: int = 100_000,
        concurrency: int = 1000,
        retry: Retry | int | None = None,
        timeout: float | timedelta | None = None,
        on_error: ErrorHook | Iterable[ErrorHook] | None = None,
        on_success: SuccessHook | Iterable[SuccessHook] | None = None,
        on_dead: ErrorHook | Iterable[ErrorHook] | None = None,
        check_serializable: bool = False,
        shutdown_timeout: float | timedelta = 30.0,
        sync_workers: int | None = None,
        consume: bool = True,
        debug: bool | None = None,
    ) -> None:
        backend, url, remake = backend_for(
            backend, max_pending=max_pending, concurrency=concurrency, consume=consume
        )
        #: Where deliveries wait, for messages (a URL's password is never shown).
        self.url = url
        self._remake = remake
        self.backend = backend
        self.registry = Registry(listeners)
        self.on_error: tuple[ErrorHook, ...] = hooks_of(on_error, "the bus's on_error")
        self.on_success: tuple[SuccessHook, ...] = hooks_of(on_success, "the bus's on_success")
        self.on_dead: tuple[ErrorHook, ...] = hooks_of(on_dead, "the bus's on_dead")
        self.retry = retry_policy(retry, "the bus's retry")
        self.timeout = positive_seconds_or_none(timeout, "the bus's timeout")
        #: Which subscriptions each event reaches, and what is checked on its way.
        self.router = Router(
            self.registry,
            strict=strict,
            check_serializable=check_serializable or backend.durable,
            changed=self._refresh_hot,
        )
        self.shutdown_timeout = seconds(shutdown_timeout, "the bus's shutdown_timeout")
        self.sync_workers = None if sync_workers is None else count(sync_workers, "sync_workers")
        #: Whether every emit is a logged no-op: ``TIDINGS_DISABLE``, read now and again
        #: each time the bus starts.
        self.disabled = disabled()
        # Set once started (and kept once closed, until the bus starts again).
        self._running: Running | None = None
        self._thread = 0  # the loop's, for emit's flat path
        self._closed = False
        #: Told of every delivery (tracing, metrics); the runner takes them when the bus
        #: starts.
        self.observers: list[DeliveryObserver] = []
        #: Middlewares holding this bus's events until a response is sent (tidings.asgi).
        self.holders = 0
        # Set while emit may take its flat path (see emit).
        self._hot = False
        self._routes = self.registry.routes
        self._put_named = backend.put_named
        self._inlet = backend.inlet
        #: What events emitted on the loop's thread share of the emitter's context (an
        #: in-process backend delivers in it; a durable one has no use for it).
        self.contexts = ContextCopies()
        #: Sends what the flat path of emit does not (see :mod:`tidings._sending`).
        self.sender = Sender(self)
        #: Hands events to the backend from any thread (see :mod:`tidings._inbox`).
        self.inbox = Inbox()
        #: Fires the cron schedules (see :meth:`schedule`).
        self.scheduler = Scheduler(self._fire)
        if _debug.enabled(debug):
            _debug.install(self)

    # -- listeners ------------------------------------------------------------------

    def listener(
        self, *names: str | Enum | type[Any], **options: Any
    ) -> Callable[[Callable[P, R]], Listener[P, R]]:
        """Like :func:`tidings.listener`, and subscribe the result on this bus."""
        return self.registry.listener(*names, **options)

    def subscribe(
        self, fn: Callable[..., Any], /, *names: str | Enum | type[Any], **options: Any
    ) -> Subscription:
        """Subscribe ``fn``, a listener (``subscribe(listener)``) or a function with its
        names and options (``subscribe(fn, "user.created", retry=3)``); the handle's
        ``.unsubscribe()`` undoes it. On a started durable bus, the listener joins the
        store before anything emitted next is stored (``ConfigurationError`` as for
        :meth:`Registry.subscribe`, and for ``once=True`` or another listener's name)."""
        return self.registry.subscribe(fn, *names, **options)

    def include(self, registry: Registry) -> None:
        """Add a registry's listeners (and later changes to it) to this bus."""
        self.registry.include(registry)

    # -- lifecycle ------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the bus runs on, once started (``None`` before)."""
        return None if self._running is None else self._running.loop

    @property
    def started(self) -> bool:
        """Whether the bus accepts events."""
        return self._running is not None and not self._closed

    async def start(self) -> None:
        """Start handing deliveries to listeners on the running event loop.

        A bus closed with :meth:`aclose` may start again (an app's lifespan that runs
        twice, as two test clients of one app do): what it delivered, its listeners and
        the in-process dead letters stay; a durable backend made from a URL is made anew.

        Raises:
            NotStartedError: closed, on a durable backend given as an object (it cannot
                start twice: give the bus its URL instead).
        """
        if self._closed:
            self._reopen()
        if self._running is not None:
            return
        self.disabled = disabled()
        running = await Running.start(self)
        self._running, self._thread = running, running.thread
        self._refresh_hot()
        self._start_scheduler()

    def _reopen(self) -> None:
        """Make a closed bus ready to start again."""
        backend = self.backend
        if backend.durable and self._running is not None:  # it ran: it cannot start again
            if self._remake is None:
                raise NotStartedError(
                    f"this bus is closed, and its backend ({self.url}) cannot start again: "
                    "create a new Bus, or give the bus a URL so it can make a new backend"
                )
            consume = backend.consume
            backend = self._remake()
            backend.consume = consume
            self.backend = backend
            self._put_named = backend.put_named
            self._inlet = backend.inlet
        self._closed = False
        self._running = None
        self._thread = 0
        self.scheduler.forget()

    async def drain(self) -> None:
        """Wait until every queued, running and retrying delivery has finished.

        May be awaited on another event loop than the bus's (a test client that runs
        the app in a thread of its own, say).
        """
        if self._running is not None:
            await self._running.drain(self)

    async def aclose(
        self, _app: object = None, /, *, timeout: float | timedelta | None = None
    ) -> None:
        """Drain (for at most ``timeout`` seconds, default ``shutdown_timeout``) and stop.

        What could not be delivered in time is cancelled and logged once, by event id.
        ``timeout`` is keyword-only, and a positional argument is ignored: frameworks
        pass their app to shutdown hooks (Litestar's ``on_shutdown=[bus.aclose]``). With
        Litestar, prefer :class:`~tidings.contrib.litestar.TidingsPlugin`, which also
        starts the bus.

        Raises:
            TypeError: a number given positionally (write ``aclose(timeout=5)``).
        """
        if isinstance(_app, int | float | timedelta):
            raise TypeError(f"aclose() takes its timeout by keyword: aclose(timeout={_app!r})")
        running = self._running
        if running is None or self._closed:
            self._closed = True
            return
        limit = self.shutdown_timeout if timeout is None else seconds(timeout, "aclose's timeout")
        undelivered = await running.stop(self, limit)
        self._closed = self.inbox.closed = True
        self._refresh_hot()
        await running.finish(self, limit, undelivered)

    async def __aenter__(self) -> Bus:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- emitting -------------------------------------------------------------------

    def emit(self, name_or_event: str | Any, /, *args: Any, **kwargs: Any) -> None:
        """Queue an event for its listeners and return at once; safe from any thread.

        ``name_or_event`` is an event name (payload: ``*args`` and ``**kwargs``, every
        keyword included) or a typed event object. Options (a delay, headers...) travel
        apart: ``bus.options(delay=60).emit(...)``.

        Raises:
            NotStartedError: the bus is not started, or closed.
            EmitError: the event name cannot be emitted (empty, a wildcard,
                whitespace or control characters, over 255 UTF-8 bytes).
            QueueFull: the in-process queue is full.
            NoListenersError: strict bus, and nothing listens to the name.
            BindingError: strict bus, and a listener cannot be called with the event.
            PayloadError: the payload cannot be serialized (durable backends, or
                ``check_serializable=True``).
        """
        if self._hot:
            # The common case, kept flat: a started plain bus. This is the cost of
            # every emit (bench/inproc.py).
            if _get_ident() == self._thread:
                try:
                    subs = self._routes.get(name_or_event)
                except TypeError:  # unhashable: a typed event, not a name
                    subs = None
                if subs:
                    # The emitter's context, shared with the events it emitted before
                    # (ContextCopies.copy, inlined).
                    ctx = self.contexts.shared
                    if ctx is None or _copy_context() != ctx:
                        ctx = self.contexts.renew()
                    if self.holders and hold_named(self, subs, ctx, name_or_event, args, kwargs):
                        return
                    inlet = self._inlet
                    if inlet is not None:
                        queue = inlet.queue
                        if len(queue) < inlet.room:
                            queue.append(
                                QueuedEvent(subs, ctx, name_or_event, args, kwargs, _time())
                            )
                            if not inlet.pumping:
                                inlet.activate()
                            return
                    self._put_named(subs, ctx, name_or_event, args, kwargs)
                    return
            elif not self.holders and type(name_or_event) is str:
                # Another thread, on a plain bus: nothing to check either.
                subs = self._routes.get(name_or_event)
                if subs:
                    event = Event(name_or_event, args, kwargs)
                    self.inbox.hand(event, subs, self.contexts.copy_elsewhere(), None)
                    return
        self.sender.emit(None, name_or_event, args, kwargs)

    async def publish(self, name_or_event: str | Any, /, *args: Any, **kwargs: Any) -> None:
        """Like :meth:`emit`, but wait until the backend has accepted the event.

        For the memory backend that means room in the queue; for a durable backend,
        stored. Raises what :meth:`emit` raises, except ``QueueFull``. Every keyword is
        payload; options travel apart: ``await bus.options(delay=60).publish(...)``.
        """
        await self.sender.publish(None, name_or_event, args, kwargs)

    def options(
        self,
        *,
        delay: float | timedelta | None = None,
        at: datetime | None = None,
        key: Any = None,
        headers: Mapping[str, str] | None = None,
        connection: Any = None,
        session: Any = None,
    ) -> EmitOptions:
        """Options for an emit, apart from its payload: ``bus.options(delay=60).emit(
        "report.due", key="r1")`` (there ``key="r1"`` is payload).

        Args:
            delay: seconds (or a ``timedelta``) before delivery; 0 or less means now.
            at: an aware ``datetime`` to deliver at (one that has passed means now).
            key: the ordering key (reserved for per-key ordering).
            headers: the event's headers, strings to strings.
            connection: an asyncpg connection: ``publish`` stores the event inside its
                transaction (PostgreSQL), so it exists only if the transaction commits.
            session: the same with a SQLAlchemy ``AsyncSession`` on asyncpg.

        Raises:
            EmitError: a delay that is not finite, a naive ``at=``, both of them, or
                headers that are not strings (or cannot be encoded).
            ConfigurationError: both ``connection=`` and ``session=``.
        """
        return EmitOptions(
            self,
            delay=delay,
            at=at,
            key=key,
            headers=headers,
            connection=connection,
            session=session,
        )

    def _refresh_hot(self) -> None:
        self._hot = (
            self._running is not None
            and not self._closed
            and not self.disabled
            and not self.router.sees_each_event
        )

    def hold_requests(self) -> None:
        """Hold this bus's events during each request until its response is sent: what
        :class:`~tidings.asgi.EventsMiddleware` calls once it wraps an app."""
        self.holders += 1
        self._refresh_hot()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "started" if self._running else "not started"
        return f"<Bus {type(self.backend).__name__} {state}, {len(self.registry)} listener(s)>"
