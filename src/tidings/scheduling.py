"""Cron schedules: an event emitted at every tick of a cron expression, the
:class:`Scheduler` that fires a bus's schedules, and :class:`Schedules`, the bus's
methods that make them.

Every consuming bus runs the schedules it knows, and the backend lets one of them fire
each tick (the memory backend: this process; a durable store: the first to claim the
tick), so several workers never emit a tick twice.

Needs ``pip install 'tidings[cron]'`` (croniter). Expressions have five fields
(minute, hour, day of month, month, day of week), or six with seconds last: ``* * * * *
*/10`` is every 10 seconds (``*/10 * * * * *`` is every second of every tenth minute).
An expression that never fires (``0 0 30 2 *``, February 30th) is refused when the
schedule is made.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from tidings.errors import ConfigurationError, EmitError
from tidings.events import check_event_name

if TYPE_CHECKING:
    from tidings._running import Running
    from tidings.backends.base import Backend
    from tidings.listeners import Listener, Registry
    from tidings.options import EmitOptions

__all__ = ["Schedule", "Scheduler", "Schedules", "croniter"]

P = ParamSpec("P")
R = TypeVar("R")

logger = logging.getLogger("tidings.bus")


def croniter() -> Any:
    """croniter's class (the extra's driver), imported on first use."""
    try:
        from croniter import croniter  # type: ignore[import-untyped]
    except ImportError as exc:  # pragma: no cover - the extra is installed in tests
        raise ImportError("cron schedules need croniter: pip install 'tidings[cron]'") from exc
    return croniter


@dataclass(frozen=True)
class Schedule:
    """Emit ``name`` with this payload at every tick of ``cron`` (UTC)."""

    cron: str
    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            check_event_name(self.name)
        except EmitError as exc:
            raise ConfigurationError(f"schedule {self.cron!r}: {exc}") from exc
        if not croniter().is_valid(self.cron):
            raise ConfigurationError(f"{self.cron!r} is not a cron expression")
        try:
            self.next_after(time.time())
        except ValueError as exc:  # croniter's CroniterBadDateError, say
            raise ConfigurationError(
                f"cron expression {self.cron!r} never fires ({exc}): check its day and month"
            ) from exc

    @property
    def key(self) -> str:
        """What identifies the schedule across processes."""
        return f"{self.name} @ {self.cron}"

    def next_after(self, timestamp: float) -> float:
        """The first tick strictly after ``timestamp`` (seconds since the epoch)."""
        start = dt.datetime.fromtimestamp(timestamp, dt.UTC)
        return float(croniter()(self.cron, start).get_next(float))

    def last_before(self, timestamp: float) -> float:
        """The last tick at or before ``timestamp`` (seconds since the epoch)."""
        start = dt.datetime.fromtimestamp(timestamp, dt.UTC)
        return float(croniter()(self.cron, start).get_prev(float))


#: Fires one tick of a schedule (claims it, and emits the event if this process won it).
Fire = Callable[[Schedule, float], Awaitable[None]]


class Scheduler:
    """Fires a bus's schedules, each at its ticks, while it runs.

    Args:
        fire: called at each tick (``fire(schedule, tick)``); what it raises is logged.
    """

    def __init__(self, fire: Fire) -> None:
        self.fire = fire
        #: The schedules, in the order they were made.
        self.entries: list[Schedule] = []
        self._task: asyncio.Task[None] | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run the schedules on ``loop`` (again from now, if they ran already)."""
        if self._task is not None:
            self._task.cancel()
        self._task = loop.create_task(self._run(list(self.entries))) if self.entries else None

    async def stop(self) -> None:
        """Stop firing, and wait until a tick being fired is over."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def forget(self) -> None:
        """Drop the task of a loop that is gone (a bus that starts again)."""
        self._task = None

    async def _run(self, schedules: list[Schedule]) -> None:
        due: dict[int, float] = {}
        for i, entry in enumerate(schedules):
            _plan_tick(due, i, entry, time.time())
        while due:
            i = min(due, key=due.__getitem__)
            entry, tick = schedules[i], due[i]
            await asyncio.sleep(max(0.0, tick - time.time()))
            try:
                await self.fire(entry, tick)
            except Exception:
                logger.exception("schedule %s could not fire its tick %s", entry.key, tick)
            _plan_tick(due, i, entry, tick)


def _plan_tick(due: dict[int, float], i: int, entry: Schedule, after: float) -> None:
    """Set schedule ``i``'s next tick; one that has none stops alone, logged."""
    try:
        due[i] = entry.next_after(after)
    except Exception:
        due.pop(i, None)
        logger.exception("schedule %s has no tick after %s: it stops", entry.key, after)


class Schedules:
    """The schedules of a bus (:class:`~tidings.Bus` inherits them): events emitted at
    each tick of a cron expression, and listeners run at them."""

    # What the bus holds, set by its __init__.
    backend: Backend
    registry: Registry
    scheduler: Scheduler
    _running: Running | None

    if TYPE_CHECKING:  # the bus's own method ``_fire`` calls, declared for the type checker

        def options(self, *, headers: Mapping[str, str] | None = None) -> EmitOptions: ...

    def schedule(self, cron: str, name: str, /, *args: Any, **kwargs: Any) -> Schedule:
        """Emit ``name`` with this payload at every tick of the cron expression ``cron``
        (UTC; five fields, or six with seconds last).

        Buses that consume run the schedules, and each tick fires once even with
        several workers on one durable store.

        Raises:
            ConfigurationError: not a cron expression, one that never fires
                (``0 0 30 2 *``), or a bad event name.
        """
        entry = Schedule(cron, name, args, kwargs)
        self.scheduler.entries.append(entry)
        if self._running is not None:
            self._start_scheduler()
        return entry

    def cron(self, cron: str, **options: Any) -> Callable[[Callable[P, R]], Listener[P, R]]:
        """Run the decorated function at every tick of ``cron``: a listener of the event
        ``cron.<function name>``, which the bus schedules."""

        def decorate(fn: Callable[P, R]) -> Listener[P, R]:
            name = f"cron.{getattr(fn, '__name__', 'job')}"
            made = self.registry.listener(name, **options)(fn)
            self.schedule(cron, name)
            return made

        return decorate

    async def _fire(self, entry: Schedule, tick: float) -> None:
        """Fire one tick of a schedule, if this process claims it."""
        if await self.backend.claim_tick(entry.key, tick):
            await self.options(headers={"tidings-cron-tick": repr(tick)}).publish(
                entry.name, *entry.args, **entry.kwargs
            )

    def _start_scheduler(self) -> None:
        if self.backend.consume and self._running is not None:
            self.scheduler.start(self._running.loop)
