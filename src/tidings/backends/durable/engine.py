"""The engine every durable backend shares: buffered publishing, one consumer per
listener, leases, batched acks, graceful stop.

A broker only implements the storage methods (:class:`~tidings.backends.durable.store.Store`,
declared abstract on :class:`DurableBackend`); it never sees a listener, a retry policy
or a hook. The bus's runner decides what a failure means, and the engine writes the
outcome back (ack, retry later, dead letter) in batches.

Fan-out: each listener has its own delivery of every event whose name it subscribes to,
from the moment its listener was first started on the store (by any bus, producing or
consuming): a listener added later receives new events only.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import os
import socket
import time
import traceback
import types
import uuid
from abc import abstractmethod
from collections import deque
from collections.abc import Callable, Coroutine, Generator, Sequence
from contextvars import Context
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar

from tidings._patterns import matches
from tidings._units import positive_seconds
from tidings.backends.base import Backend, DeadLetter
from tidings.backends.durable.store import (
    STORED_VERSION,
    Claimed,
    ListenerStats,
    Outcomes,
    Stored,
    event_of,
)
from tidings.codec import CODECS, decode_payload, encode_payload, revive_object
from tidings.delivery import error_text
from tidings.errors import (
    BackendError,
    BindingError,
    ConfigurationError,
    ConnectionLost,
    DeliveryLost,
    PayloadError,
    PublishFailed,
    QueueFull,
)
from tidings.events import Event

if TYPE_CHECKING:
    from tidings.delivery import Abandoned, Delivery, Runner
    from tidings.listeners import Listener, Subscription

__all__ = ["DurableBackend"]

logger = logging.getLogger("tidings.backends.durable")

# Decoded payloads kept for the other listeners of an event, at most.
_DECODED = 4096
# Deliveries a worker runs before it lets the loop's other callbacks run.
_WORKER_BATCH = 500


class _Consumer:
    __slots__ = (
        "before",
        "claiming",
        "idle_gen",
        "listener_id",
        "names",
        "running",
        "stopped",
        "sub",
        "task",
        "wake",
    )

    def __init__(self, sub: Subscription) -> None:
        self.sub = sub
        self.listener_id = sub.listener.qualname
        self.names = sub.listener.names
        self.running = 0
        self.claiming = False  # a claim is under way: what it leases counts attempts
        self.wake = asyncio.Event()
        self.idle_gen = -1  # the drain generation at which a claim last came back empty
        self.task: asyncio.Task[None] | None = None
        self.stopped = False  # its listener was unsubscribed: it claims no more
        # The stopped consumer of the same listener (unsubscribed, then subscribed
        # again) whose deliveries may still run: they count against its concurrency.
        self.before: _Consumer | None = None


def _storable(listeners: Sequence[Listener[..., Any]]) -> None:
    """Refuse what a store cannot keep: a ``once`` listener (the store keeps every event
    stored after it joined), and two subscriptions it would take for one listener (it
    tells them apart by name, so only one of them would run)."""
    seen: dict[str, int] = {}
    for index, item in enumerate(listeners):
        name = item.qualname
        if item.once:
            raise ConfigurationError(
                f"listener {name} has once=True, which a durable store cannot keep: it "
                "stores every event that comes after a listener joined, for as long as "
                "it stays joined; run a once listener on an in-process bus"
            )
        other = seen.setdefault(name, index)
        if other == index:
            continue
        if listeners[other] is item:
            raise ConfigurationError(
                f"listener {name} is subscribed twice: a durable store keeps one delivery "
                "of an event per listener name, so it would run once; subscribe it once"
            )
        raise ConfigurationError(
            f"two listeners are named {name}: a durable store tells listeners apart by "
            "name, so only one of them would run; give one of them a name of its own "
            "with @listener(..., name='...') (functions a factory makes share a name)"
        )


@types.coroutine
def _resumed(run: Coroutine[Any, Any, None], yielded: Any) -> Generator[Any, None, None]:
    """Await the rest of ``run``, which suspended on ``yielded`` (its first step was
    taken by hand)."""
    while True:
        try:
            yield yielded
        except GeneratorExit:
            run.close()
            raise
        except BaseException as exc:
            try:
                yielded = run.throw(exc)
            except StopIteration:
                return
        else:
            break
    yield from run


def _lost(event: Event, sub: Subscription, attempt: int) -> DeliveryLost:
    return DeliveryLost(
        f"event {event.id} ({event.name}) was started {attempt - 1} times for "
        f"{sub.listener.qualname} and never came to an end: its worker stopped, or lost "
        "the lease, while running it (does the listener crash or hang its process?)"
    )


# A buffered event: its record, the waiter of the publisher (None: emitted) and its
# number among everything put (what a settled outcome waits to see stored).
_Entry = tuple[Stored, "asyncio.Future[None] | None", int]

# The storage calls a store implements that the bus and the CLI call directly: their
# driver errors are translated in one place (see _translating).
_TRANSLATED = {
    "join": "joining a listener",
    "list_dead": "listing dead letters",
    "replay_dead": "replaying dead letters",
    "purge_dead": "purging dead letters",
    "listener_stats": "reading listener stats",
    "store_with": "storing events in the caller's transaction",
    "forget": "forgetting a listener",
    "joined": "reading the joined listeners",
    "claim_tick": "claiming a schedule's tick",
    "run_migrations": "running migrations",
}


def _translating(fn: Callable[..., Any], what: str) -> Callable[..., Any]:
    """``fn`` (an async storage method) raising only ``BackendError`` subclasses."""

    @functools.wraps(fn)
    async def call(self: DurableBackend, *args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(self, *args, **kwargs)
        except (BackendError, PayloadError, ConfigurationError):
            raise
        except Exception as exc:
            raise self.translate(exc, what) from exc

    call.__tidings_translated__ = True  # type: ignore[attr-defined]
    return call


def _count(name: str, value: int) -> None:
    if not (isinstance(value, int) and value >= 1):
        raise ConfigurationError(f"{name} must be a whole number of at least 1, not {value!r}")


class DurableBackend(Backend):
    """A backend whose deliveries live in a store that outlives the process.

    Args:
        consume: run this bus's listeners (``False``: a producer-only bus).
        concurrency: deliveries of one listener that may run at once in this process.
        lease: how long a claimed delivery is reserved for this process (seconds or a
            ``timedelta``, as every duration here); renewed while it runs, and reclaimed
            by any worker once it expires (the process died).
        poll_interval: how often an idle consumer looks for new deliveries.
        batch: the most deliveries claimed, or events stored, per round trip.
        max_pending: emitted events that may wait to be stored; ``emit`` raises
            ``QueueFull`` past it, ``publish`` waits.
        listeners: patterns of the listener names (qualified) to consume; default all.
        drain_on_close: ``aclose`` first waits for due deliveries (an app with one
            process); a worker stops claiming at once and leaves them to the next one.
        codec: ``"json"`` (the default) or ``"msgpack"`` for stored payloads; readers
            take either, so it can change while events wait.
        max_lost_runs: how many more times than its retry policy's attempts a delivery
            may be started (each start past those lost with its worker, which stopped or
            lost the lease while running it) before it is a dead letter
            (``DeliveryLost``) instead of being run again.
        stale_after: a consuming process warns of joined listeners no process has
            claimed for this long (their deliveries pile up: forget them, or run them).

    Raises:
        ConfigurationError: an option out of its range (named in the message).
    """

    durable: ClassVar[bool] = True
    serializes_at_put: ClassVar[bool] = True
    #: The scheme in URLs (``sqlite``), for messages.
    scheme: ClassVar[str] = "durable"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, what in _TRANSLATED.items():
            fn = cls.__dict__.get(name)
            if fn is not None and not getattr(fn, "__tidings_translated__", False):
                setattr(cls, name, _translating(fn, what))

    def __init__(
        self,
        *,
        consume: bool = True,
        concurrency: int = 100,
        lease: float | timedelta = 30.0,
        poll_interval: float | timedelta = 0.05,
        batch: int = 500,
        max_pending: int = 100_000,
        listeners: Sequence[str] | None = None,
        drain_on_close: bool = True,
        codec: str = "json",
        max_lost_runs: int = 5,
        stale_after: float | timedelta = 86400.0,
    ) -> None:
        if codec not in CODECS:
            raise ConfigurationError(f"codec must be one of {', '.join(CODECS)}, not {codec!r}")
        if not isinstance(max_lost_runs, int) or max_lost_runs < 0:
            raise ConfigurationError(f"max_lost_runs must be 0 or more, not {max_lost_runs}")
        _count("concurrency", concurrency)
        _count("batch", batch)
        _count("max_pending", max_pending)
        super().__init__()
        self.codec = codec
        self.consume = consume
        self.concurrency = concurrency
        self.lease_s = positive_seconds(lease, "lease")
        self.poll_s = positive_seconds(poll_interval, "poll_interval")
        self.batch = batch
        self.max_pending = max_pending
        self.listener_patterns = tuple(listeners) if listeners else None
        self.drain_on_close = drain_on_close
        self.max_lost_runs = max_lost_runs
        self.stale_listener_s = positive_seconds(stale_after, "stale_after")
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        #: The clock of leases and due times (epoch seconds); a test may move it.
        self.clock: Callable[[], float] = time.time
        self._runner: Runner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._buffer: list[_Entry] = []
        self._buffer_empty = asyncio.Event()
        self._puts = 0
        self._flushed_some = asyncio.Event()
        self._unstored: list[str] = []
        self._closing = False
        self._stop = asyncio.Event()
        self._flush_task: asyncio.Task[None] | None = None
        self._flush_wake = asyncio.Event()
        self._stored_count = 0
        self._consumers: list[_Consumer] = []
        self._inflight: dict[tuple[str, Subscription], Claimed] = {}
        self._tasks: dict[asyncio.Future[Any], tuple[str, Subscription]] = {}
        # Claimed deliveries of async listeners, waiting for a worker (see _work).
        self._queue: deque[tuple[_Consumer, tuple[str, Subscription], Event]] = deque()
        self._workers: set[asyncio.Task[None]] = set()
        self._pumping = 0  # workers taking from the queue (not waiting with a delivery)
        self._in_workers = 0  # deliveries queued or running in workers
        # Deliveries whose task was cancelled while their sync listener's thread runs
        # on: still this process's (their leases renewed) until the thread returns.
        self._outliving: dict[tuple[str, Subscription], Claimed] = {}
        self._seeing_out: asyncio.Task[None] | None = None
        self._outcomes = Outcomes()
        # The outcomes the writer is writing: their leases are still this process's.
        self._writing: Outcomes | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._writer_wake = asyncio.Event()
        self._writer_idle = asyncio.Event()
        self._renew_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._drain_gen = 0
        self._progress = asyncio.Event()
        self._outage_logged = False
        self._payloads: dict[str, tuple[tuple[Any, ...], dict[str, Any], Any]] = {}
        # The one delivery whose last run was lost that this process holds, to run
        # alone: from its claim until it ended, no consumer of this process claims.
        self._alone: tuple[_Consumer, Claimed, Event] | None = None
        self._alone_task: asyncio.Task[None] | None = None
        self._paused = False
        self._stale_checked = 0.0
        # Event names stored lately, and whether a joined listener takes each (checked
        # in the background, and again after a while: listeners join and leave).
        self._listened: dict[str, bool] = {}
        self._listened_since = 0.0
        self._listening_task: asyncio.Task[None] | None = None
        # The subscriptions joined to the store, and the task that joins (and starts or
        # stops the consumers of) those subscribed or unsubscribed once started.
        self._known: set[Subscription] = set()
        self._reconciling: asyncio.Task[None] | None = None
        self._reconcile_again = False
        self._started = False
        # By listener name, the consumer last stopped while its deliveries still ran.
        self._leaving: dict[str, _Consumer] = {}

    # -- the storage protocol, one implementation per broker ------------------------

    @abstractmethod
    async def connect(self) -> None:
        """Open connections and create what the store needs (idempotent)."""

    @abstractmethod
    async def disconnect(self) -> None:
        """Close connections."""

    @abstractmethod
    async def store(self, records: Sequence[Stored]) -> None:
        """Store events durably (one round trip for the batch where the broker can);
        all or none of them."""

    @abstractmethod
    async def join(self, listener: str, names: Sequence[str]) -> None:
        """Make sure ``listener`` gets a delivery of every event stored from now on whose
        name matches one of ``names`` (a no-op if it already does)."""

    @abstractmethod
    async def claim(
        self, listener: str, names: Sequence[str], limit: int, lease_s: float
    ) -> list[Claimed]:
        """Lease up to ``limit`` due deliveries of ``listener`` to this process, oldest
        first, counting an attempt for each. One whose lease expired (its worker died
        running it) is reclaimed alone, marked ``lost``. An entry that cannot be read is
        returned with ``error`` set, never raised."""

    @abstractmethod
    async def settle(self, outcomes: Outcomes) -> None:
        """Write outcomes back in one round trip: acks delete deliveries, retries make
        them due again later, burials keep them as dead letters, releases hand them
        back untried (the attempt is not counted; a ``lost`` one is reclaimed as lost
        again). Each only where this process (``owner``) still holds the delivery's
        lease. Then ``uncounted`` (see :class:`Outcomes`), before the others: only
        where the attempt is still the one that claim counted."""

    @abstractmethod
    async def renew(self, claimed: Sequence[Claimed], lease_s: float) -> list[Claimed] | None:
        """Extend the leases of deliveries that are still running, where this process
        still holds them; the deliveries it no longer holds (another took them over)."""

    @abstractmethod
    async def list_dead(self, listener: str | None, limit: int) -> list[DeadLetter]:
        """Dead letters, oldest first."""

    @abstractmethod
    async def replay_dead(self, ids: Sequence[str] | None, listener: str | None) -> int:
        """Make dead letters due again with fresh attempts; how many."""

    @abstractmethod
    async def purge_dead(self, ids: Sequence[str] | None, listener: str | None) -> int:
        """Delete dead letters; how many."""

    @abstractmethod
    async def listener_stats(self) -> dict[str, ListenerStats]:
        """What waits in the store, per listener."""

    async def forget(self, listener: str) -> bool:
        """Remove a joined listener and every delivery of it, so it keeps no event
        stored; whether it was joined.

        Raises:
            BackendError: the store cannot forget listeners.
        """
        raise BackendError(f"the {self.scheme} store cannot forget listeners")

    async def joined(self) -> dict[str, list[str]] | None:
        """The listeners joined on the store and the patterns of each; ``None`` when the
        store cannot say."""
        return None

    async def listeners_of(self, name: str) -> list[str] | None:
        """The joined listeners an event named ``name`` is stored for (``None``: the
        store cannot say)."""
        joined = await self.joined()
        if joined is None:
            return None
        return sorted(
            listener
            for listener, patterns in joined.items()
            if any(matches(pattern, name) for pattern in patterns)
        )

    def refuses(self, exc: BaseException) -> bool:
        """Whether ``exc`` (raised by :meth:`store` or :meth:`join`) says the store
        refuses the records or listener themselves (a constraint, an encoding, a size),
        rather than that it cannot be reached: refused events are dropped one by one, a
        refused listener left out, never retried as an outage. A store adds its
        driver's data errors."""
        if isinstance(exc, OSError | ConnectionError | TimeoutError | BackendError):
            return False
        return isinstance(exc, UnicodeError | OverflowError | ValueError | TypeError)

    def _store_refuses(self, exc: BaseException) -> bool:
        """:meth:`refuses`, through a translated error to the driver's own."""
        cause = exc.__cause__ if isinstance(exc, BackendError) else None
        return self.refuses(cause if isinstance(cause, Exception) else exc)

    def translate(self, exc: BaseException, what: str) -> BackendError:
        """The library's error for a driver's ``exc`` raised while doing ``what``."""
        lost = isinstance(exc, OSError | ConnectionError | TimeoutError)
        kind = ConnectionLost if lost else BackendError
        if what.startswith("storing"):
            kind = PublishFailed
        return kind(f"{self.scheme} store: {what} failed: {error_text(exc)}")

    # -- Backend: producing --------------------------------------------------------

    async def start(self, runner: Runner) -> None:
        self._runner = runner
        self._loop = runner.loop
        try:
            await self.connect()
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"cannot open the {self.scheme} store: {exc}") from exc
        registry = runner.registry
        if registry is not None:
            # Before the listeners are read: those subscribed while the ones read join
            # are checked, and joined once these are (see the end).
            registry.check_additions(self._check_added)
            registry.watch(self._subscriptions_changed)
        subs = registry.subscriptions() if registry is not None else []
        try:
            _storable([sub.listener for sub in subs])
            for sub in subs:
                # Every bus joins its listeners, so events a producer stores before any
                # worker ever ran still reach them.
                await self.join(sub.listener.qualname, sub.listener.names)
        except BaseException:
            # A start that fails leaves no connection open behind it.
            if registry is not None:
                registry.stop_checking(self._check_added)
                registry.unwatch(self._subscriptions_changed)
            with contextlib.suppress(Exception):
                await self.disconnect()
            raise
        self._known = set(subs)
        self._flush_task = self._loop.create_task(self._flusher())
        self._writer_task = self._loop.create_task(self._writer())
        if self.consume:
            for sub in subs:
                self._start_consumer(sub)
            self._renew_task = self._loop.create_task(self._renewer())
        self._started = True
        if registry is not None and set(registry.subscriptions()) != self._known:
            self._reconcile_soon()  # subscribed or unsubscribed while starting

    def _start_consumer(self, sub: Subscription) -> None:
        if self.listener_patterns is not None and not any(
            matches(p, sub.listener.qualname) for p in self.listener_patterns
        ):
            return
        consumer = _Consumer(sub)
        consumer.before = self._leaving.pop(consumer.listener_id, None)
        consumer.task = self._loop.create_task(self._consume(consumer))  # type: ignore[union-attr]
        consumer.task.add_done_callback(functools.partial(self._consumer_ended, consumer))
        self._consumers.append(consumer)

    def _consumer_ended(self, consumer: _Consumer, _task: asyncio.Task[None]) -> None:
        if consumer.stopped and consumer in self._consumers:
            self._consumers.remove(consumer)
            self._progress.set()  # a drain waits no more for its claims

    def _ahead(self, consumer: _Consumer) -> int:
        """The deliveries of ``consumer``'s listener still running for the consumers
        stopped before it (forgetting those that have none left)."""
        total = 0
        link = consumer
        while (before := link.before) is not None:
            if before.running:
                total += before.running
                link = before
            else:
                link.before = before.before
        return total

    def _ended_stopped(self, consumer: _Consumer) -> None:
        """A delivery of the stopped ``consumer`` ended: the consumer of its listener
        subscribed again may have room now."""
        for other in self._consumers:
            if other.listener_id == consumer.listener_id:
                other.wake.set()
        if not consumer.running and self._leaving.get(consumer.listener_id) is consumer:
            del self._leaving[consumer.listener_id]

    # -- listeners subscribed or unsubscribed once started ---------------------------

    def _check_added(self, listeners: list[Listener[..., Any]]) -> None:
        """Refuse listeners subscribed once started that a store cannot keep."""
        registry = self._runner.registry if self._runner is not None else None
        if registry is None:
            return
        _storable([*(sub.listener for sub in registry.subscriptions()), *listeners])

    def _subscriptions_changed(self) -> None:
        """Join, on the loop, the listeners subscribed since the bus started (called by
        the registry, on any thread)."""
        loop = self._loop
        if loop is None or self._stopping or not self._started:
            return  # (start looks once it joined the listeners it read)
        try:
            here = asyncio.get_running_loop() is loop
        except RuntimeError:
            here = False
        if here:
            self._reconcile_soon()
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing runs
                loop.call_soon_threadsafe(self._reconcile_soon)

    def _reconcile_soon(self) -> None:
        if self._stopping or self._loop is None:
            return
        if self._reconciling is None or self._reconciling.done():
            self._reconciling = self._loop.create_task(self._reconcile())
        else:
            self._reconcile_again = True

    async def _reconcile(self) -> None:
        """Join each listener subscribed since start and start its consumer, as start
        does; stop the consumers of those unsubscribed (their deliveries stay in the
        store, as those of a listener that runs in no process)."""
        registry = self._runner.registry if self._runner is not None else None
        if registry is None:
            return
        while True:
            self._reconcile_again = False
            subs = registry.subscriptions()
            # The consumers of those unsubscribed stop first: one of a listener
            # subscribed again counts the deliveries they still run.
            current = set(subs)
            self._known = {sub for sub in self._known if sub in current}
            for consumer in self._consumers:
                if consumer.sub not in self._known and not consumer.stopped:
                    consumer.stopped = True
                    consumer.wake.set()
                    if consumer.running:
                        self._leaving[consumer.listener_id] = consumer
            for sub in subs:
                if sub in self._known:
                    continue
                delay = self.poll_s
                joined = True
                while True:
                    try:
                        await self.join(sub.listener.qualname, sub.listener.names)
                        break
                    except Exception as exc:
                        if self._store_refuses(exc):
                            # Retried, it would be refused again, and hold back every
                            # event published meanwhile: it is left out, the rest go on.
                            logger.error(
                                "%s store: refuses to join listener %s (%s); it is not "
                                "run, and no event is kept for it",
                                self.scheme,
                                sub.listener.qualname,
                                exc,
                            )
                            joined = False
                            break
                        self._outage(f"joining {sub.listener.qualname} failed", exc)
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, 5.0)
                self._recovered()
                self._known.add(sub)  # (one refused is not tried again)
                if joined and self.consume and not self._stopping:
                    self._start_consumer(sub)
            if not self._reconcile_again:
                return

    async def _listeners_joined(self) -> None:
        """Wait until the listeners subscribed so far are joined to the store, so that
        what is stored from now on reaches them."""
        while self._reconciling is not None and not self._reconciling.done():
            await asyncio.wait([self._reconciling])

    def deliver(self, delivery: Delivery) -> None:
        """Run a delivery at once (the engine runs what it claims through its runner)."""
        delivery.start()

    def _record(self, event: Event, due: float) -> Stored:
        return Stored(
            id=event.id,
            name=event.name,
            data=encode_payload(event, self.codec),
            headers=dict(event.headers),
            created=event.timestamp,
            due=due,
        )

    def _due(self, event: Event, delay_s: float | None) -> float:
        return event.timestamp if delay_s is None else self.clock() + delay_s

    def _append(self, record: Stored, waiter: asyncio.Future[None] | None) -> None:
        self._puts += 1
        self._buffer.append((record, waiter, self._puts))
        self._buffer_empty.clear()
        self._flush_wake.set()

    def has_room(self, count: int) -> bool:
        return len(self._buffer) + count <= self.max_pending

    def put(self, event: Event, subs: tuple[Subscription, ...], ctx: Context) -> None:
        if len(self._buffer) >= self.max_pending:
            raise QueueFull(
                f"{len(self._buffer)} events wait to be stored in {self.scheme} "
                f"(max_pending={self.max_pending}); cannot queue event {event.name!r}: "
                "await bus.publish(...) to wait for the store"
            )
        self._append(self._record(event, event.timestamp), None)

    async def put_wait(
        self,
        event: Event,
        subs: tuple[Subscription, ...],
        ctx: Context,
        delay_s: float | None = None,
    ) -> None:
        """Queue like :meth:`put` (due ``delay_s`` seconds from now, if given), waiting
        for room, and return once the event is stored.

        Raises:
            PublishFailed: the store is unreachable, or refused the event.
        """
        record = self._record(event, self._due(event, delay_s))
        while len(self._buffer) >= self.max_pending:
            self._buffer_empty.clear()
            await self._buffer_empty.wait()
        waiter = self._loop.create_future()  # type: ignore[union-attr]
        self._append(record, waiter)
        await waiter

    def put_later(
        self, event: Event, subs: tuple[Subscription, ...], ctx: Context, delay_s: float
    ) -> None:
        self._append(self._record(event, self.clock() + delay_s), None)

    async def _flusher(self) -> None:
        delay = 0.05
        while not (self._closing and not self._buffer):
            if not self._buffer:
                self._buffer_empty.set()
                await self._flush_wake.wait()
            self._flush_wake.clear()
            while self._buffer:
                if self._reconciling is not None and not self._reconciling.done():
                    await self._listeners_joined()
                    continue
                batch = self._buffer[: self.batch]
                done: list[_Entry] = []
                try:
                    await self._store_batch(batch, done)
                except Exception as exc:
                    gone = {id(entry) for entry in done}
                    self._buffer = [entry for entry in self._buffer if id(entry) not in gone]
                    self._outage(f"storing {len(batch) - len(done)} event(s) failed", exc)
                    # A publisher hears of it (and may retry); emitted events wait here.
                    kept: list[_Entry] = []
                    for entry in self._buffer:
                        record, waiter, _ = entry
                        if waiter is None:
                            kept.append(entry)
                        elif not waiter.done():
                            waiter.set_exception(
                                PublishFailed(f"event {record.id} was not stored: {exc}")
                            )
                    self._buffer = kept
                    self._flushed_some.set()
                    if self._closing:
                        self._lost(exc)
                        return
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                delay = 0.05
                self._recovered()
                # The batch is still the buffer's head: puts only append.
                del self._buffer[: len(batch)]
                self._flushed_some.set()
                for consumer in self._consumers:
                    consumer.wake.set()
        self._buffer_empty.set()

    async def _store_batch(self, batch: list[_Entry], done: list[_Entry]) -> None:
        """Store ``batch``; when the store refuses it for what it holds (not an outage),
        halve it until the refused events are found, store the rest and drop those.
        Each entry handled is added to ``done``; an outage raises."""
        try:
            await self.store([record for record, _, _ in batch])
        except Exception as exc:
            if not self._store_refuses(exc):
                raise
            if len(batch) == 1:
                self._refused(batch[0], exc)
                done.append(batch[0])
                return
            half = len(batch) // 2
            await self._store_batch(batch[:half], done)
            await self._store_batch(batch[half:], done)
            return
        self._stored_count += len(batch)
        self._note_names(batch)
        for entry in batch:
            waiter = entry[1]
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            done.append(entry)

    def _note_names(self, batch: list[_Entry]) -> None:
        """Look, in the background, whether a joined listener takes the events just
        stored under names not seen lately; warn of those that no listener takes."""
        now = time.monotonic()
        if now - self._listened_since > 60.0 or len(self._listened) > 10_000:
            self._listened.clear()
            self._listened_since = now
        names = {record.name for record, _, _ in batch}.difference(self._listened)
        if names and (self._listening_task is None or self._listening_task.done()):
            loop = self._loop
            assert loop is not None
            self._listening_task = loop.create_task(self._check_listened(names))

    async def _check_listened(self, names: set[str]) -> None:
        try:
            joined = await self.joined()
        except Exception:
            return  # an outage is reported by the claims and stores
        if joined is None:
            self._listened.update(dict.fromkeys(names, True))
            return
        patterns = [p for listener_patterns in joined.values() for p in listener_patterns]
        for name in sorted(names):
            listened = any(matches(p, name) for p in patterns)
            self._listened[name] = listened
            if not listened:
                logger.warning(
                    "event %r was stored for no listener: none joined on the %s store "
                    "subscribes to it (a listener receives the events stored after it first "
                    "joined, when a bus with it started)",
                    name,
                    self.scheme,
                )

    def _refused(self, entry: _Entry, exc: BaseException) -> None:
        record, waiter, _ = entry
        error = error_text(exc)
        logger.error(
            "event %s (%r) was refused by the %s store and dropped: %s",
            record.id,
            record.name,
            self.scheme,
            error,
        )
        if waiter is not None and not waiter.done():
            waiter.set_exception(
                PublishFailed(f"event {record.id} was refused by the {self.scheme} store: {error}")
            )

    def _lost(self, exc: BaseException | None) -> None:
        if self._buffer:
            ids = [record.id for record, _, _ in self._buffer]
            logger.error(
                "%d emitted event(s) could not be stored before closing: %s (%s)",
                len(ids),
                ", ".join(ids),
                exc or "the store did not answer in time",
            )
            self._unstored.extend(ids)
            for _record, waiter, _ in self._buffer:
                if waiter is not None and not waiter.done():
                    waiter.set_exception(PublishFailed("the bus closed before it was stored"))
            self._buffer.clear()
            self._flushed_some.set()

    async def _stored_up_to(self, put: int) -> None:
        """Wait until every event put up to number ``put`` is stored (or dropped)."""
        while self._buffer and self._buffer[0][2] <= put:
            if self._flush_task is None or self._flush_task.done():
                return
            self._flushed_some.clear()
            await self._flushed_some.wait()

    # -- Backend: consuming --------------------------------------------------------

    async def _consume(self, consumer: _Consumer) -> None:
        limit = consumer.sub.listener.concurrency or self.concurrency
        delay = self.poll_s
        while not (self._stopping or consumer.stopped):
            room = limit - consumer.running
            if consumer.before is not None:
                room -= self._ahead(consumer)
            if room <= 0 or self._paused:
                consumer.wake.clear()
                await consumer.wake.wait()
                continue
            gen = self._drain_gen
            consumer.wake.clear()
            consumer.claiming = True
            try:
                claimed = await self.claim(
                    consumer.listener_id, consumer.names, min(room, self.batch), self.lease_s
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._outage(f"claiming deliveries of {consumer.listener_id} failed", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            finally:
                consumer.claiming = False
                self._progress.set()
            delay = self.poll_s
            self._recovered()
            if self._stopping or consumer.stopped:
                self._outcomes.releases.extend(claimed)
                self._writer_wake.set()
                break
            if not claimed:
                consumer.idle_gen = gen
                self._progress.set()
                await self.idle_wait(consumer.listener_id, consumer.wake)
                continue
            self._start_deliveries(consumer, claimed)

    async def idle_wait(self, listener: str, wake: asyncio.Event) -> None:
        """Wait, after a claim for ``listener`` found nothing, until ``wake`` is set (new
        events stored here, a drain, a stop) or ``poll_interval`` passes; a store that can tell
        when another process stores events wakes it sooner."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), self.poll_s)

    def _start_deliveries(self, consumer: _Consumer, batch: list[Claimed]) -> None:
        """Start a batch of deliveries; those that finish at once are acknowledged here."""
        sub = consumer.sub
        runner = self._runner
        assert runner is not None
        inflight = self._inflight
        outcomes = self._outcomes  # not swapped by the writer before this returns
        new_context = contextvars.Context
        # Starts past this many: the runs past the retry policy's were all lost.
        most = (sub.listener.retry or runner.retry).attempts + self.max_lost_runs
        revive = sub.listener.plan.revive if sub.listener.plan.revivable else None
        held = self._unwritten_ids(consumer.listener_id)
        # Run by the workers, without a task each (see _work); others by the runner.
        in_line = sub.listener.is_async and not runner.observers
        again: list[Claimed] = []
        for claimed in batch:
            key = (claimed.record.id, sub)
            if key in inflight or claimed.record.id in held:
                # Its lease ran out while this process still held it (running, or its
                # outcome not yet written), and the store handed it back to the same
                # owner: the run under way or its outcome settles it; never run it twice,
                # nor count it twice.
                again.append(claimed)
                outcomes.uncounted.append(claimed)
                continue
            event = self._readable(claimed, sub)
            if event is None:
                continue
            inflight[key] = claimed
            if claimed.attempt > most:
                # Recorded as the delivery's last failure: logged, hooks, dead letter.
                runner.failed(event, sub, new_context(), _lost(event, sub, claimed.attempt))
                continue
            if revive is not None:
                try:
                    revive(event)  # values back to the types the parameters name
                except BindingError as exc:
                    runner.failed(event, sub, new_context(), exc)  # a dead letter, at once
                    continue
            if claimed.lost:
                # Its last run was lost with its process: run it alone, so that if it
                # crashes this process too, it takes no other delivery with it, nor
                # counts a lost run for one it holds. Another lost one (from a claim that
                # was under way) is handed back uncounted, still lost, for later.
                if self._alone is not None:
                    del inflight[key]
                    outcomes.releases.append(claimed)
                    continue
                self._alone = (consumer, claimed, event)
                self._pause()
                self._alone_task = runner.loop.create_task(self._run_alone())
                continue
            if in_line:
                consumer.running += 1
                self._in_workers += 1
                self._queue.append((consumer, key, event))
            else:
                self._run(consumer, key, event)
        if self._queue and not self._pumping:
            self._spawn(1)
        if outcomes:
            self._writer_wake.set()
        if again:
            logger.warning(
                "%d deliveries of %s were claimed again while this process still held them "
                "(their lease ran out before their outcome was written: is the %s store slow, "
                "or lease=%gs too short?); they are not run again: %s",
                len(again),
                consumer.listener_id,
                self.scheme,
                self.lease_s,
                ", ".join(c.record.id for c in again[:20]),
            )

    def _unwritten(self) -> list[Claimed]:
        """The deliveries whose outcome waits to be written, or is being written: this
        process still holds their leases until it is."""
        out: list[Claimed] = []
        for outcomes in (self._writing, self._outcomes):
            if outcomes:
                out += outcomes.acks
                out += [c for c, _, _ in outcomes.retries]
                out += [c for c, _, _ in outcomes.burials]
                out += outcomes.releases
        return out

    def _unwritten_ids(self, listener: str) -> set[str]:
        """The event ids of ``listener``'s deliveries whose outcome is not written yet."""
        if not (self._outcomes or self._writing):
            return set()
        return {c.record.id for c in self._unwritten() if c.listener == listener}

    def _run(
        self, consumer: _Consumer, key: tuple[str, Subscription], event: Event
    ) -> asyncio.Future[Any] | None:
        """Run one claimed delivery (in ``_inflight`` under ``key``); the task running
        it, or ``None`` once it finished."""
        runner = self._runner
        assert runner is not None
        consumer.running += 1
        fut = runner.run(event, key[1], contextvars.Context())
        if fut is None:
            consumer.running -= 1
            done = self._inflight.pop(key, None)
            if done is not None:  # neither retried nor buried by the runner
                self._settle_ended(done, cancelled=False)
        else:
            self._tasks[fut] = key
            fut.add_done_callback(
                lambda f: self._finished(consumer, self._tasks.pop(f), cancelled=f.cancelled())
            )
        return fut

    def _spawn(self, count: int) -> None:
        """Start ``count`` more workers taking deliveries from the queue."""
        loop = self._loop
        assert loop is not None
        for _ in range(count):
            ctx = Context()
            task = loop.create_task(self._work(ctx), name="tidings.durable.worker", context=ctx)
            self._pumping += 1
            self._workers.add(task)
            task.add_done_callback(self._workers.discard)

    async def _work(self, ctx: Context) -> None:
        """Run the queued deliveries one after the other until none is left: a delivery
        that does not suspend costs no task.

        The worker runs in a fresh context (``ctx``, its task's): a delivery that leaves
        a context variable set in it ends the worker, and another takes the rest of the
        queue in a fresh one, so that no delivery sees what another set. When a delivery
        suspends, the worker waits with it and more workers go on with the queue (the
        deliveries queued were claimed within each listener's concurrency, so all of
        them may run at once). The worker is the delivery's task while it runs: its
        timeout cancels the worker (and is told apart from a cancellation from outside,
        as in a task of its own), and closing cancels it."""
        queue = self._queue
        runner = self._runner
        assert runner is not None
        task = asyncio.current_task()
        assert task is not None
        # Whether the worker counts in _pumping: not while it waits with a delivery
        # that suspended.
        pumping = True
        ran = 0
        try:
            while queue:
                if ran >= _WORKER_BATCH:
                    ran = 0
                    await asyncio.sleep(0)
                    continue
                ran += 1
                consumer, key, event = queue.popleft()
                run = runner.in_line(event, key[1], ctx)
                try:
                    if run is not None:
                        # Its first step here: most deliveries end in it.
                        yielded = run.send(None)
                        pumping = False
                        self._pumping -= 1
                        if queue and not self._pumping:
                            self._spawn(len(queue))
                        await _resumed(run, yielded)
                except StopIteration:
                    pass
                except BaseException:
                    # Cancelled from outside (closing): handed back, and the worker ends.
                    self._ended_in_worker(consumer, key, cancelled=True)
                    raise
                self._ended_in_worker(consumer, key, cancelled=False)
                if not pumping:
                    pumping = True
                    self._pumping += 1
                    if task.cancelling():
                        # The listener swallowed the cancellation meant for the worker.
                        raise asyncio.CancelledError
                if len(ctx):
                    # The listener left a context variable set: a fresh worker goes on.
                    pumping = False
                    self._pumping -= 1
                    if queue and not self._pumping:
                        self._spawn(1)
                    return
        finally:
            if pumping:
                self._pumping -= 1

    def _ended_in_worker(
        self, consumer: _Consumer, key: tuple[str, Subscription], *, cancelled: bool
    ) -> None:
        self._in_workers -= 1
        consumer.running -= 1
        claimed = self._inflight.pop(key, None)
        if claimed is not None:  # neither retried nor buried by the runner
            self._settle_ended(claimed, cancelled=cancelled)
        self._consumer_freed(consumer)

    def _pause(self) -> None:
        """Stop claiming in this process (claims under way return at once) until the
        delivery held to run alone has ended."""
        self._paused = True
        for c in self._consumers:
            c.wake.set()

    def _holds_nothing_else(self) -> bool:
        """Whether this process holds no delivery but the one to run alone: nothing
        runs, no claim is under way, and every outcome is written (a crash must not take
        an ack with it, nor a release, which would count a run for what it held)."""
        return not (
            self._tasks
            or self._in_workers
            or self._outcomes
            or not self._writer_idle.is_set()
            or any(c.claiming for c in self._consumers)
        )

    async def _run_alone(self) -> None:
        """Run the delivery whose last run was lost once this process is quiet, then let
        the consumers claim again."""
        assert self._alone is not None
        consumer, claimed, event = self._alone
        key = (claimed.record.id, consumer.sub)
        started = False
        try:
            while not self._holds_nothing_else() and not self._stopping:
                self._progress.clear()
                await self._progress.wait()
            if self._stopping or self._inflight.get(key) is not claimed:
                return  # stopped, or its lease was lost meanwhile
            started = True
            fut = self._run(consumer, key, event)
            if self._outcomes:
                self._writer_wake.set()
            if fut is not None:
                await asyncio.wait([fut])
        finally:
            self._alone = None
            self._paused = False
            if not started and self._inflight.get(key) is claimed:
                del self._inflight[key]
                self._outcomes.releases.append(claimed)
            self._writer_wake.set()
            for c in self._consumers:
                c.wake.set()

    def _readable(self, claimed: Claimed, sub: Subscription) -> Event | None:
        """The event of a claimed delivery, or ``None`` when it cannot be read: then it
        is buried as a dead letter at once (running it again would not help)."""
        record = claimed.record
        error = claimed.error
        if error is None and record.version > STORED_VERSION:
            error = (
                f"PayloadError: event {record.id} was stored by a newer tidings (stored "
                f"format {record.version}; this worker reads up to {STORED_VERSION}): "
                "upgrade this worker, then replay the dead letter"
            )
        if error is None:
            try:
                return self._decode(claimed, sub)
            except Exception as exc:  # RecursionError too: whatever the bytes make it do
                error = error_text(exc)
        logger.error(
            "event %s for %s cannot be read from the %s store: %s; dead letter",
            record.id,
            claimed.listener,
            self.scheme,
            error,
        )
        self._outcomes.burials.append((claimed, error, ""))
        return None

    def _finished(
        self, consumer: _Consumer, key: tuple[str, Subscription], *, cancelled: bool
    ) -> None:
        consumer.running -= 1
        claimed = self._inflight.pop(key, None)
        runner = self._runner
        abandoned = runner.abandoned.pop(key, None) if cancelled and runner else None
        if claimed is not None:
            if abandoned is not None:
                # Its thread still runs: handed back now, another worker would run it
                # beside it. Its lease stays this process's until the thread returns.
                self._outliving[key] = claimed
                abandoned.running.add_done_callback(
                    functools.partial(self._outlived, key, abandoned)
                )
                logger.warning(
                    "event %s for %s was stopped while its thread still runs: its lease "
                    "is held until the thread returns, and its outcome written then",
                    key[0],
                    consumer.listener_id,
                )
            else:
                # Neither retried nor buried by the runner: it returned, or was cancelled.
                self._settle_ended(claimed, cancelled=cancelled)
        self._consumer_freed(consumer)

    def _settle_ended(self, claimed: Claimed, *, cancelled: bool) -> None:
        """Write the end of a delivery that returned (ack) or was cancelled (released)."""
        (self._outcomes.releases if cancelled else self._outcomes.acks).append(claimed)
        self._writer_wake.set()

    def _consumer_freed(self, consumer: _Consumer) -> None:
        """One of ``consumer``'s deliveries ended: it may claim again, a stopped one may
        be done, and a drain looks again."""
        consumer.wake.set()
        if consumer.stopped:
            self._ended_stopped(consumer)
        self._progress.set()

    def _outlived(
        self, key: tuple[str, Subscription], abandoned: Abandoned, _running: object
    ) -> None:
        """The thread of a stopped delivery returned: write its outcome."""
        runner = self._runner
        if key not in self._outliving or runner is None:
            return  # its lease was lost to another worker meanwhile
        # A failure is retried or buried through retry() and dead(), as any.
        succeeded = runner.settle_abandoned(key[1], abandoned)
        claimed = self._outliving.pop(key, None)
        if claimed is not None:
            (self._outcomes.acks if succeeded else self._outcomes.releases).append(claimed)
        self._writer_wake.set()
        self._progress.set()

    def _held(self, key: tuple[str, Subscription]) -> Claimed | None:
        """Take the lease of a delivery this process ran, to write its outcome."""
        claimed = self._inflight.pop(key, None)
        return self._outliving.pop(key, None) if claimed is None else claimed

    def _decode(self, claimed: Claimed, sub: Subscription) -> Event:
        record = claimed.record
        payloads = self._payloads
        raw = payloads.get(record.id)
        if raw is None:
            raw = decode_payload(record.data)
            if len(self._consumers) > 1:
                # The other listeners of this event will read the same bytes soon: decode
                # once (they share the payload, as listeners of an in-process emit do).
                if len(payloads) >= _DECODED:
                    payloads.clear()
                payloads[record.id] = raw
        args, kwargs, obj = raw
        if obj is not None:
            registry = self._runner.registry if self._runner is not None else None
            cls = registry.event_class(record.name) if registry is not None else None
            if cls is None:
                cls = sub.listener.types.get(record.name)
            if cls is not None:
                obj = revive_object(obj, cls)
            elif isinstance(obj, dict):
                # No class known here: its fields arrive as keyword arguments.
                kwargs, obj = obj, None
        return event_of(record, args, kwargs, obj, claimed.attempt)

    def retry(self, event: Event, sub: Subscription, ctx: Context, delay_s: float) -> None:
        claimed = self._held((event.id, sub))
        if claimed is not None:
            self._outcomes.retries.append((claimed, delay_s, ""))
            self._writer_wake.set()

    def dead(self, event: Event, sub: Subscription, exc: BaseException) -> None:
        claimed = self._held((event.id, sub))
        if claimed is not None:
            error = error_text(exc)
            tb = "".join(traceback.format_exception(exc))
            self._outcomes.burials.append((claimed, error, tb))
            self._writer_wake.set()

    async def _writer(self) -> None:
        while not (self._closing and not self._outcomes):
            if not self._outcomes:
                self._writer_idle.set()
                self._progress.set()
                await self._writer_wake.wait()
                self._writer_wake.clear()
                continue
            self._writer_wake.clear()
            self._writer_idle.clear()
            outcomes, self._outcomes = self._outcomes, Outcomes()
            self._writing = outcomes
            # What the listeners emitted before these outcomes is stored first: a crash
            # between an ack and its delivery's follow-on events must not lose them.
            await self._stored_up_to(self._puts)
            while True:
                try:
                    await self.settle(outcomes)
                    self._recovered()
                    break
                except Exception as exc:
                    self._outage("writing delivery outcomes failed", exc)
                    if self._closing:
                        logger.error(
                            "outcomes of %d deliveries could not be written before closing; "
                            "they will run again",
                            len(outcomes.acks) + len(outcomes.retries) + len(outcomes.burials),
                        )
                        return
                    await asyncio.sleep(0.2)
            self._writing = None
            self._progress.set()

    async def _renewer(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.lease_s / 3)
            if self._closing:
                return
            running = [*self._inflight.values(), *self._outliving.values()]
            # Until its outcome is written a delivery stays this process's: its lease
            # running out meanwhile (a slow store) would let a worker run it again.
            unwritten = self._unwritten()
            if running or unwritten:
                try:
                    lost = await self.renew(running + unwritten, self.lease_s) or []
                except Exception as exc:
                    self._outage("renewing leases failed", exc)
                else:
                    # One whose outcome was written meanwhile is gone from the store.
                    held = {id(c) for c in (*self._inflight.values(), *self._outliving.values())}
                    self._lease_lost([c for c in lost if id(c) in held])
            await self._check_stale()

    def _lease_lost(self, lost: Sequence[Claimed]) -> None:
        """Forget deliveries another process took over: their outcomes are not ours to
        write (the other process runs them, and settles them)."""
        if not lost:
            return
        mine = {id(c) for c in lost}
        for held in (self._inflight, self._outliving):
            for key, claimed in list(held.items()):
                if id(claimed) in mine:
                    del held[key]
        logger.warning(
            "%d deliveries' leases were lost to another worker while they ran (was this "
            "process frozen, or the store out of reach, for over lease=%gs?); their "
            "outcomes will not be written: %s",
            len(lost),
            self.lease_s,
            ", ".join(f"{c.record.id} for {c.listener}" for c in lost[:20]),
        )

    async def _check_stale(self) -> None:
        """Warn, now and then, of joined listeners no process has claimed for a while."""
        now = self.clock()
        if now - self._stale_checked < min(self.stale_listener_s, 3600.0):
            return
        self._stale_checked = now
        try:
            stats = await self.listener_stats()
        except Exception:
            return  # an outage is reported by the claims
        here = {c.listener_id for c in self._consumers}
        for name, s in sorted(stats.items()):
            if name in here:
                continue
            if s.last_seen is not None and now - s.last_seen > self.stale_listener_s:
                logger.warning(
                    "no process has claimed deliveries of listener %s for %.0fs "
                    "(%d pending): run it, or 'tidings listeners forget APP %s' so it "
                    "keeps no events stored",
                    name,
                    now - s.last_seen,
                    s.pending,
                    name,
                )

    def _outage(self, what: str, exc: BaseException) -> None:
        if not self._outage_logged:
            self._outage_logged = True
            logger.error("%s store: %s (%s); retrying until it answers", self.scheme, what, exc)

    def _recovered(self) -> None:
        if self._outage_logged:
            self._outage_logged = False
            logger.warning("%s store answers again", self.scheme)

    # -- Backend: draining and closing ------------------------------------------------

    async def _flushed(self) -> None:
        while self._buffer:
            self._buffer_empty.clear()
            self._flush_wake.set()
            await self._buffer_empty.wait()

    async def drain(self) -> None:
        """Store what was emitted; when consuming, also wait until this process's
        listeners have nothing due, running or retrying."""
        if self._loop is None:
            return
        await self._flushed()
        if not self.consume or not self._consumers:
            return
        while True:
            # Those of listeners unsubscribed are left in the store: a consumer stopped
            # but not ended yet is not waited for.
            ids = {c.listener_id for c in self._consumers if not c.stopped}
            self._drain_gen += 1
            gen = self._drain_gen
            for c in self._consumers:
                c.wake.set()
            while not (
                all(c.idle_gen >= gen for c in self._consumers if not c.stopped)
                and not self._inflight
                and not self._outcomes
                and self._writer_idle.is_set()
            ):
                self._progress.clear()
                await self._progress.wait()
            stats = await self.listener_stats()
            waiting = sum(
                s.retrying + s.pending + s.in_flight for lid, s in stats.items() if lid in ids
            )
            if not waiting:
                return
            await asyncio.sleep(self.poll_s)

    async def aclose(self, timeout_s: float | None) -> list[str]:
        """Drain for at most ``timeout_s`` seconds (when ``drain_on_close``), stop, and
        return the ids of emitted events that could not be stored (the store did not
        answer in time); what was stored and not run stays for the next worker."""
        loop = self._loop
        if loop is None:
            return []
        if self._runner is not None and self._runner.registry is not None:
            self._runner.registry.stop_checking(self._check_added)
            self._runner.registry.unwatch(self._subscriptions_changed)
        deadline = None if timeout_s is None else loop.time() + timeout_s

        def left(grace: float = 0.0) -> float | None:
            return None if deadline is None else max(0.0, deadline + grace - loop.time())

        # A claim or a store under way gets a moment even past the deadline (cut off,
        # what a claim leased waits out its lease and counts a lost run).
        grace = 1.0

        if self.drain_on_close:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.drain(), timeout_s)
        # Stop claiming; a consumer in the middle of a claim hands back what it got.
        self.stop_claiming()
        if self._reconciling is not None:
            self._reconciling.cancel()
            await asyncio.gather(self._reconciling, return_exceptions=True)
        await self._bounded(
            [c.task for c in self._consumers if c.task], left(grace), "claims did not return"
        )
        if self._tasks or self._workers:
            pending: set[asyncio.Future[Any]] = set()
            # (Again while a worker whose delivery suspended started others meanwhile.)
            while not pending and (running := [*self._tasks, *self._workers]):
                _done, pending = await asyncio.wait(running, timeout=left())
            # The workers' deliveries are stopped with them, and those still queued.
            stopped = sum(1 for fut in pending if fut in self._tasks) + (
                self._in_workers if pending else 0
            )
            for fut in pending:
                fut.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            while self._queue:
                consumer, key, _event = self._queue.popleft()
                self._ended_in_worker(consumer, key, cancelled=True)
            # (Those whose threads still run stay this process's: see _finished.)
            stopped -= len(self._outliving)
            if stopped > 0:
                logger.warning(
                    "%d running deliveries were stopped; they stay in the %s store for the "
                    "next worker",
                    stopped,
                    self.scheme,
                )
        if self._alone_task is not None:
            await asyncio.gather(self._alone_task, return_exceptions=True)
        # The flusher stores what is left of the buffer, the writer the outcomes.
        self._closing = True
        self._stop.set()
        self._flush_wake.set()
        self._writer_wake.set()
        tasks = [
            t
            for t in (self._flush_task, self._writer_task, self._renew_task, self._listening_task)
            if t
        ]
        await self._bounded(tasks, left(grace), "the store did not answer")
        self._lost(None)
        if self._outliving or self._outcomes:
            # Threads that cannot be stopped, nor waited for past the timeout, still run
            # deliveries: the store stays open for them in the background.
            self._seeing_out = loop.create_task(self._see_out())
            return list(self._unstored)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.disconnect(), left(grace))
        return list(self._unstored)

    async def wait_closed(self) -> None:
        """Wait, after :meth:`aclose`, until the store is let go: at once, unless it
        stopped deliveries whose sync listeners' threads still ran; then once those
        threads have returned and their outcomes are written (or the loop stops)."""
        if self._seeing_out is not None:
            await asyncio.wait([self._seeing_out])

    async def _see_out(self) -> None:
        """Once closed, hold the leases of the deliveries whose threads still run and
        write each one's outcome when its thread returns; then disconnect. If the loop
        stops first, their leases are left to expire (the process is exiting)."""
        try:
            while self._outliving or self._outcomes:
                self._writer_wake.clear()
                if self._outcomes:
                    outcomes, self._outcomes = self._outcomes, Outcomes()
                    self._writing = outcomes
                    try:
                        await self.settle(outcomes)
                    except Exception as exc:
                        logger.error(
                            "%s store: the outcomes of %d deliveries whose threads outlived "
                            "closing could not be written (%s); they will run again",
                            self.scheme,
                            len(outcomes.acks) + len(outcomes.retries) + len(outcomes.burials),
                            exc,
                        )
                    self._writing = None
                    continue
                try:
                    lost = await self.renew(list(self._outliving.values()), self.lease_s)
                except Exception as exc:
                    self._outage("renewing leases failed", exc)
                else:
                    # One whose outcome was written meanwhile is gone from the store.
                    held = {id(c) for c in self._outliving.values()}
                    self._lease_lost([c for c in lost or [] if id(c) in held])
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._writer_wake.wait(), self.lease_s / 3)
        except asyncio.CancelledError:
            if self._outliving:
                logger.warning(
                    "the event loop stopped while the threads of %d deliveries still ran: "
                    "their leases are left to expire (lease=%gs), and another worker "
                    "will run them again",
                    len(self._outliving),
                    self.lease_s,
                )
            raise
        finally:
            with contextlib.suppress(Exception):
                await self.disconnect()

    async def _bounded(
        self, tasks: list[asyncio.Task[None]], timeout: float | None, why: str
    ) -> None:
        """Wait for ``tasks`` for at most ``timeout`` seconds, then cancel them."""
        if not tasks:
            return
        _done, pending = await asyncio.wait(tasks, timeout=timeout)
        if pending:
            logger.warning(
                "%s store: stopped waiting after the shutdown timeout: %s", self.scheme, why
            )
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def stop_claiming(self) -> None:
        """Stop taking new deliveries (a worker on SIGTERM); running ones go on."""
        self._stopping = True
        self._progress.set()
        for c in self._consumers:
            c.wake.set()

    # -- inspecting ---------------------------------------------------------------

    def dead_letters(self) -> list[DeadLetter]:
        raise BackendError(
            f"the dead letters of a {self.scheme} store are read with "
            "'await bus.list_dead_letters()'"
        )

    def stats(self) -> dict[str, Any]:
        return {
            "buffered": len(self._buffer),
            "stored": self._stored_count,
            "running": len(self._inflight),
            "consumers": len(self._consumers),
        }
