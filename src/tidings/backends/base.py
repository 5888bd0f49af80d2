"""The backend protocol: where deliveries wait and run.

The bus owns routing, retry policy, serialization and hooks. A backend is handed ready
deliveries (:class:`~tidings.delivery.Delivery`, the policy travels with them) and runs
them: now, later, in a pool, after a response... A custom backend implements one
method, :meth:`Backend.deliver`; the rest have defaults (retries on a timer, dead
letters kept in process, a drain that waits for every delivery handed out)::

    class Now(Backend):
        def deliver(self, delivery: Delivery) -> None:
            delivery.start()

The in-process and durable backends override the richer hooks below (``put``,
``put_named``, ``put_later``...) to queue without a delivery object per listener.
Dead letters are one protocol, :class:`DeadLetters`, that every backend implements
(in process by default, over its store for a durable one).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable, Sequence
from contextvars import Context, copy_context
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from tidings.delivery import DeadLetter, Delivery
from tidings.errors import ConfigurationError, NotStartedError
from tidings.events import Event, QueuedEvent

if TYPE_CHECKING:
    from tidings._hold import Held
    from tidings.delivery import Runner
    from tidings.listeners import Subscription
    from tidings.outbox import Outbox

__all__ = [
    "Backend",
    "DeadLetter",
    "DeadLetters",
    "Inlet",
    "ListenerStats",
]


@dataclass(slots=True)
class ListenerStats:
    """What waits for one listener in the store, and when a process last claimed for it
    (``last_seen``, epoch seconds; ``None``: never, or a store that does not say). A
    store writes ``last_seen`` down at most once a minute (SQLite, PostgreSQL) or a
    second (Redis), so it trails the last claim by up to that much.

    ``delivered`` and ``failed`` are the attempts that returned and that raised (or
    timed out), counted by the store since the listener joined, whichever worker ran
    them (in process: by this bus); ``None`` where a backend does not count them.

    ``pending`` counts the deliveries due and waiting (not delayed, not retrying, not
    running: one whose lease expired waits again); ``oldest_age_s`` is how long the
    oldest of them has waited since it came due, ``None`` when none waits.
    """

    pending: int = 0
    in_flight: int = 0
    retrying: int = 0
    delayed: int = 0
    dead: int = 0
    oldest_age_s: float | None = None
    last_seen: float | None = None
    delivered: int | None = None
    failed: int | None = None


class DeadLetters(Protocol):
    """Dead letters, wherever a backend keeps them: listed, replayed, purged, counted.

    ``ids`` are event ids and ``listener`` a listener's qualified name; ``None`` means
    any.
    """

    async def list_dead(self, listener: str | None, limit: int) -> list[DeadLetter]:
        """Dead letters, oldest first."""
        ...

    async def replay_dead(self, ids: Sequence[str] | None, listener: str | None) -> int:
        """Deliver dead letters again with fresh attempts; how many."""
        ...

    async def purge_dead(self, ids: Sequence[str] | None, listener: str | None) -> int:
        """Forget dead letters; how many."""
        ...

    async def listener_stats(self) -> dict[str, ListenerStats]:
        """What waits (and lies dead) per listener."""
        ...


class Inlet(Protocol):
    """A queue the bus's ``emit`` appends plain named events to itself, without a call
    into the backend: the in-process fast path (``bench/inproc.py``)."""

    #: The queued events.
    queue: deque[QueuedEvent]
    #: How many may wait: past it, the bus calls ``put_named`` (which raises ``QueueFull``).
    room: int
    #: Zero while nothing takes from the queue: the bus then calls :meth:`activate`.
    pumping: int

    def activate(self) -> None:
        """Start taking from the queue."""
        ...


class _DeliveryGate:
    """One listener's concurrency limit over :meth:`Backend.deliver`: its deliveries
    handed out, and those waiting for one of them to end."""

    __slots__ = ("backlog", "limit", "running", "scheduled")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running: set[Delivery] = set()
        self.backlog: deque[Delivery] = deque()
        self.scheduled = False


class Backend(ABC):
    """Where deliveries wait and run: implement :meth:`deliver`, the rest is optional.

    A subclass with an ``__init__`` of its own calls ``super().__init__()``.

    Args:
        max_dead_letters: how many recent dead letters are kept in process.
    """

    #: Whether deliveries survive the process (and payloads must serialize).
    durable: ClassVar[bool] = False
    #: Whether ``put``, ``put_later`` and ``put_wait`` serialize the payload at once,
    #: raising ``PayloadError``: the bus then skips its own check on the loop's thread.
    serializes_at_put: ClassVar[bool] = False
    #: The format payloads are stored in (``"json"`` or ``"msgpack"``).
    codec: str = "json"
    #: Whether this process runs the listeners (``False``: a producer-only bus).
    consume: bool = True
    #: Publishing inside the caller's database transaction, where the backend can
    #: (``bus.options(connection=...).publish(...)``); ``None`` where it cannot.
    outbox: Outbox | None = None
    #: A queue ``emit`` may append plain named events to directly (see :class:`Inlet`);
    #: ``None``: it calls :meth:`put_named`.
    inlet: Inlet | None = None

    def __init__(self, *, max_dead_letters: int = 1000) -> None:
        #: The bus's runner, once started.
        self.runner: Runner | None = None
        # Deliveries handed out (or waiting for a retry, or behind their listener's
        # concurrency limit) that have not ended.
        self._handed: dict[Delivery, None] = {}
        # Delayed events and retries on a timer: the event each will deliver.
        self._delivery_timers: dict[asyncio.TimerHandle, Event] = {}
        # Listeners' concurrency limits, kept over deliver().
        self._delivery_gates: dict[Subscription, _DeliveryGate] = {}
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._dead: deque[DeadLetter] = deque(maxlen=max_dead_letters)

    @abstractmethod
    def deliver(self, delivery: Delivery) -> None:
        """Run ``delivery``: at once (``delivery.start()``, on the loop's thread), later
        (``await delivery()``), or wherever the backend runs work. Called on the bus's
        loop, once per listener of each event (and again for each retry).

        Until it has run, the delivery counts as pending: ``bus.drain()`` waits for it,
        and closing the bus reports it as undelivered (and cancels it: it never runs
        after). A listener's ``concurrency`` holds here too: past it, a delivery is
        handed over only once one of the listener's deliveries has ended. If this
        raises, the delivery is dropped: ``emit`` raises it, and a retry or a delayed
        event coming due is kept as a dead letter instead.
        """

    # -- optional: what the bus calls, with defaults over deliver() ----------------

    async def start(self, runner: Runner) -> None:
        """Begin handing deliveries to ``runner`` (on its loop).

        Raises:
            ConfigurationError: the subclass's ``__init__`` never called
                ``super().__init__()``.
        """
        if not hasattr(self, "_handed"):
            raise ConfigurationError(
                f"{type(self).__qualname__}.__init__() must call super().__init__() "
                "(Backend keeps the deliveries handed out)"
            )
        self.runner = runner

    def put(self, event: Event, subs: tuple[Subscription, ...], ctx: Context) -> None:
        """Queue one delivery of ``event`` per subscription, without waiting; ``ctx`` is
        the emitter's context.

        Raises:
            QueueFull: there is no room now.
        """
        for sub in subs:
            self._hand(self.delivery(event, sub, ctx))

    def put_later(
        self, event: Event, subs: tuple[Subscription, ...], ctx: Context, delay_s: float
    ) -> None:
        """Queue the deliveries once ``delay_s`` seconds have passed (until then they
        are not pending: ``drain()`` does not wait for them)."""
        if self.runner is None:
            raise NotStartedError(f"cannot deliver event {event.name!r}: not started")
        for sub in subs:
            self._later(delay_s, event, sub, ctx, None)

    async def put_wait(
        self,
        event: Event,
        subs: tuple[Subscription, ...],
        ctx: Context,
        delay_s: float | None = None,
    ) -> None:
        """Queue like :meth:`put`, waiting for room (or for storage) instead of raising;
        with ``delay_s``, like :meth:`put_later` (a durable backend returns once stored)."""
        if self.runner is None:
            raise NotStartedError(f"cannot queue event {event.name!r}: the bus is closed")
        if delay_s is None:
            self.put(event, subs, ctx)
        else:
            self.put_later(event, subs, ctx, delay_s)

    def put_named(
        self,
        subs: tuple[Subscription, ...],
        ctx: Context,
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        """Queue a plain named event, like :meth:`put`: the bus's fast path, taken while
        nothing needs to see each event (no hooks, no strict or serialization checks).
        A backend may queue it without building the envelope until something reads it.

        Raises:
            QueueFull: there is no room now.
        """
        self.put(Event(name, args, kwargs), subs, ctx)

    def put_held(self, items: list[Held]) -> None:
        """Queue events that were emitted earlier and held until now (see
        :mod:`tidings.asgi`), like :meth:`put`.

        Raises:
            QueueFull: there is no room for all of them (those that fit are queued).
        """
        for item in items:
            self.put(item.envelope(), item.subs, item.context)

    def retry(self, event: Event, sub: Subscription, ctx: Context, delay_s: float) -> None:
        """Run one delivery again (``event.attempt`` is the next attempt) after a delay;
        pending meanwhile."""
        self._later(delay_s, event, sub, ctx, self.delivery(event, sub, ctx))

    def dead(self, event: Event, sub: Subscription, exc: BaseException) -> None:
        """Keep a delivery that failed its last attempt as a dead letter."""
        self._dead.append(DeadLetter.of(event, sub.listener.qualname, exc, time.time()))

    def has_room(self, count: int) -> bool:
        """Whether ``count`` more events fit now (may be read from any thread)."""
        return True

    async def drain(self) -> None:
        """Wait until every delivery handed out (or waiting to be) has ended."""
        while self._handed and self.runner is not None:
            waiter = self.runner.loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter

    async def aclose(self, timeout_s: float | None) -> list[str]:
        """Drain for at most ``timeout_s`` seconds, running the delayed events that come
        due meanwhile, stop, and return undelivered event ids (those due later at once)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drain_due(timeout_s), timeout_s)
        for handle in self._delivery_timers:
            handle.cancel()
        undelivered = [event.id for event in self._delivery_timers.values()]
        self._delivery_timers.clear()
        undelivered += [d.event.id for d in self._handed]
        self._delivery_gates.clear()
        for delivery in list(self._handed):
            delivery.cancel()
        self._handed.clear()
        self.runner = None
        return list(dict.fromkeys(undelivered))

    async def _drain_due(self, timeout_s: float | None) -> None:
        """Drain, and run the delayed events that come due within ``timeout_s`` seconds
        (those due later are not waited for)."""
        loop = asyncio.get_running_loop()
        deadline = math.inf if timeout_s is None else loop.time() + timeout_s
        while True:
            await self.drain()
            due = [h.when() for h in self._timers_waiting() if h.when() <= deadline]
            if not due:
                return
            # Timers fire on the loop: sleep until the next one has, then drain again.
            await asyncio.sleep(max(min(due) - loop.time(), 0.0))

    def _timers_waiting(self) -> Iterable[asyncio.TimerHandle]:
        """The timers of delayed events and retries not yet due (see ``_drain_due``)."""
        return self._delivery_timers

    def stats(self) -> dict[str, Any]:
        """Counters of what waits and runs."""
        return {"pending": len(self._handed), "dead": len(self._dead)}

    async def claim_tick(self, schedule: str, tick: float) -> bool:
        """Whether this process fires ``schedule``'s ``tick`` (once across processes)."""
        return True

    async def forget(self, listener: str) -> bool:
        """Remove a listener from the store: its deliveries and what it keeps stored;
        whether it was there.

        Raises:
            ConfigurationError: the backend keeps no listeners (not durable).
            BackendError: the store failed, or cannot forget listeners.
        """
        raise ConfigurationError(f"{type(self).__name__} keeps no listeners to forget")

    # -- dead letters (DeadLetters), kept in process --------------------------------

    def dead_letters(self) -> list[DeadLetter]:
        """The dead letters kept in this process, oldest first."""
        return list(self._dead)

    async def list_dead(self, listener: str | None, limit: int) -> list[DeadLetter]:
        """Dead letters, oldest first."""
        return [d for d in self.dead_letters() if listener is None or d.listener == listener][
            :limit
        ]

    async def replay_dead(self, ids: Sequence[str] | None, listener: str | None) -> int:
        """Deliver dead letters again with fresh attempts; how many (a letter of a
        listener this bus no longer has stays dead)."""
        runner = self.runner
        if runner is None or runner.registry is None:
            return 0
        subs = {sub.listener.qualname: sub for sub in runner.registry.subscriptions()}
        letters = [d for d in self.take_dead(ids, listener) if d.listener in subs]
        for index, letter in enumerate(letters):
            try:
                # Waits for room: a full queue never loses the letters taken.
                await self.put_wait(
                    letter.event.for_attempt(1), (subs[letter.listener],), copy_context()
                )
            except BaseException:
                # Those not queued stay dead letters.
                self._dead = deque(
                    sorted([*letters[index:], *self._dead], key=lambda d: d.failed_at),
                    maxlen=self._dead.maxlen,
                )
                raise
        return len(letters)

    async def purge_dead(self, ids: Sequence[str] | None, listener: str | None) -> int:
        """Forget dead letters; how many."""
        return len(self.take_dead(ids, listener))

    async def listener_stats(self) -> dict[str, ListenerStats]:
        """The dead letters kept per listener of the bus."""
        runner = self.runner
        if runner is None or runner.registry is None:
            return {}
        dead = self.dead_letters()
        out: dict[str, ListenerStats] = {}
        for sub in runner.registry.subscriptions():
            name = sub.listener.qualname
            s = out.get(name)
            if s is None:
                s = out[name] = ListenerStats(
                    dead=sum(1 for d in dead if d.listener == name), delivered=0, failed=0
                )
            s.delivered = (s.delivered or 0) + sub.delivered
            s.failed = (s.failed or 0) + sub.failed
        return out

    def take_dead(self, ids: Sequence[str] | None, listener: str | None) -> list[DeadLetter]:
        """Remove and return the kept dead letters of these event ids and/or listener."""
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

    # -- deliveries handed out -------------------------------------------------------

    def delivery(self, event: Event, sub: Subscription, ctx: Context) -> Delivery:
        """A delivery of ``event`` to ``sub``, pending until it ends.

        Raises:
            NotStartedError: the backend is not started.
        """
        if self.runner is None:
            raise NotStartedError(f"cannot deliver event {event.name!r}: not started")
        made = Delivery(event, sub, ctx, self.runner, self._ended)
        self._handed[made] = None
        return made

    def _hand(self, delivery: Delivery) -> None:
        """Hand ``delivery`` to :meth:`deliver`, within its listener's concurrency limit
        (past it, the delivery waits, pending, for one of the listener's to end).

        Raises:
            Exception: what ``deliver`` raised; the delivery is then no longer pending.
        """
        limit = delivery.subscription.listener.concurrency
        if limit is not None:
            gate = self._delivery_gates.get(delivery.subscription)
            if gate is None:
                gate = self._delivery_gates[delivery.subscription] = _DeliveryGate(limit)
            if len(gate.running) >= gate.limit or gate.backlog:
                gate.backlog.append(delivery)  # keeps the listener's order
                return
            gate.running.add(delivery)
        self._give(delivery)

    def _give(self, delivery: Delivery) -> None:
        try:
            self.deliver(delivery)
        except BaseException:
            if not delivery.started:
                # Never to run: else it stays pending for ever (drain() waiting for it).
                delivery.cancel()
            raise

    def _give_or_keep(self, delivery: Delivery, *, gated: bool) -> None:
        """Hand ``delivery`` where no caller can be told that ``deliver`` raised (a
        timer, a listener's backlog): the delivery is then kept as a dead letter."""
        try:
            if gated:
                self._give(delivery)
            else:
                self._hand(delivery)
        except Exception as error:
            if self.runner is not None:
                self.runner.deliver_failed(delivery.event, delivery.subscription, error)

    def _later(
        self,
        delay_s: float,
        event: Event,
        sub: Subscription,
        ctx: Context,
        delivery: Delivery | None,
    ) -> None:
        """Hand ``delivery`` (or, for a delayed event, one made then) after ``delay_s``."""
        assert self.runner is not None
        handle: asyncio.TimerHandle

        def fire() -> None:
            self._delivery_timers.pop(handle, None)
            self._give_or_keep(delivery or self.delivery(event, sub, ctx), gated=False)

        handle = self.runner.loop.call_later(delay_s, fire)
        self._delivery_timers[handle] = event

    def _pump_delivery_gate(self, gate: _DeliveryGate) -> None:
        gate.scheduled = False
        while gate.backlog and len(gate.running) < gate.limit:
            delivery = gate.backlog.popleft()
            if delivery in self._handed:  # not cancelled meanwhile
                gate.running.add(delivery)
                self._give_or_keep(delivery, gated=True)

    def _ended(self, delivery: Delivery) -> None:
        self._handed.pop(delivery, None)
        if delivery.subscription.listener.concurrency is not None:
            gate = self._delivery_gates.get(delivery.subscription)
            if gate is not None and delivery in gate.running:
                gate.running.discard(delivery)
                if gate.backlog and not gate.scheduled and self.runner is not None:
                    # On the next turn: a delivery that ends within deliver() never
                    # hands the next one from inside it.
                    gate.scheduled = True
                    self.runner.loop.call_soon(self._pump_delivery_gate, gate)
        if not self._handed and self._drain_waiters:
            waiters, self._drain_waiters = self._drain_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
