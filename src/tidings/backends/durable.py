"""What every durable backend shares: the storage protocol a broker implements, and the
engine that drives it (buffered publishing, one consumer per listener, leases, batched
acks, graceful stop).

A broker only implements the storage methods of :class:`DurableBackend`; it never sees
a listener, a retry policy or a hook. The bus's runner decides what a failure means,
and the engine writes the outcome back (ack, retry later, dead letter) in batches.

Fan-out: each listener has its own delivery of every event whose name it subscribes to,
from the moment its listener was first started on the store (by any bus, producing or
consuming): a listener added later receives new events only.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import socket
import time
import traceback
import uuid
from abc import abstractmethod
from collections.abc import Sequence
from contextvars import Context
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec

from tidings._patterns import matches
from tidings.backends.base import Backend, DeadLetter
from tidings.codec import CODECS, decode_payload, encode_payload, revive_object, revive_value
from tidings.errors import (
    BackendError,
    ConfigurationError,
    DeliveryLost,
    PayloadError,
    PublishFailed,
    QueueFull,
)
from tidings.events import Event

if TYPE_CHECKING:
    from tidings.delivery import Runner
    from tidings.listeners import Subscription

__all__ = [
    "Claimed",
    "DurableBackend",
    "ListenerStats",
    "Outcomes",
    "Stored",
    "dead_letter",
    "dead_letter_row",
    "stored_row",
]

logger = logging.getLogger("tidings.backends.durable")

# Decoded payloads kept for the other listeners of an event, at most.
_DECODED = 4096


class Stored(msgspec.Struct, array_like=True):
    """One event as a broker stores it (a broker may store it as this msgpack array)."""

    id: str
    name: str
    data: bytes
    headers: dict[str, str]
    created: float
    due: float
    version: int = 1


class Claimed(msgspec.Struct):
    """One delivery a broker handed out under a lease."""

    listener: str
    attempt: int
    record: Stored
    #: The broker's own handle for the delivery (a row key, a stream entry id...).
    ref: Any = None
    error: str | None = None


@dataclass(slots=True)
class ListenerStats:
    """What waits for one listener in the store."""

    pending: int = 0
    in_flight: int = 0
    retrying: int = 0
    delayed: int = 0
    dead: int = 0
    oldest_age_s: float | None = None
    last_seen: float | None = None


@dataclass(slots=True)
class Outcomes:
    """Delivery outcomes waiting to be written back, in one batch."""

    acks: list[Claimed] = field(default_factory=list)
    retries: list[tuple[Claimed, float, str]] = field(default_factory=list)
    burials: list[tuple[Claimed, str, str]] = field(default_factory=list)
    releases: list[Claimed] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.acks or self.retries or self.burials or self.releases)


def _event(
    record: Stored, args: tuple[Any, ...], kwargs: dict[str, Any], obj: Any, attempt: int
) -> Event:
    """The event of ``record`` (its payload decoded), for delivery attempt ``attempt``."""
    return Event(
        record.name,
        args,
        kwargs,
        timestamp=record.created,
        headers=record.headers,
        _id=record.id,
        attempt=attempt,
        obj=obj,
    )


def dead_letter(
    record: Stored, listener: str, attempts: int, error: str, traceback: str, failed_at: float
) -> DeadLetter:
    """The dead letter of ``record``'s delivery to ``listener``, as a broker kept it."""
    event = _event(record, *decode_payload(record.data), attempts)
    return DeadLetter(
        event=event,
        listener=listener,
        error=error,
        traceback=traceback,
        attempts=attempts,
        failed_at=failed_at,
    )


_headers_dec = msgspec.json.Decoder(dict[str, str])


def stored_row(
    id_: str, name: str, data: bytes, headers: str | None, created: float, due: float
) -> Stored:
    """A stored event read back from an SQL row, whose headers are JSON text (or NULL)."""
    return Stored(id_, name, data, _headers_dec.decode(headers) if headers else {}, created, due)


def dead_letter_row(row: Sequence[Any]) -> DeadLetter:
    """A dead letter read back from an SQL row of ``listener, attempt, error, traceback,
    failed_at`` (of the delivery) and ``id, name, data, headers, created`` (of its event)."""
    listener, attempt, error, tb, failed_at, id_, name, data, headers, created = row
    record = stored_row(id_, name, data, headers, created, created)
    return dead_letter(record, listener, attempt, error or "", tb or "", failed_at or 0.0)


class _Consumer:
    __slots__ = ("idle_gen", "listener_id", "names", "running", "sub", "task", "wake")

    def __init__(self, sub: Subscription) -> None:
        self.sub = sub
        self.listener_id = sub.listener.qualname
        self.names = sub.listener.names
        self.running = 0
        self.wake = asyncio.Event()
        self.idle_gen = -1  # the drain generation at which a claim last came back empty
        self.task: asyncio.Task[None] | None = None


def _lost(event: Event, sub: Subscription, attempt: int) -> DeliveryLost:
    return DeliveryLost(
        f"event {event.id} ({event.name}) was started {attempt - 1} times for "
        f"{sub.listener.qualname} and never came to an end: its worker stopped, or lost "
        "the lease, while running it (does the listener crash or hang its process?)"
    )


class DurableBackend(Backend):
    """A backend whose deliveries live in a store that outlives the process.

    Args:
        consume: run this bus's listeners (``False``: a producer-only bus).
        concurrency: deliveries of one listener that may run at once in this process.
        lease_s: how long a claimed delivery is reserved for this process; renewed while
            it runs, and reclaimed by any worker once it expires (the process died).
        poll_s: how often an idle consumer looks for new deliveries.
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
    """

    durable: ClassVar[bool] = True
    serializes_at_put: ClassVar[bool] = True
    #: The scheme in URLs (``sqlite``), for messages.
    scheme: ClassVar[str] = "durable"

    def __init__(
        self,
        *,
        consume: bool = True,
        concurrency: int = 100,
        lease_s: float = 30.0,
        poll_s: float = 0.05,
        batch: int = 500,
        max_pending: int = 100_000,
        listeners: Sequence[str] | None = None,
        drain_on_close: bool = True,
        codec: str = "json",
        max_lost_runs: int = 5,
    ) -> None:
        if codec not in CODECS:
            raise ConfigurationError(f"codec must be one of {', '.join(CODECS)}, not {codec!r}")
        if max_lost_runs < 0:
            raise ConfigurationError(f"max_lost_runs must be 0 or more, not {max_lost_runs}")
        self.codec = codec
        self.consume = consume
        self.concurrency = concurrency
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.batch = batch
        self.max_pending = max_pending
        self.listener_patterns = tuple(listeners) if listeners else None
        self.drain_on_close = drain_on_close
        self.max_lost_runs = max_lost_runs
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._runner: Runner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._buffer: list[tuple[Stored, asyncio.Future[None] | None]] = []
        self._buffer_empty = asyncio.Event()
        self._closing = False
        self._stop = asyncio.Event()
        self._flush_task: asyncio.Task[None] | None = None
        self._flush_wake = asyncio.Event()
        self._stored_count = 0
        self._consumers: list[_Consumer] = []
        self._inflight: dict[tuple[str, Subscription], Claimed] = {}
        self._tasks: dict[asyncio.Future[Any], tuple[str, Subscription]] = {}
        self._outcomes = Outcomes()
        self._writer_task: asyncio.Task[None] | None = None
        self._writer_wake = asyncio.Event()
        self._writer_idle = asyncio.Event()
        self._renew_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._drain_gen = 0
        self._progress = asyncio.Event()
        self._outage_logged = False
        self._payloads: dict[str, tuple[tuple[Any, ...], dict[str, Any], Any]] = {}

    # -- the storage protocol, one implementation per broker ------------------------

    @abstractmethod
    async def connect(self) -> None:
        """Open connections and create what the store needs (idempotent)."""

    @abstractmethod
    async def disconnect(self) -> None:
        """Close connections."""

    @abstractmethod
    async def store(self, records: Sequence[Stored]) -> None:
        """Store events durably (one round trip for the batch where the broker can)."""

    @abstractmethod
    async def join(self, listener: str, names: Sequence[str]) -> None:
        """Make sure ``listener`` gets a delivery of every event stored from now on whose
        name matches one of ``names`` (a no-op if it already does)."""

    @abstractmethod
    async def claim(
        self, listener: str, names: Sequence[str], limit: int, lease_s: float
    ) -> list[Claimed]:
        """Lease up to ``limit`` due deliveries of ``listener`` to this process, oldest
        first, counting an attempt for each (reclaiming those whose lease expired)."""

    @abstractmethod
    async def settle(self, outcomes: Outcomes) -> None:
        """Write outcomes back in one round trip: acks delete deliveries, retries make
        them due again later, burials keep them as dead letters, releases hand them
        back untried (the attempt is not counted)."""

    @abstractmethod
    async def renew(self, claimed: Sequence[Claimed], lease_s: float) -> None:
        """Extend the leases of deliveries that are still running."""

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
        self._flush_task = self._loop.create_task(self._flusher())
        self._writer_task = self._loop.create_task(self._writer())
        subs = runner.registry.subscriptions() if runner.registry is not None else []
        for sub in subs:
            # Every bus joins its listeners, so events a producer stores before any
            # worker ever ran still reach them.
            await self.join(sub.listener.qualname, sub.listener.names)
        if self.consume:
            for sub in subs:
                if self.listener_patterns is not None and not any(
                    matches(p, sub.listener.qualname) for p in self.listener_patterns
                ):
                    continue
                consumer = _Consumer(sub)
                consumer.task = self._loop.create_task(self._consume(consumer))
                self._consumers.append(consumer)
            self._renew_task = self._loop.create_task(self._renewer())

    def _record(self, event: Event, due: float) -> Stored:
        return Stored(
            id=event.id,
            name=event.name,
            data=encode_payload(event, self.codec),
            headers=dict(event.headers),
            created=event.timestamp,
            due=due,
        )

    def has_room(self, count: int) -> bool:
        return len(self._buffer) + count <= self.max_pending

    def put(self, event: Event, subs: tuple[Subscription, ...], ctx: Context) -> None:
        if len(self._buffer) >= self.max_pending:
            raise QueueFull(
                f"{len(self._buffer)} events wait to be stored in {self.scheme} "
                f"(max_pending={self.max_pending}); cannot queue event {event.name!r}: "
                "await bus.publish(...) to wait for the store"
            )
        self._buffer.append((self._record(event, event.timestamp), None))
        self._buffer_empty.clear()
        self._flush_wake.set()

    async def put_wait(self, event: Event, subs: tuple[Subscription, ...], ctx: Context) -> None:
        while len(self._buffer) >= self.max_pending:
            self._buffer_empty.clear()
            await self._buffer_empty.wait()
        waiter = self._loop.create_future()  # type: ignore[union-attr]
        self._buffer.append((self._record(event, event.timestamp), waiter))
        self._buffer_empty.clear()
        self._flush_wake.set()
        await waiter

    def put_later(
        self, event: Event, subs: tuple[Subscription, ...], ctx: Context, delay_s: float
    ) -> None:
        self._buffer.append((self._record(event, time.time() + delay_s), None))
        self._buffer_empty.clear()
        self._flush_wake.set()

    async def _flusher(self) -> None:
        delay = 0.05
        while not (self._closing and not self._buffer):
            if not self._buffer:
                self._buffer_empty.set()
                await self._flush_wake.wait()
            self._flush_wake.clear()
            while self._buffer:
                batch = self._buffer[: self.batch]
                try:
                    await self.store([record for record, _ in batch])
                except Exception as exc:
                    self._outage(f"storing {len(batch)} event(s) failed", exc)
                    # A publisher hears of it (and may retry); emitted events wait here.
                    kept: list[tuple[Stored, asyncio.Future[None] | None]] = []
                    for record, waiter in self._buffer:
                        if waiter is None:
                            kept.append((record, waiter))
                        elif not waiter.done():
                            waiter.set_exception(
                                PublishFailed(f"event {record.id} was not stored: {exc}")
                            )
                    self._buffer = kept
                    if self._closing:
                        self._lost(exc)
                        return
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                delay = 0.05
                self._recovered()
                del self._buffer[: len(batch)]
                self._stored_count += len(batch)
                for _, waiter in batch:
                    if waiter is not None and not waiter.done():
                        waiter.set_result(None)
                for consumer in self._consumers:
                    consumer.wake.set()
        self._buffer_empty.set()

    def _lost(self, exc: BaseException) -> None:
        if self._buffer:
            logger.error(
                "%d emitted event(s) could not be stored before closing: %s (%s)",
                len(self._buffer),
                ", ".join(record.id for record, _ in self._buffer),
                exc,
            )
            self._buffer.clear()

    # -- Backend: consuming --------------------------------------------------------

    async def _consume(self, consumer: _Consumer) -> None:
        limit = consumer.sub.listener.concurrency or self.concurrency
        delay = self.poll_s
        while not self._stopping:
            room = limit - consumer.running
            if room <= 0:
                consumer.wake.clear()
                await consumer.wake.wait()
                continue
            gen = self._drain_gen
            consumer.wake.clear()
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
            delay = self.poll_s
            self._recovered()
            if self._stopping:
                self._outcomes.releases.extend(claimed)
                self._writer_wake.set()
                break
            if not claimed:
                consumer.idle_gen = gen
                self._progress.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(consumer.wake.wait(), self.poll_s)
                continue
            self._start_deliveries(consumer, claimed)

    def _start_deliveries(self, consumer: _Consumer, batch: list[Claimed]) -> None:
        """Start a batch of deliveries; those that finish at once are acknowledged here."""
        sub = consumer.sub
        runner = self._runner
        assert runner is not None
        run = runner.run
        decode = self._decode
        inflight = self._inflight
        outcomes = self._outcomes  # not swapped by the writer before this returns
        new_context = contextvars.Context
        # Starts past this many: the runs past the retry policy's were all lost.
        most = (sub.listener.retry or runner.retry).attempts + self.max_lost_runs
        for claimed in batch:
            try:
                event = decode(claimed, sub)
            except PayloadError as exc:
                outcomes.burials.append((claimed, f"PayloadError: {exc}", ""))
                continue
            key = (claimed.record.id, sub)
            inflight[key] = claimed
            if claimed.attempt > most:
                # Recorded as the delivery's last failure: logged, hooks, dead letter.
                runner.failed(event, sub, new_context(), _lost(event, sub, claimed.attempt))
                continue
            consumer.running += 1
            fut = run(event, sub, new_context())
            if fut is None:
                consumer.running -= 1
                done = inflight.pop(key, None)
                if done is not None:  # neither retried nor buried by the runner
                    outcomes.acks.append(done)
            else:
                self._tasks[fut] = key
                fut.add_done_callback(
                    lambda f: self._finished(consumer, self._tasks.pop(f), cancelled=f.cancelled())
                )
        if outcomes:
            self._writer_wake.set()

    def _finished(
        self, consumer: _Consumer, key: tuple[str, Subscription], *, cancelled: bool
    ) -> None:
        consumer.running -= 1
        claimed = self._inflight.pop(key, None)
        if claimed is not None:
            # Neither retried nor buried by the runner: it returned, or was cancelled.
            (self._outcomes.releases if cancelled else self._outcomes.acks).append(claimed)
            self._writer_wake.set()
        consumer.wake.set()

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
        revivable = sub.listener.plan.revivable
        if revivable:
            kwargs = dict(kwargs)  # its own values; the shared payload stays as stored
            for name, annotation in revivable:
                if name in kwargs:
                    kwargs[name] = revive_value(kwargs[name], annotation)
        return _event(record, args, kwargs, obj, claimed.attempt)

    def retry(self, event: Event, sub: Subscription, ctx: Context, delay_s: float) -> None:
        claimed = self._inflight.pop((event.id, sub), None)
        if claimed is not None:
            self._outcomes.retries.append((claimed, delay_s, ""))
            self._writer_wake.set()

    def dead(self, event: Event, sub: Subscription, exc: BaseException) -> None:
        claimed = self._inflight.pop((event.id, sub), None)
        if claimed is not None:
            error = f"{type(exc).__qualname__}: {exc}"
            tb = "".join(traceback.format_exception(exc))
            self._outcomes.burials.append((claimed, error, tb))
            self._writer_wake.set()

    async def _writer(self) -> None:
        while not (self._closing and not self._outcomes):
            if not self._outcomes:
                self._writer_idle.set()
                await self._writer_wake.wait()
                self._writer_wake.clear()
                continue
            self._writer_wake.clear()
            self._writer_idle.clear()
            outcomes, self._outcomes = self._outcomes, Outcomes()
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
            self._progress.set()

    async def _renewer(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.lease_s / 3)
            if self._closing:
                return
            running = list(self._inflight.values())
            if running:
                try:
                    await self.renew(running, self.lease_s)
                except Exception as exc:
                    self._outage("renewing leases failed", exc)

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
        ids = {c.listener_id for c in self._consumers}
        while True:
            self._drain_gen += 1
            gen = self._drain_gen
            for c in self._consumers:
                c.wake.set()
            while not (
                all(c.idle_gen >= gen for c in self._consumers)
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
        loop = self._loop
        if loop is None:
            return []
        deadline = None if timeout_s is None else loop.time() + timeout_s

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - loop.time())

        if self.drain_on_close:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.drain(), timeout_s)
        # Stop claiming; a consumer in the middle of a claim hands back what it got.
        self.stop_claiming()
        await asyncio.gather(*(c.task for c in self._consumers if c.task), return_exceptions=True)
        if self._tasks:
            _done, pending = await asyncio.wait(list(self._tasks), timeout=left())
            for fut in pending:
                fut.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
                logger.warning(
                    "%d running deliveries were stopped; they stay in the %s store for the "
                    "next worker",
                    len(pending),
                    self.scheme,
                )
        # The flusher stores what is left of the buffer, the writer the outcomes.
        self._closing = True
        self._stop.set()
        self._flush_wake.set()
        self._writer_wake.set()
        tasks = [t for t in (self._flush_task, self._writer_task, self._renew_task) if t]
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.disconnect()
        # Nothing is lost: what did not run stays stored for the next consumer.
        return []

    def stop_claiming(self) -> None:
        """Stop taking new deliveries (a worker on SIGTERM); running ones go on."""
        self._stopping = True
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
