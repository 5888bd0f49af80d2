"""Cron schedules: an event emitted at every tick of a cron expression.

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

import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Any

from tidings.errors import ConfigurationError, EmitError
from tidings.events import check_event_name

__all__ = ["Schedule"]


def _croniter() -> Any:
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
        if not _croniter().is_valid(self.cron):
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
        return float(_croniter()(self.cron, start).get_next(float))
