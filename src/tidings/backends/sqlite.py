"""SQLite, the embedded durable backend: ``Bus("sqlite:///path/to/events.db")``.

One file holds the events, a position per listener and one row per delivery. Several
processes may share the file (WAL mode): a delivery is leased to one of them at a time,
renewed while it runs, and reclaimed by any of them once the lease expires.

Events are fanned out lazily: a consumer turns the events past its listener's position
into its own deliveries in the same transaction that leases them. Events every listener
has moved past, and that no delivery refers to any more, are deleted.

Needs ``pip install 'tidings[sqlite]'`` (aiosqlite).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import parse_qsl, urlsplit

import msgspec

from tidings._patterns import matches
from tidings.backends.base import DeadLetter, split_options
from tidings.backends.durable import (
    Claimed,
    DurableBackend,
    ListenerStats,
    Outcomes,
    Stored,
    dead_letter_row,
    stored_row,
)
from tidings.errors import BackendError, ConfigurationError

if TYPE_CHECKING:
    import aiosqlite

__all__ = ["SQLiteBackend"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tidings_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    name TEXT NOT NULL,
    data BLOB NOT NULL,
    headers TEXT,
    created REAL NOT NULL,
    due REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tidings_listeners (
    listener TEXT PRIMARY KEY,
    names TEXT NOT NULL,
    position INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tidings_deliveries (
    listener TEXT NOT NULL,
    seq INTEGER NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    due REAL NOT NULL,
    lease_until REAL NOT NULL DEFAULT 0,
    owner TEXT,
    dead INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    traceback TEXT,
    failed_at REAL,
    PRIMARY KEY (listener, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tidings_deliveries_due ON tidings_deliveries (listener, dead, due);
CREATE INDEX IF NOT EXISTS tidings_deliveries_seq ON tidings_deliveries (seq);
CREATE TABLE IF NOT EXISTS tidings_ticks (
    schedule TEXT NOT NULL,
    tick REAL NOT NULL,
    PRIMARY KEY (schedule, tick)
) WITHOUT ROWID;
"""

_headers_enc = msgspec.json.Encoder()

# Fan-out reads at most this many new events per claim.
_FANOUT = 5000
# Old events are deleted once every so many seconds.
_CLEANUP_S = 1.0


class SQLiteBackend(DurableBackend):
    """Deliveries in one SQLite file (see the module docstring).

    Args:
        path: the database file (created if missing).
        busy_timeout_s: how long a write waits for another process's transaction.
        synchronous: SQLite's ``synchronous`` pragma: ``NORMAL`` (the default) survives
            a process crash; ``FULL`` also survives a power loss, slower.
        **options: see :class:`~tidings.backends.durable.DurableBackend`.
    """

    scheme: ClassVar[str] = "sqlite"

    def __init__(
        self,
        path: str | Path,
        *,
        busy_timeout_s: float = 30.0,
        synchronous: str = "NORMAL",
        **options: Any,
    ) -> None:
        super().__init__(**options)
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ConfigurationError(f"unknown SQLite synchronous mode {synchronous!r}")
        self.path = str(path)
        self.busy_timeout_s = busy_timeout_s
        self.synchronous = synchronous.upper()
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._last_cleanup = 0.0

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQLiteBackend:
        """``sqlite:///relative.db``, ``sqlite:////absolute/path.db``; the query may set
        ``lease_s``, ``poll_s``, ``batch``, ``concurrency``, ``max_lost_runs``,
        ``synchronous``, ``codec`` and ``create_dirs`` (make a missing directory)."""
        path = url.split("://", 1)[1].partition("?")[0]
        if path.startswith("/"):
            path = path[1:]
        if not path:
            raise ConfigurationError(f"{url!r} names no database file: sqlite:///events.db")
        rest, ours = split_options(
            url,
            floats=("lease_s", "poll_s", "busy_timeout_s"),
            ints=("batch", "concurrency", "max_lost_runs"),
            strs=("synchronous", "codec"),
            bools=("create_dirs",),
        )
        for key, _ in parse_qsl(urlsplit(rest).query, keep_blank_values=True):
            raise ConfigurationError(f"unknown option {key!r} in {url!r}")
        if not ours.pop("create_dirs", False) and not Path(path).parent.is_dir():
            raise ConfigurationError(
                f"{url!r}: the directory {str(Path(path).parent)!r} does not exist "
                "(create it, or add ?create_dirs=true)"
            )
        return cls(path, **{**options, **ours})

    def __repr__(self) -> str:
        return f"SQLiteBackend({self.path!r})"

    # -- connection -----------------------------------------------------------------

    async def connect(self) -> None:
        try:
            import aiosqlite
        except ImportError as exc:  # pragma: no cover - the extra is installed in tests
            raise ImportError(
                "the SQLite backend needs aiosqlite: pip install 'tidings[sqlite]'"
            ) from exc
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            db = await aiosqlite.connect(
                self.path, timeout=self.busy_timeout_s, isolation_level=None
            )
        except Exception as exc:
            raise BackendError(f"cannot open SQLite database {self.path!r}: {exc}") from exc
        self._db = db
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute(f"PRAGMA synchronous={self.synchronous}")
        await db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_s * 1000)}")
        async with self._write():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    await db.execute(statement)

    async def disconnect(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    def _write(self) -> _Transaction:
        if self._db is None:
            raise BackendError("the SQLite backend is not connected (start the bus first)")
        return _Transaction(self._db, self._lock)

    # -- producing ------------------------------------------------------------------

    async def store(self, records: Sequence[Stored]) -> None:
        rows = [
            (
                r.id,
                r.name,
                r.data,
                _headers_enc.encode(r.headers) if r.headers else None,
                r.created,
                r.due,
            )
            for r in records
        ]
        async with self._write() as db:
            await db.executemany(
                "INSERT INTO tidings_events (id, name, data, headers, created, due) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )

    async def join(self, listener: str, names: Sequence[str]) -> None:
        async with self._write() as db:
            await db.execute(
                "INSERT INTO tidings_listeners (listener, names, position) "
                "VALUES (?, ?, (SELECT COALESCE(MAX(seq), 0) FROM tidings_events)) "
                "ON CONFLICT (listener) DO UPDATE SET names = excluded.names",
                (listener, " ".join(names)),
            )

    # -- consuming ------------------------------------------------------------------

    async def claim(
        self, listener: str, names: Sequence[str], limit: int, lease_s: float
    ) -> list[Claimed]:
        now = time.time()
        async with self._write() as db:
            await self._fan_out(db, listener, names)
            cursor = await db.execute(
                "UPDATE tidings_deliveries SET attempt = attempt + 1, lease_until = ?, "
                "owner = ? WHERE listener = ? AND seq IN (SELECT seq FROM tidings_deliveries "
                "WHERE listener = ? AND dead = 0 AND due <= ? AND lease_until <= ? "
                "ORDER BY seq LIMIT ?) RETURNING seq, attempt",
                (now + lease_s, self.owner, listener, listener, now, now, limit),
            )
            leased: dict[int, int] = {seq: attempt for seq, attempt in await cursor.fetchall()}  # noqa: C416
            if not leased:
                return []
            cursor = await db.execute(
                "SELECT seq, id, name, data, headers, created, due FROM tidings_events "
                f"WHERE seq IN ({','.join('?' * len(leased))}) ORDER BY seq",
                tuple(leased),
            )
            rows = await cursor.fetchall()
        if now - self._last_cleanup > _CLEANUP_S:
            self._last_cleanup = now
            await self._cleanup()
        return [
            Claimed(
                listener=listener,
                attempt=leased[seq],
                record=stored_row(id_, name, data, headers, created, due),
                ref=seq,
            )
            for seq, id_, name, data, headers, created, due in rows
        ]

    async def _fan_out(self, db: aiosqlite.Connection, listener: str, names: Sequence[str]) -> None:
        cursor = await db.execute(
            "SELECT position FROM tidings_listeners WHERE listener = ?", (listener,)
        )
        row = await cursor.fetchone()
        if row is None:
            return
        position = row[0]
        cursor = await db.execute(
            "SELECT seq, name, due FROM tidings_events WHERE seq > ? ORDER BY seq LIMIT ?",
            (position, _FANOUT),
        )
        events = list(await cursor.fetchall())
        if not events:
            return
        mine = [
            (listener, seq, due)
            for seq, name, due in events
            if any(matches(pattern, name) for pattern in names)
        ]
        if mine:
            await db.executemany(
                "INSERT OR IGNORE INTO tidings_deliveries (listener, seq, due) VALUES (?, ?, ?)",
                mine,
            )
        await db.execute(
            "UPDATE tidings_listeners SET position = ? WHERE listener = ?",
            (events[-1][0], listener),
        )

    async def settle(self, outcomes: Outcomes) -> None:
        now = time.time()
        async with self._write() as db:
            if outcomes.acks:
                await db.executemany(
                    "DELETE FROM tidings_deliveries WHERE listener = ? AND seq = ?",
                    [(c.listener, c.ref) for c in outcomes.acks],
                )
            if outcomes.retries:
                await db.executemany(
                    "UPDATE tidings_deliveries SET due = ?, lease_until = 0, owner = NULL "
                    "WHERE listener = ? AND seq = ?",
                    [(now + delay, c.listener, c.ref) for c, delay, _ in outcomes.retries],
                )
            if outcomes.burials:
                await db.executemany(
                    "UPDATE tidings_deliveries SET dead = 1, error = ?, traceback = ?, "
                    "failed_at = ?, lease_until = 0, owner = NULL WHERE listener = ? AND seq = ?",
                    [(err, tb, now, c.listener, c.ref) for c, err, tb in outcomes.burials],
                )
            if outcomes.releases:
                await db.executemany(
                    "UPDATE tidings_deliveries SET attempt = MAX(attempt - 1, 0), "
                    "lease_until = 0, owner = NULL WHERE listener = ? AND seq = ? AND owner = ?",
                    [(c.listener, c.ref, self.owner) for c in outcomes.releases],
                )

    async def renew(self, claimed: Sequence[Claimed], lease_s: float) -> None:
        until = time.time() + lease_s
        async with self._write() as db:
            await db.executemany(
                "UPDATE tidings_deliveries SET lease_until = ? "
                "WHERE listener = ? AND seq = ? AND owner = ?",
                [(until, c.listener, c.ref, self.owner) for c in claimed],
            )

    async def _cleanup(self) -> None:
        async with self._write() as db:
            await db.execute(
                "DELETE FROM tidings_events WHERE seq <= "
                "(SELECT MIN(position) FROM tidings_listeners) "
                "AND NOT EXISTS (SELECT 1 FROM tidings_deliveries d "
                "WHERE d.seq = tidings_events.seq)"
            )

    async def claim_tick(self, schedule: str, tick: float) -> bool:
        async with self._write() as db:
            cursor = await db.execute(
                "INSERT OR IGNORE INTO tidings_ticks (schedule, tick) VALUES (?, ?)",
                (schedule, tick),
            )
            claimed = cursor.rowcount == 1
            # Ticks older than a day can no longer be claimed twice.
            await db.execute("DELETE FROM tidings_ticks WHERE tick < ?", (tick - 86400,))
            return claimed

    # -- inspecting -----------------------------------------------------------------

    async def list_dead(self, listener: str | None, limit: int) -> list[DeadLetter]:
        db = self._connected()
        cursor = await db.execute(
            "SELECT d.listener, d.attempt, d.error, d.traceback, d.failed_at, "
            "e.id, e.name, e.data, e.headers, e.created FROM tidings_deliveries d "
            "JOIN tidings_events e ON e.seq = d.seq WHERE d.dead = 1 "
            "AND (? IS NULL OR d.listener = ?) ORDER BY d.failed_at, d.seq LIMIT ?",
            (listener, listener, limit),
        )
        return [dead_letter_row(row) for row in await cursor.fetchall()]

    def _dead_filter(
        self, ids: Sequence[str] | None, listener: str | None
    ) -> tuple[str, list[Any]]:
        where = "dead = 1"
        params: list[Any] = []
        if listener is not None:
            where += " AND listener = ?"
            params.append(listener)
        if ids is not None:
            where += (
                f" AND seq IN (SELECT seq FROM tidings_events WHERE id IN "
                f"({','.join('?' * len(ids))}))"
            )
            params.extend(ids)
        return where, params

    async def replay_dead(self, ids: Sequence[str] | None, listener: str | None) -> int:
        where, params = self._dead_filter(ids, listener)
        async with self._write() as db:
            cursor = await db.execute(
                "UPDATE tidings_deliveries SET dead = 0, attempt = 0, due = ?, lease_until = 0, "
                f"owner = NULL, error = NULL, traceback = NULL WHERE {where}",
                (time.time(), *params),
            )
            count = cursor.rowcount
        for consumer in self._consumers:
            consumer.wake.set()
        return count

    async def purge_dead(self, ids: Sequence[str] | None, listener: str | None) -> int:
        where, params = self._dead_filter(ids, listener)
        async with self._write() as db:
            cursor = await db.execute(f"DELETE FROM tidings_deliveries WHERE {where}", params)
            return cursor.rowcount

    async def listener_stats(self) -> dict[str, ListenerStats]:
        db = self._connected()
        now = time.time()
        out: dict[str, ListenerStats] = {}
        cursor = await db.execute("SELECT listener FROM tidings_listeners ORDER BY listener")
        for (lst,) in await cursor.fetchall():
            out[lst] = ListenerStats()
        cursor = await db.execute(
            "SELECT d.listener, "
            "SUM(d.dead = 0 AND d.due <= ? AND d.lease_until <= ?), "
            "SUM(d.dead = 0 AND d.lease_until > ?), "
            "SUM(d.dead = 0 AND d.attempt > 0 AND d.due > ? AND d.lease_until <= ?), "
            "SUM(d.dead = 0 AND d.attempt = 0 AND d.due > ?), "
            "SUM(d.dead = 1), "
            "MIN(CASE WHEN d.dead = 0 THEN e.created END) "
            "FROM tidings_deliveries d JOIN tidings_events e ON e.seq = d.seq "
            "GROUP BY d.listener",
            (now, now, now, now, now, now),
        )
        for lst, pending, in_flight, retrying, delayed, dead, oldest in await cursor.fetchall():
            out[lst] = ListenerStats(
                pending=pending or 0,
                in_flight=in_flight or 0,
                retrying=retrying or 0,
                delayed=delayed or 0,
                dead=dead or 0,
                oldest_age_s=None if oldest is None else max(0.0, now - oldest),
            )
        # Events not yet turned into deliveries are pending too.
        cursor = await db.execute("SELECT listener, names, position FROM tidings_listeners")
        for lst, names, position in await cursor.fetchall():
            cursor2 = await db.execute(
                "SELECT name, created, due FROM tidings_events WHERE seq > ? ORDER BY seq",
                (position,),
            )
            patterns = names.split()
            for name, created, due in await cursor2.fetchall():
                if any(matches(p, name) for p in patterns):
                    s = out.setdefault(lst, ListenerStats())
                    if due > now:
                        s.delayed += 1
                        continue
                    s.pending += 1
                    age = max(0.0, now - created)
                    if s.oldest_age_s is None or age > s.oldest_age_s:
                        s.oldest_age_s = age
        return out

    def _connected(self) -> aiosqlite.Connection:
        if self._db is None:
            raise BackendError("the SQLite backend is not connected (start the bus first)")
        return self._db


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` on the shared connection, one at a time."""

    def __init__(self, db: aiosqlite.Connection, lock: asyncio.Lock) -> None:
        self.db = db
        self.lock = lock

    async def __aenter__(self) -> aiosqlite.Connection:
        await self.lock.acquire()
        try:
            await self.db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise
        return self.db

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                await self.db.execute("COMMIT")
            else:
                await self.db.execute("ROLLBACK")
        finally:
            self.lock.release()
