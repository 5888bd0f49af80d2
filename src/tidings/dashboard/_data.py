"""What the dashboard's pages show, read from a bus and its store as plain JSON values."""

from __future__ import annotations

import asyncio
import time
import traceback
from collections import deque
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from tidings.backends.base import DeadLetter
from tidings.delivery import error_text
from tidings.errors import ConfigurationError

if TYPE_CHECKING:
    from tidings.bus import Bus
    from tidings.events import Event
    from tidings.listeners import Listener

__all__ = ["DeadFilter", "Sampler", "Snapshot", "on_bus_loop"]

T = TypeVar("T")

# Dead letters read from the store to search, at most.
MAX_DEAD_SCANNED = 100_000
# Samples of the delivery counters kept for the charts: one a second, five minutes.
_SAMPLES = 300
_SAMPLE_EVERY_S = 1.0
# Failures seen in this process kept for the listener pages.
_FAILURES = 200


async def on_bus_loop(bus: Bus, work: Coroutine[Any, Any, T]) -> T:
    """Await ``work`` on the bus's event loop, whichever loop serves the dashboard (a
    bus run by ``with Bus(...)`` has a loop of its own, in a thread)."""
    loop = bus.loop
    if loop is None or loop is asyncio.get_running_loop():
        return await work
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(work, loop))


def _json(value: Any) -> Any:
    """``value`` as JSON values (what msgspec cannot encode, as its ``repr``)."""
    try:
        return msgspec.json.decode(msgspec.json.encode(value))
    except (TypeError, msgspec.EncodeError):
        return repr(value)


def letter_json(letter: DeadLetter, *, full: bool = True) -> dict[str, Any]:
    """One dead letter for the pages; ``full`` adds its payload, headers and traceback."""
    event = letter.event
    out: dict[str, Any] = {
        "event_id": event.id,
        "name": event.name,
        "listener": letter.listener,
        "attempts": letter.attempts,
        "error": letter.error,
        "failed_at": letter.failed_at,
        "emitted_at": event.timestamp,
    }
    if full:
        out["payload"] = {
            "args": _json(list(event.args)),
            "kwargs": _json(event.kwargs),
            "obj": _json(event.obj) if event.obj is not None else None,
        }
        out["headers"] = dict(event.headers)
        out["traceback"] = letter.traceback
    return out


@dataclass(frozen=True, slots=True)
class DeadFilter:
    """Which dead letters a search matches: every given field must match.

    ``event_id`` matches a prefix, ``name`` and ``error`` a case-insensitive substring,
    ``listener`` the qualified name exactly, ``since`` / ``until`` the time of the
    failure (seconds since the epoch, inclusive).
    """

    event_id: str = ""
    name: str = ""
    listener: str = ""
    error: str = ""
    since: float | None = None
    until: float | None = None

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> DeadFilter:
        """A filter from a query string's or a JSON body's fields (blank ones ignored).

        Raises:
            ConfigurationError: a time that is not a number.
        """

        def text(key: str) -> str:
            value = values.get(key)
            return str(value).strip() if value is not None else ""

        def when(key: str) -> float | None:
            raw = text(key)
            if not raw:
                return None
            try:
                return float(raw)
            except ValueError:
                raise ConfigurationError(
                    f"{key} must be seconds since the epoch, not {raw!r}"
                ) from None

        return cls(
            event_id=text("event_id"),
            name=text("name"),
            listener=text("listener"),
            error=text("error"),
            since=when("since"),
            until=when("until"),
        )

    def __call__(self, letter: DeadLetter) -> bool:
        """Whether ``letter`` matches."""
        if self.event_id and not letter.event.id.startswith(self.event_id):
            return False
        if self.name and self.name.lower() not in letter.event.name.lower():
            return False
        if self.listener and letter.listener != self.listener:
            return False
        if self.error and self.error.lower() not in letter.error.lower():
            return False
        if self.since is not None and letter.failed_at < self.since:
            return False
        return self.until is None or letter.failed_at <= self.until


async def search_dead(bus: Bus, where: DeadFilter) -> list[DeadLetter]:
    """The dead letters ``where`` matches, newest first."""
    letters = await on_bus_loop(
        bus, bus.list_dead_letters(listener=where.listener or None, limit=MAX_DEAD_SCANNED)
    )
    found = [letter for letter in letters if where(letter)]
    found.reverse()
    return found


def by_listener(pairs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """``(event id, listener)`` pairs grouped as listener -> event ids."""
    out: dict[str, list[str]] = {}
    for event_id, listener in pairs:
        ids = out.setdefault(listener, [])
        if event_id not in ids:
            ids.append(event_id)
    return out


class Sampler:
    """The listeners' figures, sampled at most once a second for the charts, and the
    failures this process saw (when it was set up before the bus started)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.samples: deque[tuple[float, dict[str, tuple[int, int, int, int]]]] = deque(
            maxlen=_SAMPLES
        )
        self.failures: deque[dict[str, Any]] = deque(maxlen=_FAILURES)
        self.sees_failures = False
        if not bus.started:
            bus.on_error = (*bus.on_error, self._on_error)
            self.sees_failures = True

    def _on_error(self, event: Event, listener: Listener[..., Any], exc: BaseException) -> None:
        self.failures.appendleft(
            {
                "event_id": event.id,
                "name": event.name,
                "listener": listener.qualname,
                "attempt": event.attempt,
                "error": error_text(exc),
                "traceback": "".join(traceback.format_exception(exc)),
                "failed_at": time.time(),
            }
        )

    def sample(self, snapshots: Iterable[Snapshot], now: float | None = None) -> None:
        """Take a sample of the listeners' figures (delivered, failed, pending, dead) as of
        ``now`` (default: now), unless the last is less than a second older."""
        now = time.time() if now is None else now
        if self.samples and now - self.samples[-1][0] < _SAMPLE_EVERY_S:
            return
        self.samples.append(
            (now, {s.name: (s.delivered, s.failed, s.pending, s.dead) for s in snapshots})
        )

    def rates(self, listener: str) -> list[list[float]]:
        """``[time, deliveries/s, failures/s, pending, dead letters added/s]`` between
        consecutive samples, all read from the store (deliveries and failures as the
        store counts them, whichever worker ran them; in process, those of the bus)."""
        out: list[list[float]] = []
        previous: tuple[float, dict[str, tuple[int, int, int, int]]] | None = None
        for sample in self.samples:
            if previous is not None:
                span = sample[0] - previous[0]
                before = previous[1].get(listener, (0, 0, 0, 0))
                after = sample[1].get(listener, (0, 0, 0, 0))
                out.append(
                    [
                        sample[0],
                        max(after[0] - before[0], 0) / span,
                        max(after[1] - before[1], 0) / span,
                        after[2],
                        max(after[3] - before[3], 0) / span,
                    ]
                )
            previous = sample
        return out


@dataclass(slots=True)
class Snapshot:
    """The overview's figures of one listener."""

    name: str
    events: list[str]
    pending: int = 0
    in_flight: int = 0
    retrying: int = 0
    delayed: int = 0
    dead: int = 0
    oldest_age_s: float | None = None
    last_seen: float | None = None
    delivered: int = 0
    failed: int = 0
    #: Whether ``delivered`` and ``failed`` count every worker's attempts: the store's
    #: counts, or those of the bus when it is the only one to run the listener.
    counted: bool = False

    def json(self) -> dict[str, Any]:
        """The snapshot as JSON values."""
        return {
            "name": self.name,
            "events": self.events,
            "pending": self.pending,
            "in_flight": self.in_flight,
            "retrying": self.retrying,
            "delayed": self.delayed,
            "dead": self.dead,
            "oldest_age_s": self.oldest_age_s,
            "last_seen": self.last_seen,
            "delivered": self.delivered,
            "failed": self.failed,
            "counted": self.counted,
        }


async def overview(bus: Bus, sampler: Sampler) -> list[Snapshot]:
    """Every listener (of this bus, and any other the store knows) with its figures:
    delivered and failed as the store counts them, or as this process does where it
    does not."""
    snapshots: dict[str, Snapshot] = {}
    alone = not bus.backend.durable
    for sub in bus.registry.subscriptions():
        name = sub.listener.qualname
        snap = snapshots.get(name)
        if snap is None:
            snap = snapshots[name] = Snapshot(name, list(sub.listener.names), counted=alone)
        snap.delivered += sub.delivered
        snap.failed += sub.failed
    for name, s in (await on_bus_loop(bus, bus.listener_stats())).items():
        snap = snapshots.get(name)
        if snap is None:
            snap = snapshots[name] = Snapshot(name, [])
        snap.pending = s.pending
        snap.in_flight = s.in_flight
        snap.retrying = s.retrying
        snap.delayed = s.delayed
        snap.dead = s.dead
        snap.oldest_age_s = s.oldest_age_s
        snap.last_seen = getattr(s, "last_seen", None)
        if s.delivered is not None and s.failed is not None:
            snap.delivered, snap.failed = s.delivered, s.failed
            snap.counted = True
    sampler.sample(snapshots.values())
    return sorted(snapshots.values(), key=lambda s: s.name)


def schedules(bus: Bus) -> list[dict[str, Any]]:
    """The bus's cron schedules, with their last and next ticks."""
    now = time.time()
    out = []
    for entry in bus.scheduler.entries:
        last = entry.last_before(now)
        out.append(
            {
                "cron": entry.cron,
                "event": entry.name,
                "payload": {"args": _json(list(entry.args)), "kwargs": _json(entry.kwargs)},
                "next": entry.next_after(now),
                "last": last,
            }
        )
    return out


async def delayed(bus: Bus, within_s: float) -> dict[str, Any]:
    """Deliveries waiting for a later time, per listener; and the events due within
    ``within_s`` seconds one by one, where the store lists them (an optional
    ``list_delayed(within_s, limit)`` of SQLite, Redis and PostgreSQL; ``None`` else)."""
    per_listener = {
        name: {"delayed": s.delayed, "retrying": s.retrying}
        for name, s in sorted((await on_bus_loop(bus, bus.listener_stats())).items())
    }
    listing = getattr(bus.backend, "list_delayed", None)
    events: list[dict[str, Any]] | None = None
    if listing is not None:
        events = [_json(item) for item in await on_bus_loop(bus, listing(within_s, 100))]
    elif not bus.backend.durable:
        counters = bus.backend.stats()
        per_listener = {
            "(this process)": {
                "delayed": int(counters.get("scheduled", 0)),
                "retrying": int(counters.get("retrying", 0)),
            }
        }
    return {"listeners": per_listener, "events": events, "within_s": within_s}
