"""SQLite, the embedded durable backend: ``Bus("sqlite:///path/to/events.db")``.

One file holds the events, a position per listener and one row per delivery. Several
processes may share the file (WAL mode): a delivery is leased to one of them at a time,
renewed while it runs, and reclaimed by any of them once the lease expires.

Events are fanned out lazily: a consumer turns the events past its listener's position
into its own deliveries in the same transaction that leases them. Events every listener
has moved past, and that no delivery refers to any more, are deleted.

Each write is one transaction run whole in one call to the connection's thread, so the
file's write lock is held for its statements alone: never while this process's event
loop is busy elsewhere. A claim reads first and writes only when it has something to
lease or record (a reader never waits for a writer in WAL mode).

Needs ``pip install 'tidings[sqlite]'`` (aiosqlite).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, cast
from urllib.parse import parse_qsl, urlsplit

import msgspec

from tidings._patterns import matches
from tidings._units import seconds
from tidings.backends._options import split_options
from tidings.backends._sqlite_watch import Watch
from tidings.backends.base import DeadLetter
from tidings.backends.durable import (
    Claimed,
    DurableBackend,
    ListenerStats,
    Outcomes,
    Stored,
    dead_letter_row,
    stored_row,
    unreadable,
)
from tidings.errors import BackendError, ConfigurationError

if TYPE_CHECKING:
    import aiosqlite

__all__ = ["SQLiteBackend"]

_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tidings_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    name TEXT NOT NULL,
    data BLOB NOT NULL,
    headers TEXT,
    created REAL NOT NULL,
    due REAL NOT NULL,
    version INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS tidings_listeners (
    listener TEXT PRIMARY KEY,
    names TEXT NOT NULL,
    position INTEGER NOT NULL,
    last_seen REAL,
    delivered INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0
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
DROP INDEX IF EXISTS tidings_deliveries_due;
CREATE INDEX IF NOT EXISTS tidings_deliveries_seq ON tidings_deliveries (seq);
CREATE INDEX IF NOT EXISTS tidings_deliveries_leased ON tidings_deliveries (listener, lease_until)
    WHERE lease_until > 0;
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
# A listener's last claim is recorded at most once every so many seconds: writing it
# at each claim would make every idle claim a write transaction.
_SEEN_S = 60.0
# Event names whose match with a listener's patterns is remembered, per listener.
_TAKES = 10_000
# A consumer that keeps finding work looks for expired leases at most this often.
_EXPIRED_S = 1.0
# The lease of a lost delivery handed back: expired (long ago), so it is reclaimed as lost.
_LEASE_EXPIRED = 1.0
# With the file watched, an idle consumer with nothing coming due claims this often.
_QUIET_S = 1.0
# Columns added since the first schema, for files made by an older version.
_ADDED = (
    ("tidings_events", "version", "INTEGER NOT NULL DEFAULT 1"),
    ("tidings_listeners", "last_seen", "REAL"),
    ("tidings_listeners", "delivered", "INTEGER NOT NULL DEFAULT 0"),
    ("tidings_listeners", "failed", "INTEGER NOT NULL DEFAULT 0"),
)
# Row values per statement, well under SQLite's limit of bound parameters.
_CHUNK = 400


async def _ended(db: aiosqlite.Connection) -> None:
    """Wait (a moment at most) for the thread of a connection that failed or closed to
    end: it answers the loop once more, and raises if the loop has closed by then."""
    thread = getattr(db, "_thread", None)
    for _ in range(5000):
        if thread is None or not thread.is_alive():
            return
        await asyncio.sleep(0.001)


class SQLiteBackend(DurableBackend):
    """Deliveries in one SQLite file (see the module docstring).

    Args:
        path: the database file (created if missing).
        busy_timeout: how long a write waits for another process's transaction.
        synchronous: SQLite's ``synchronous`` pragma: ``NORMAL`` (the default) survives
            a process crash; ``FULL`` also survives a power loss, slower.
        **options: see :class:`~tidings.backends.durable.DurableBackend`.
    """

    scheme: ClassVar[str] = "sqlite"

    def __init__(
        self,
        path: str | Path,
        *,
        busy_timeout: float | timedelta = 30.0,
        synchronous: str = "NORMAL",
        **options: Any,
    ) -> None:
        super().__init__(**options)
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ConfigurationError(f"unknown SQLite synchronous mode {synchronous!r}")
        self.path = str(path)
        self.busy_timeout_s = max(seconds(busy_timeout, "busy_timeout"), 0.0)
        self.synchronous = synchronous.upper()
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._last_cleanup = 0.0
        # Per listener: when its last claim was recorded.
        self._seen: dict[str, float] = {}
        # Commits to the file by any connection but its own (None: a memory database).
        self._watch: Watch | None = None
        # Per listener: the file's version its last claim began at (None: not read, the
        # claim before found work), and, when that claim found nothing, until when
        # nothing can come due while the file stays unchanged.
        self._versions: dict[str, int | None] = {}
        # The listeners whose last claim found work: the next claim does not read the
        # file's version (a read on this thread would hand the interpreter's lock to the
        # connection's thread, busy settling, and wait for it back).
        self._busy: set[str] = set()
        self._quiet: dict[str, tuple[int, float]] = {}
        # Per listener: whether it takes each event name seen lately.
        self._takes: dict[str, dict[str, bool]] = {}
        # Per listener: when a claim last looked for expired leases.
        self._looked: dict[str, float] = {}

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQLiteBackend:
        """``sqlite:///relative.db``, ``sqlite:////absolute/path.db``; the query may set
        ``lease``, ``poll_interval``, ``busy_timeout`` (durations in seconds), ``batch``,
        ``concurrency``, ``max_lost_runs``, ``stale_after``, ``synchronous``, ``codec`` and
        ``create_dirs`` (make a missing directory)."""
        path = url.split("://", 1)[1].partition("?")[0]
        if path.startswith("/"):
            path = path[1:]
        if not path:
            raise ConfigurationError(f"{url!r} names no database file: sqlite:///events.db")
        rest, ours = split_options(
            url,
            floats=("lease", "poll_interval", "busy_timeout", "stale_after"),
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
        opening = aiosqlite.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        try:
            db = await opening
        except Exception as exc:
            await _ended(opening)
            raise BackendError(f"cannot open SQLite database {self.path!r}: {exc}") from exc
        self._db = db
        try:
            await self._prepare(db)
        except Exception as exc:
            self._db = None
            with contextlib.suppress(Exception):  # the error that matters is below
                await db.close()
            await _ended(db)
            raise BackendError(f"cannot open SQLite database {self.path!r}: {exc}") from exc

    async def _prepare(self, db: aiosqlite.Connection) -> None:
        """Set the connection up and create (or update) the schema."""
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute(f"PRAGMA synchronous={self.synchronous}")
        await db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_s * 1000)}")
        async with self._write():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    await db.execute(statement)
            for table, column, kind in _ADDED:
                cursor = await db.execute(f"PRAGMA table_info({table})")
                if column not in {row[1] for row in await cursor.fetchall()}:
                    await db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        if self.path != ":memory:" and self._watch is None:
            # A consumer polled more often than the watch looks at its slowest is woken
            # as often as it asked.
            self._watch = Watch(self.path, slowest_s=self.poll_s)

    async def disconnect(self) -> None:
        if self._watch is not None:
            await self._watch.aclose()
            self._watch = None
        if self._db is not None:
            await self._db.close()
            self._db = None

    def _write(self) -> _Transaction:
        if self._db is None:
            raise BackendError("the SQLite backend is not connected (start the bus first)")
        return _Transaction(self._db, self._lock, self.busy_timeout_s)

    async def _in_thread(self, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(conn, *args)`` in one call to the connection's thread, ``conn`` being
        the connection itself: a write transaction begun there holds the file's lock
        for its statements alone, never across turns of this process's event loop
        (which may be busy running deliveries meanwhile)."""
        db = self._connected()
        async with self._lock:
            # aiosqlite runs each of its own calls so.
            result = await db._execute(_call, db, fn, args)  # type: ignore[no-untyped-call]
        return cast(_T, result)

    async def _transact(self, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(conn, *args)`` in one write transaction (see :meth:`_in_thread`)."""
        return await self._in_thread(_transaction, self.busy_timeout_s, fn, args)

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
                r.version,
            )
            for r in records
        ]
        await self._transact(_insert_events, rows)

    def refuses(self, exc: BaseException) -> bool:
        # A constraint (a NaN due time is stored as NULL), a value SQLite cannot bind,
        # a string or blob too big; OperationalError (locked, I/O) is an outage.
        if isinstance(exc, sqlite3.IntegrityError | sqlite3.DataError | sqlite3.InterfaceError):
            return True
        return super().refuses(exc)

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
        now = self.clock()
        version: int | None = -1
        if self._watch is not None:
            version = None if listener in self._busy else self._watch.version()
        self._versions[listener] = version
        quiet = self._quiet.pop(listener, None)
        if (
            quiet is not None
            and version not in (-1, None)
            and quiet[0] == version
            and now < quiet[1]
            and now - self._seen.get(listener, 0.0) < _SEEN_S
        ):
            # Nothing was committed since a claim that found nothing, and nothing it
            # saw comes due before then: this one would find nothing either.
            self._quiet[listener] = quiet
            return []
        # A busy consumer looks for expired leases now and then, not at every claim (a
        # claim that finds nothing else always looks).
        looked = now - self._looked.get(listener, 0.0) >= min(_EXPIRED_S, lease_s / 2)
        if looked:
            self._looked[listener] = now
        seen = now - self._seen.get(listener, 0.0) >= _SEEN_S
        if seen:
            self._seen[listener] = now
        got = await self._in_thread(
            self._claiming, listener, tuple(names), limit, now, now + lease_s, looked, seen
        )
        if got.looked:
            self._looked[listener] = now
        if not got.rows and not got.leased:
            self._busy.discard(listener)
            if version is not None and version != -1:
                self._quiet[listener] = (version, got.quiet_until)
            return []
        self._busy.add(listener)
        leased = got.leased
        out: list[Claimed] = []
        for seq, id_, *fields in got.rows:
            attempt = leased.pop(seq)
            try:
                record = stored_row(id_, *fields)
            except Exception as exc:
                out.append(unreadable(listener, attempt, id_, seq, exc))
                continue
            out.append(Claimed(listener, attempt, record, seq, lost=got.lost))
        for seq, attempt in leased.items():  # a delivery whose event row is gone
            missing = LookupError(f"the stored event of delivery {seq} is missing")
            out.append(unreadable(listener, attempt, f"#{seq}", seq, missing))
        return out

    def _claiming(
        self,
        conn: sqlite3.Connection,
        listener: str,
        names: tuple[str, ...],
        limit: int,
        now: float,
        until: float,
        looked: bool,
        seen: bool,
    ) -> _Claim:
        """The claim, in the connection's thread: new events are read first, outside any
        transaction (a reader never waits for a writer); the write lock is taken only
        when there is something to lease or to record."""
        new = self._new_events(conn, listener, names, limit, now)
        if new.read == 0 and not seen:
            # Nothing new: a write is needed only if a delivery is due or a lease expired.
            due = _next_due(conn, listener)
            if due > now:
                return _Claim(quiet_until=due)

        def claim(conn: sqlite3.Connection) -> _Claim:
            got = self._claiming_in_transaction(
                conn, listener, names, limit, now, until, looked, new
            )
            if seen:
                conn.execute(
                    "UPDATE tidings_listeners SET last_seen = ? WHERE listener = ?",
                    (now, listener),
                )
            return got

        return _transaction(conn, self.busy_timeout_s, claim, ())

    def _claiming_in_transaction(
        self,
        conn: sqlite3.Connection,
        listener: str,
        names: tuple[str, ...],
        limit: int,
        now: float,
        until: float,
        looked: bool,
        new: _NewEvents,
    ) -> _Claim:
        got = _Claim()
        expired = "lease_until > 0 AND lease_until <= ?"
        if looked:
            # A delivery whose lease expired is reclaimed alone (see Claimed.lost); the
            # index of leased rows makes looking for one cheap.
            got.leased = self._lease(conn, expired, now, 1, listener, until)
            got.looked = True
        if got.leased:
            got.lost = True
        else:
            # Deliveries made earlier (retried, handed back, delayed) come before new
            # events: their events were stored first.
            got.leased = self._lease(
                conn, "lease_until = 0 AND due <= ?", now, limit, listener, until
            )
            if len(got.leased) < limit:
                (position,) = conn.execute(
                    "SELECT position FROM tidings_listeners WHERE listener = ?", (listener,)
                ).fetchone() or (None,)
                if position != new.start:
                    # Another process moved this listener on since the read: read again,
                    # under the lock.
                    new = self._new_events(conn, listener, names, limit, now)
                got.rows, more = self._fan_out(conn, listener, new, limit - len(got.leased), until)
                got.more = more
            if not (looked or got.leased or got.rows):
                got.looked = True
                got.leased = self._lease(conn, expired, now, 1, listener, until)
                got.lost = bool(got.leased)
        if not got.leased and not got.rows:
            got.quiet_until = now if got.more else _next_due(conn, listener)
            return got
        if got.leased:
            marks = ",".join("?" * len(got.leased))
            got.rows = [
                *conn.execute(
                    "SELECT seq, id, name, data, headers, created, due, version "
                    f"FROM tidings_events WHERE seq IN ({marks}) ORDER BY seq",
                    tuple(got.leased),
                ).fetchall(),
                *got.rows,
            ]
        got.leased.update((row[0], 1) for row in got.rows if row[0] not in got.leased)
        return got

    def _lease(
        self,
        conn: sqlite3.Connection,
        where: str,
        at: float,
        limit: int,
        listener: str,
        until: float,
    ) -> dict[int, int]:
        rows = conn.execute(
            "UPDATE tidings_deliveries SET attempt = attempt + 1, lease_until = ?, "
            "owner = ? WHERE listener = ? AND seq IN (SELECT seq FROM tidings_deliveries "
            f"WHERE listener = ? AND dead = 0 AND {where} ORDER BY seq LIMIT ?) "
            "RETURNING seq, attempt",
            (until, self.owner, listener, listener, at, limit),
        ).fetchall()
        return {seq: attempt for seq, attempt in rows}  # noqa: C416

    def _new_events(
        self,
        conn: sqlite3.Connection,
        listener: str,
        names: tuple[str, ...],
        room: int,
        now: float,
    ) -> _NewEvents:
        """The events past ``listener``'s position that it takes, up to ``room`` of them
        due now (read, not yet written down)."""
        row = conn.execute(
            "SELECT position FROM tidings_listeners WHERE listener = ?", (listener,)
        ).fetchone()
        new = _NewEvents(None if row is None else row[0])
        if new.start is None:
            return new  # not joined: nothing
        new.position = new.start
        takes = self._takes.setdefault(listener, {})
        while len(new.due) < room:
            events = conn.execute(
                "SELECT seq, id, name, data, headers, created, due, version "
                "FROM tidings_events WHERE seq > ? ORDER BY seq LIMIT ?",
                (new.position, room - len(new.due)),
            ).fetchall()
            for event in events:
                seq, name, due = event[0], event[2], event[6]
                # A row whose name is not text was not written by tidings: every listener
                # gets it, to make it a dead letter that says so (rather than stop the
                # fan-out).
                if isinstance(name, str):
                    wanted = takes.get(name)
                    if wanted is None:
                        if len(takes) >= _TAKES:
                            takes.clear()
                        wanted = takes[name] = any(matches(p, name) for p in names)
                    if not wanted:
                        continue
                due = due if isinstance(due, float | int) else 0.0
                if due > now:
                    new.later.append((listener, seq, due))
                else:
                    new.due.append(event)
            if not events:
                break
            new.position = events[-1][0]
            new.read += len(events)
            if new.read >= _FANOUT:
                new.more = True
                break
        return new

    def _fan_out(
        self, conn: sqlite3.Connection, listener: str, new: _NewEvents, room: int, until: float
    ) -> tuple[list[Any], bool]:
        """Turn new events into deliveries of ``listener``, leasing those due at once (up
        to ``room``) in the same write: the rows of the events leased, and whether more
        new events may be left."""
        if new.read == 0:
            return [], False
        due, later, position, more = new.due, new.later, new.position, new.more
        if len(due) > room:
            # Deliveries leased again took some of the room: the events past the last
            # one leased stay new.
            due = due[:room]
            position = due[-1][0]  # (room is at least 1)
            later = [entry for entry in later if entry[1] <= position]
            more = True
        if later:
            conn.executemany(
                "INSERT OR IGNORE INTO tidings_deliveries (listener, seq, due) VALUES (?, ?, ?)",
                later,
            )
        # Written once, leased: a new delivery is not inserted to be updated next.
        taken: list[Any] = []
        for start in range(0, len(due), _CHUNK):
            chunk = due[start : start + _CHUNK]
            cursor = conn.execute(
                "INSERT INTO tidings_deliveries (listener, seq, due, attempt, lease_until, owner) "
                "SELECT ?, column1, column2, 1, ?, ? FROM "
                f"(VALUES {','.join(['(?, ?)'] * len(chunk))}) WHERE true "
                "ON CONFLICT DO NOTHING",
                (
                    listener,
                    until,
                    self.owner,
                    *[
                        v
                        for e in chunk
                        for v in (e[0], e[6] if isinstance(e[6], float | int) else 0.0)
                    ],
                ),
            )
            if cursor.rowcount == len(chunk):
                taken += chunk
                continue
            # A delivery of one of them was there already (never made by tidings, which
            # moves the position in the same write): only the rows just written are ours.
            ours = {
                seq
                for (seq,) in conn.execute(
                    "SELECT seq FROM tidings_deliveries WHERE listener = ? AND owner = ? "
                    "AND lease_until = ? AND attempt = 1 "
                    f"AND seq IN ({','.join('?' * len(chunk))})",
                    (listener, self.owner, until, *[e[0] for e in chunk]),
                )
            }
            taken += [e for e in chunk if e[0] in ours]
        conn.execute(
            "UPDATE tidings_listeners SET position = ? WHERE listener = ?", (position, listener)
        )
        return taken, more

    async def idle_wait(self, listener: str, wake: asyncio.Event) -> None:
        # Woken as soon as another process commits to the file (its events may be for
        # this listener), not only at the next poll.
        if self._watch is None:
            await super().idle_wait(listener, wake)
            return
        version = self._versions.get(listener, -1)
        if version is None:
            # The claim that found nothing did not know the file's version: claim again
            # at once, knowing it, before waiting for the file to change.
            return
        timeout = self.poll_s
        quiet = self._quiet.get(listener)
        if quiet is not None and quiet[0] == version:
            # Nothing can come due before then unless the file changes, which the watch
            # sees: no claim needed at every poll meanwhile.
            timeout = max(self.poll_s, min(quiet[1] - self.clock(), _QUIET_S))
        await self._watch.wait(wake, version, timeout)

    async def settle(self, outcomes: Outcomes) -> None:
        now = self.clock()
        # Old events are deleted in the same write as the acks that free them, off the
        # way of a claim (which a fresh event waits for).
        cleanup = now - self._last_cleanup > _CLEANUP_S
        if cleanup:
            self._last_cleanup = now
        await self._transact(self._settling, outcomes, now, cleanup)
        for c in outcomes.releases:
            if c.lost:
                # Handed back with its lease expired: the next claim looks for it.
                self._looked.pop(c.listener, None)

    def _settling(
        self, conn: sqlite3.Connection, outcomes: Outcomes, now: float, cleanup: bool
    ) -> None:
        owner = self.owner
        # Each only where this process still holds the lease: a worker that lost it
        # (frozen past it) must not settle what another now runs.
        mine = "WHERE listener = ? AND seq = ? AND owner = ?"
        if outcomes.uncounted:
            # Only while the attempt is the one that claim counted (its outcome may
            # have been written meanwhile; never another process's claim).
            conn.executemany(
                "UPDATE tidings_deliveries SET attempt = attempt - 1 WHERE listener = ? "
                "AND seq = ? AND attempt = ? AND (owner IS NULL OR owner = ?)",
                [(c.listener, c.ref, c.attempt, owner) for c in outcomes.uncounted],
            )
        # Each listener's totals, counted in the same write (for the rates of a
        # dashboard that runs no listener): what was written, not what was stale.
        counts: dict[str, list[int]] = {}
        if outcomes.acks:
            # One statement per listener and chunk: cheaper than one per delivery.
            acked: dict[str, list[int]] = {}
            for c in outcomes.acks:
                acked.setdefault(c.listener, []).append(c.ref)
            for listener, seqs in acked.items():
                for start in range(0, len(seqs), _CHUNK):
                    chunk = seqs[start : start + _CHUNK]
                    cursor = conn.execute(
                        "DELETE FROM tidings_deliveries WHERE listener = ? AND owner = ? "
                        f"AND seq IN ({','.join('?' * len(chunk))})",
                        (listener, owner, *chunk),
                    )
                    counts.setdefault(listener, [0, 0])[0] += max(cursor.rowcount, 0)
        # One statement per listener, for its count of rows written.
        retried: dict[str, list[tuple[Any, ...]]] = {}
        for c, delay, _ in outcomes.retries:
            retried.setdefault(c.listener, []).append((now + delay, c.listener, c.ref, owner))
        for listener, rows in retried.items():
            cursor = conn.executemany(
                f"UPDATE tidings_deliveries SET due = ?, lease_until = 0, owner = NULL {mine}",
                rows,
            )
            counts.setdefault(listener, [0, 0])[1] += max(cursor.rowcount, 0)
        buried: dict[str, list[tuple[Any, ...]]] = {}
        for c, err, tb in outcomes.burials:
            buried.setdefault(c.listener, []).append((err, tb, now, c.listener, c.ref, owner))
        for listener, rows in buried.items():
            cursor = conn.executemany(
                "UPDATE tidings_deliveries SET dead = 1, error = ?, traceback = ?, "
                f"failed_at = ?, lease_until = 0, owner = NULL {mine}",
                rows,
            )
            counts.setdefault(listener, [0, 0])[1] += max(cursor.rowcount, 0)
        if counts:
            conn.executemany(
                "UPDATE tidings_listeners SET delivered = delivered + ?, failed = failed + ? "
                "WHERE listener = ?",
                [(ok, failed, listener) for listener, (ok, failed) in counts.items()],
            )
        if outcomes.releases:
            # A lost one's lease is left expired: it is reclaimed as lost again.
            conn.executemany(
                "UPDATE tidings_deliveries SET attempt = MAX(attempt - 1, 0), "
                f"lease_until = ?, owner = NULL {mine}",
                [
                    (_LEASE_EXPIRED if c.lost else 0, c.listener, c.ref, owner)
                    for c in outcomes.releases
                ],
            )
        if cleanup:
            _delete_old_events(conn)

    async def renew(self, claimed: Sequence[Claimed], lease_s: float) -> list[Claimed]:
        renewed = await self._transact(self._renewing, claimed, self.clock() + lease_s)
        return [c for c in claimed if (c.listener, c.ref) not in renewed]

    def _renewing(
        self, conn: sqlite3.Connection, claimed: Sequence[Claimed], until: float
    ) -> set[tuple[str, int]]:
        renewed: set[tuple[str, int]] = set()
        for start in range(0, len(claimed), _CHUNK):
            chunk = claimed[start : start + _CHUNK]
            cursor = conn.execute(
                "UPDATE tidings_deliveries SET lease_until = ? WHERE owner = ? AND "
                f"(listener, seq) IN (VALUES {','.join(['(?, ?)'] * len(chunk))}) "
                "RETURNING listener, seq",
                (until, self.owner, *[v for c in chunk for v in (c.listener, c.ref)]),
            )
            renewed.update((lst, seq) for lst, seq in cursor.fetchall())
        return renewed

    async def joined(self) -> dict[str, list[str]]:
        async with self._lock:
            cursor = await self._connected().execute(
                "SELECT listener, names FROM tidings_listeners"
            )
            return {listener: names.split() for listener, names in await cursor.fetchall()}

    async def forget(self, listener: str) -> bool:
        async with self._write() as db:
            await db.execute("DELETE FROM tidings_deliveries WHERE listener = ?", (listener,))
            cursor = await db.execute(
                "DELETE FROM tidings_listeners WHERE listener = ?", (listener,)
            )
            known = cursor.rowcount > 0
        await self._cleanup()
        return known

    async def _cleanup(self) -> None:
        await self._transact(_delete_old_events)

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
        # Reads take the connection's lock too: a statement left between its execute
        # and its fetch would hold a snapshot that makes a transaction begun meanwhile
        # fail with "database is locked".
        async with self._lock:
            cursor = await self._connected().execute(
                "SELECT d.listener, d.attempt, d.error, d.traceback, d.failed_at, "
                "e.id, e.name, e.data, e.headers, e.created FROM tidings_deliveries d "
                "JOIN tidings_events e ON e.seq = d.seq WHERE d.dead = 1 "
                "AND (? IS NULL OR d.listener = ?) ORDER BY d.failed_at, d.seq LIMIT ?",
                (listener, listener, limit),
            )
            rows = await cursor.fetchall()
        return [dead_letter_row(row) for row in rows]

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
                (self.clock(), *params),
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
        async with self._lock:
            return await self._listener_stats(self._connected())

    async def _listener_stats(self, db: aiosqlite.Connection) -> dict[str, ListenerStats]:
        now = self.clock()
        out: dict[str, ListenerStats] = {}
        cursor = await db.execute(
            "SELECT listener, last_seen, delivered, failed FROM tidings_listeners ORDER BY listener"
        )
        seen: dict[str, float | None] = {}
        totals: dict[str, tuple[int, int]] = {}
        for lst, last_seen, delivered, failed in await cursor.fetchall():
            out[lst] = ListenerStats()
            seen[lst] = last_seen
            totals[lst] = (delivered, failed)
        cursor = await db.execute(
            "SELECT d.listener, "
            "SUM(d.dead = 0 AND d.due <= ? AND d.lease_until <= ?), "
            "SUM(d.dead = 0 AND d.lease_until > ?), "
            "SUM(d.dead = 0 AND d.attempt > 0 AND d.due > ? AND d.lease_until <= ?), "
            "SUM(d.dead = 0 AND d.attempt = 0 AND d.due > ?), "
            "SUM(d.dead = 1), "
            # The oldest of the pending ones, since it came due (its retry's or delay's
            # end, else its emit): a delayed or running delivery is not waiting.
            "MIN(CASE WHEN d.dead = 0 AND d.due <= ? AND d.lease_until <= ? THEN d.due END) "
            "FROM tidings_deliveries d GROUP BY d.listener",
            (now, now, now, now, now, now, now, now),
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
        for lst, stats in out.items():
            stats.last_seen = seen.get(lst)
            if lst in totals:
                stats.delivered, stats.failed = totals[lst]
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
                    age = max(0.0, now - max(created, due))
                    if s.oldest_age_s is None or age > s.oldest_age_s:
                        s.oldest_age_s = age
        return out

    async def list_delayed(self, within_s: float, limit: int) -> list[dict[str, Any]]:
        """Events stored for later and due within ``within_s`` seconds, soonest first
        (``event_id``, ``name``, ``created``, ``due``)."""
        now = self.clock()
        cursor = await self._connected().execute(
            "SELECT id, name, created, due FROM tidings_events "
            "WHERE due > ? AND due <= ? ORDER BY due LIMIT ?",
            (now, now + within_s, limit),
        )
        return [
            {"event_id": id_, "name": name, "created": created, "due": due}
            for id_, name, created, due in await cursor.fetchall()
        ]

    def _connected(self) -> aiosqlite.Connection:
        if self._db is None:
            raise BackendError("the SQLite backend is not connected (start the bus first)")
        return self._db


def _next_due(conn: sqlite3.Connection, listener: str) -> float:
    """When the first delivery of ``listener`` comes due or its lease expires."""
    row = conn.execute(
        "SELECT MIN(CASE WHEN lease_until > 0 THEN lease_until ELSE due END) "
        "FROM tidings_deliveries WHERE listener = ? AND dead = 0",
        (listener,),
    ).fetchone()
    return float(row[0]) if row and row[0] is not None else math.inf


def _delete_old_events(conn: sqlite3.Connection) -> None:
    """Delete the events every joined listener has moved past (all of them, when none is
    joined: a listener joined later receives new events only) and that no delivery
    refers to any more."""
    conn.execute(
        "DELETE FROM tidings_events WHERE seq <= COALESCE("
        "(SELECT MIN(position) FROM tidings_listeners), "
        "(SELECT MAX(seq) FROM tidings_events)) "
        "AND NOT EXISTS (SELECT 1 FROM tidings_deliveries d "
        "WHERE d.seq = tidings_events.seq)"
    )


def _insert_events(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    """Insert stored events' rows, as few statements as the bound-value limit allows:
    each statement is one step, where ``executemany`` takes one per row."""
    per = max(1, conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // 7)
    for start in range(0, len(rows), per):
        chunk = rows[start : start + per]
        conn.execute(
            "INSERT INTO tidings_events (id, name, data, headers, created, due, version) "
            f"VALUES {','.join(['(?, ?, ?, ?, ?, ?, ?)'] * len(chunk))}",
            [v for row in chunk for v in row],
        )


def _call(db: aiosqlite.Connection, fn: Callable[..., _T], args: tuple[Any, ...]) -> _T:
    return fn(db._conn, *args)


def _transaction(
    conn: sqlite3.Connection, busy_timeout_s: float, fn: Callable[..., _T], args: tuple[Any, ...]
) -> _T:
    """``fn(conn, *args)`` between ``BEGIN IMMEDIATE`` and ``COMMIT`` (``ROLLBACK`` if it
    raises)."""
    _begin(conn, busy_timeout_s)
    try:
        result = fn(conn, *args)
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise
    return result


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):  # the error that matters is being raised
            conn.execute("ROLLBACK")


# While another connection writes, BEGIN IMMEDIATE is tried again after this pause,
# doubled up to the longest.
_BEGIN_PAUSE_S = 0.00005
_BEGIN_PAUSE_MAX_S = 0.001


def _begin(conn: sqlite3.Connection, busy_timeout_s: float) -> None:
    """``BEGIN IMMEDIATE`` on ``conn`` (in its thread), waiting up to ``busy_timeout_s``
    for another connection's write transaction to end.

    SQLite's own wait (``busy_timeout``) sleeps 1, 2, 5, 10, 20... milliseconds between
    tries: a producer that commits and begins again at once keeps a waiting consumer out
    for tens of milliseconds. Trying again every millisecond at most finds the gap.
    """
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        deadline = time.monotonic() + busy_timeout_s
        pause = _BEGIN_PAUSE_S
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if (
                    exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY
                    or time.monotonic() >= deadline
                ):
                    raise
            time.sleep(pause)
            pause = min(pause * 2, _BEGIN_PAUSE_MAX_S)
    finally:
        # The statements of the transaction (and reads) wait as configured.
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")


@dataclass(slots=True)
class _NewEvents:
    """What a claim read past a listener's position: the events due now that it takes,
    those it takes later (``(listener, seq, due)``), and where the read ended."""

    start: int | None
    position: int = 0
    due: list[Any] = field(default_factory=list)
    later: list[tuple[str, int, float]] = field(default_factory=list)
    read: int = 0
    more: bool = False


@dataclass(slots=True)
class _Claim:
    """What a claim leased (``leased``: seq -> attempt; ``rows``: their events), or when
    it may next find something (``quiet_until``)."""

    leased: dict[int, int] = field(default_factory=dict)
    rows: list[Any] = field(default_factory=list)
    lost: bool = False
    looked: bool = False
    more: bool = False
    quiet_until: float = 0.0


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` on the shared connection, one at a time."""

    def __init__(self, db: aiosqlite.Connection, lock: asyncio.Lock, busy_timeout_s: float) -> None:
        self.db = db
        self.lock = lock
        self.busy_timeout_s = busy_timeout_s

    async def __aenter__(self) -> aiosqlite.Connection:
        await self.lock.acquire()
        try:
            # One call to the connection's thread (aiosqlite's own way to run one).
            await self.db._execute(_begin, self.db._conn, self.busy_timeout_s)  # type: ignore[no-untyped-call]
        except BaseException:
            # Cancelled, the BEGIN still runs on the connection's thread: end what it
            # began there (statements run in order, so before the next transaction's).
            end = asyncio.ensure_future(self.db.execute("ROLLBACK"))
            end.add_done_callback(lambda f: f.cancelled() or f.exception())
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
