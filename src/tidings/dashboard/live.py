"""The per-listener figures as a rich table that ``tidings stats --watch`` refreshes,
with rates worked out between refreshes."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from rich.table import Table

__all__ = ["STAT_COLUMNS", "Watch", "stat_cells"]


STAT_COLUMNS = ("pending", "in flight", "retrying", "delayed", "dead", "oldest", "last seen")


def stat_cells(s: Any, now: float) -> list[str]:
    """A listener's store figures as the cells of ``STAT_COLUMNS``: pending, in flight,
    retrying, delayed, dead, the oldest's age and when a process last claimed for it
    (``now`` is ``time.time()``)."""
    oldest = "-" if s.oldest_age_s is None else f"{s.oldest_age_s:.1f}s"
    seen = "never" if s.last_seen is None else f"{max(0.0, now - s.last_seen):.0f}s ago"
    return [
        str(s.pending),
        str(s.in_flight),
        str(s.retrying),
        str(s.delayed),
        str(s.dead),
        oldest,
        seen,
    ]


class Watch:
    """Successive readings of ``bus.listener_stats()``, and the table of the last one.

    The rates are per second since the previous reading: how fast the backlog (pending
    and retrying) grows or shrinks, how many dead letters are added, and how many
    attempts returned and failed (the store's counts, whichever worker ran them).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.readings: list[tuple[float, Mapping[str, Any]]] = []

    def add(self, figures: Mapping[str, Any], at: float | None = None) -> None:
        """Record a reading (``ListenerStats`` by listener) taken at ``at`` (now)."""
        self.readings = [*self.readings[-1:], (time.monotonic() if at is None else at, figures)]

    def rates(self, listener: str) -> tuple[float, float] | None:
        """(backlog change/s, dead letters added/s) of ``listener``, once there are two
        readings."""
        if len(self.readings) < 2:
            return None
        (t0, before), (t1, after) = self.readings
        span = t1 - t0
        now, then = after.get(listener), before.get(listener)
        if now is None or then is None or span <= 0:
            return None
        backlog = (now.pending + now.retrying) - (then.pending + then.retrying)
        return backlog / span, max(now.dead - then.dead, 0) / span

    def flow(self, listener: str) -> tuple[float, float] | None:
        """(attempts that returned/s, attempts that failed/s) of ``listener``, once there
        are two readings from a store that counts them."""
        if len(self.readings) < 2:
            return None
        (t0, before), (t1, after) = self.readings
        now, then = after.get(listener), before.get(listener)
        if now is None or then is None or t1 <= t0:
            return None
        if None in (now.delivered, then.delivered, now.failed, then.failed):
            return None
        span = t1 - t0
        return (
            max(now.delivered - then.delivered, 0) / span,
            max(now.failed - then.failed, 0) / span,
        )

    def table(self) -> Table:
        """The last reading as a table. No column wraps: names stay whole and figures on
        one line, so the table is as wide as its rows need (the caller sizes the console)."""
        table = Table(
            title=f"deliveries on {self.url}",
            caption=time.strftime("%H:%M:%S") + "  (Ctrl-C to stop)",
        )
        table.add_column("listener", no_wrap=True)
        for column in (*STAT_COLUMNS, "backlog/s", "dead/s", "delivered/s", "failed/s"):
            table.add_column(column, justify="right", no_wrap=True)
        figures = self.readings[-1][1] if self.readings else {}
        now = time.time()
        for listener, s in sorted(figures.items()):
            rates = self.rates(listener)
            backlog, dead = ("-", "-") if rates is None else (f"{rates[0]:+.1f}", f"{rates[1]:.1f}")
            flow = self.flow(listener)
            ok, failed = ("-", "-") if flow is None else (f"{flow[0]:.1f}", f"{flow[1]:.1f}")
            table.add_row(listener, *stat_cells(s, now), backlog, dead, ok, failed)
        return table
