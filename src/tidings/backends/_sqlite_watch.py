"""Noticing that another process wrote to an SQLite file, without asking it for work.

A waiting SQLite consumer must hear of an event another process stored. Claiming to find
out costs a write transaction each time; reading ``PRAGMA data_version`` costs a look at
the file's shared memory (it changes whenever any other connection commits). The watch
reads it on a short interval while writes come (one millisecond), and backs off while the
file is quiet (to a few dozen milliseconds), so an idle worker costs next to nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3

__all__ = ["Watch"]

# The interval between looks right after a change, and the longest one while quiet.
_FAST_S = 0.001
_SLOW_S = 0.04
# How much longer each look that finds nothing waits than the one before.
_BACKOFF = 1.5


class Watch:
    """The commits to one SQLite file, seen from a connection of its own.

    Args:
        path: the database file (already created).
        slowest_s: the longest interval between looks while the file is quiet (at most
            a few dozen milliseconds).
    """

    def __init__(self, path: str, slowest_s: float = _SLOW_S) -> None:
        self._slowest_s = min(slowest_s, _SLOW_S)
        # Never waits for a lock: a busy file is read as changed (the claim that
        # follows waits as claims do).
        self._db: sqlite3.Connection | None = sqlite3.connect(
            path, timeout=0, isolation_level=None, check_same_thread=False
        )
        self._waiters: dict[asyncio.Event, int] = {}
        self._someone = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def version(self) -> int:
        """A number that differs from the last one read whenever a connection other than
        this watch's committed to the file since (``-1``: cannot tell, so changed)."""
        db = self._db
        if db is None:
            return -1
        try:
            row = db.execute("PRAGMA data_version").fetchone()
        except sqlite3.Error:
            return -1
        return int(row[0]) if row else -1

    async def wait(self, wake: asyncio.Event, seen: int, timeout_s: float) -> None:
        """Wait until ``wake`` is set, the file changes from version ``seen``, or
        ``timeout_s`` passes."""
        if seen == -1 or self._db is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout_s)
            return
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        self._waiters[wake] = seen
        self._someone.set()
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout_s)
        finally:
            self._waiters.pop(wake, None)

    async def _run(self) -> None:
        interval = _FAST_S
        while self._db is not None:
            if not self._waiters:
                self._someone.clear()
                await self._someone.wait()
                interval = _FAST_S
                continue
            await asyncio.sleep(interval)
            now = self.version()
            changed = [wake for wake, seen in self._waiters.items() if seen != now or now == -1]
            for wake in changed:
                wake.set()
            interval = _FAST_S if changed else min(interval * _BACKOFF, self._slowest_s)

    async def aclose(self) -> None:
        """Stop watching and close the watch's connection."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._db is not None:
            self._db.close()
            self._db = None
