"""PostgreSQL: ``Bus("postgresql://user@host/db")``, with a transactional outbox.

Tables live in one schema (``tidings`` unless ``?schema=`` says otherwise), created and
migrated on start (``?migrate=false`` to leave that to ``tidings db migrate APP``):

- ``events``: one row per event (payload, headers, creation and due times).
- ``listeners``: the listeners joined, with their patterns as one regular expression.
- ``deliveries``: one row per event and listener, made in the transaction that stores
  the event (fan-out with independent retries). A worker claims a batch with
  ``FOR UPDATE SKIP LOCKED`` and a lease; any worker takes over expired leases, so no
  single sweeper has to stay alive. Dead letters stay until purged.
- ``ticks``: one row per fired cron tick, so several workers fire it once.

``NOTIFY`` wakes consumers when events are stored; it is only a hint, and consumers poll
as well (every ``poll_s``), so a transaction-pooling proxy without ``LISTEN`` works too.

The outbox: ``await bus.publish(..., connection=conn)`` stores the event with the asyncpg
connection ``conn``, inside its transaction: the event exists only if that transaction
commits. ``session=`` takes a SQLAlchemy ``AsyncSession`` on asyncpg the same way.

Needs ``pip install 'tidings[postgres]'`` (asyncpg).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

import msgspec

from tidings._patterns import split_segment
from tidings._units import seconds
from tidings.backends._options import redact, split_options
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
    import asyncpg

    from tidings.events import Event

__all__ = ["MIGRATIONS", "PostgresBackend", "pattern_regex"]

logger = logging.getLogger("tidings.backends.postgres")

#: The schema's versions, in order; each is run once, in a transaction, and recorded.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE {s}.events (
        seq BIGSERIAL PRIMARY KEY,
        id TEXT NOT NULL,
        name TEXT NOT NULL,
        data BYTEA NOT NULL,
        headers TEXT,
        created DOUBLE PRECISION NOT NULL,
        due DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX events_id ON {s}.events (id);
    CREATE TABLE {s}.listeners (
        listener TEXT PRIMARY KEY,
        names TEXT NOT NULL,
        regex TEXT NOT NULL,
        joined DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE {s}.deliveries (
        listener TEXT NOT NULL,
        seq BIGINT NOT NULL REFERENCES {s}.events (seq) ON DELETE CASCADE,
        attempt INTEGER NOT NULL DEFAULT 0,
        due DOUBLE PRECISION NOT NULL,
        lease_until DOUBLE PRECISION NOT NULL DEFAULT 0,
        owner TEXT,
        dead BOOLEAN NOT NULL DEFAULT FALSE,
        error TEXT,
        traceback TEXT,
        failed_at DOUBLE PRECISION,
        PRIMARY KEY (listener, seq)
    );
    CREATE INDEX deliveries_ready ON {s}.deliveries (listener, seq)
        WHERE NOT dead AND lease_until = 0;
    CREATE INDEX deliveries_leased ON {s}.deliveries (listener, lease_until)
        WHERE lease_until > 0;
    CREATE INDEX deliveries_seq ON {s}.deliveries (seq);
    CREATE TABLE {s}.ticks (
        schedule TEXT NOT NULL,
        tick DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (schedule, tick)
    );
    """,
    """
    ALTER TABLE {s}.events ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE {s}.listeners ADD COLUMN last_seen DOUBLE PRECISION;
    """,
    """
    ALTER TABLE {s}.listeners ADD COLUMN delivered BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE {s}.listeners ADD COLUMN failed BIGINT NOT NULL DEFAULT 0;
    """,
)

_headers_enc = msgspec.json.Encoder()
_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# Deleted events are looked for this often (per process).
_CLEANUP_S = 1.0
_FLOAT_OPTIONS = ("lease", "poll_interval", "retention", "stale_after")
_INT_OPTIONS = ("batch", "concurrency", "max_lost_runs")
_STR_OPTIONS = ("codec", "schema")
# The database's clock, in epoch seconds: leases never depend on a worker's own clock.
_NOW = "extract(epoch FROM now())::float8"
# A listener's last claim is recorded at most once every so many seconds: writing it
# at each claim would cost a round trip and make every worker of a listener queue for
# its row's lock.
_SEEN_S = 60.0
# The lease of a lost delivery handed back: expired (long ago), so it is reclaimed as lost.
_LEASE_EXPIRED = 1.0
# How long connecting may take before it is given up.
_CONNECT_TIMEOUT_S = 10.0
# Words PostgreSQL reserves (also as a function or type name): not a schema's name.
_RESERVED = frozenset(
    """all analyse analyze and any array as asc asymmetric authorization binary both case cast
    check collate collation column concurrently constraint create cross current_catalog
    current_date current_role current_schema current_time current_timestamp current_user
    default deferrable desc distinct do else end except false fetch for foreign freeze from
    full grant group having ilike in initially inner intersect into is isnull join lateral
    leading left like limit localtime localtimestamp natural not notnull null offset on only
    or order outer overlaps placing primary references returning right select session_user
    similar some symmetric system_user table tablesample then to trailing true union unique
    user using variadic verbose when where window with""".split()  # noqa: SIM905
)


def pattern_regex(patterns: Sequence[str]) -> str:
    """A PostgreSQL regular expression that ``name || '.'`` matches when ``name``
    matches one of the event-name ``patterns``."""
    alternatives = []
    for pattern in patterns:
        parts = []
        for segment in pattern.split("."):
            if segment == "**":
                parts.append(r"(?:[^.]*\.)*")
            else:
                pieces = [r"[^.]*" if p == "*" else re.escape(p) for p in split_segment(segment)]
                parts.append("".join(pieces) + r"\.")
        alternatives.append("".join(parts))
    return "^(?:" + "|".join(alternatives) + ")$"


def _connect_failure(exc: Exception) -> str:
    """Why connecting failed, in words even when the error has none (a timeout's)."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {_CONNECT_TIMEOUT_S:g}s ({type(exc).__qualname__})"
    return str(exc) or type(exc).__qualname__


class PostgresBackend(DurableBackend):
    """Deliveries in PostgreSQL tables (see the module docstring).

    Args:
        dsn: an asyncpg connection string (``postgresql://...``).
        schema: the schema of the tables (created if missing).
        migrate: create and migrate the tables on start.
        retention: keep events this long after their last delivery (0: delete at once).
        **options: see :class:`~tidings.backends.durable.DurableBackend`.
    """

    scheme: ClassVar[str] = "postgresql"

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "tidings",
        migrate: bool = True,
        retention: float | timedelta = 0.0,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        #: Publishing in the caller's transaction (see :mod:`tidings.outbox`).
        self.outbox = self
        if not _IDENT.match(schema):
            raise ConfigurationError(
                f"a schema name is lower-case letters, digits and '_', not {schema!r}"
            )
        if schema in _RESERVED or schema.startswith("pg_"):
            raise ConfigurationError(
                f"schema={schema!r} is reserved by PostgreSQL; choose another schema name"
            )
        self.dsn = dsn
        self.schema = schema
        self.migrate = migrate
        self.retention_s = max(seconds(retention, "retention"), 0.0)
        self._pool: asyncpg.Pool | None = None
        self._listen_task: asyncio.Task[None] | None = None
        self._last_cleanup = 0.0
        self._channel = f"tidings_{schema}"
        s = schema
        self._sql_insert = (
            f"WITH e AS (INSERT INTO {s}.events (id, name, data, headers, created, due, version) "
            "SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::text[], "
            "$5::float8[], $6::float8[], $7::int[]) RETURNING seq, name, due) "
            f"INSERT INTO {s}.deliveries (listener, seq, due) "
            f"SELECT l.listener, e.seq, e.due FROM e JOIN {s}.listeners l "
            "ON (e.name || '.') ~ l.regex"
        )
        # Deliveries nobody holds, oldest first (the index of ready rows, in order);
        # and, now and then, those whose lease expired (their worker died).
        self._sql_claim = self._claim_sql(f"lease_until = 0 AND NOT dead AND due <= {_NOW}")
        self._sql_reclaim = self._claim_sql(f"lease_until > 0 AND lease_until <= {_NOW}")
        self._reclaimed: dict[str, float] = {}
        self._seen: dict[str, float] = {}

    def _claim_sql(self, where: str) -> str:
        s = self.schema
        # Deliveries whose event row is gone come back with a NULL id (made dead letters).
        return (
            f"WITH picked AS (SELECT seq FROM {s}.deliveries WHERE listener = $1 AND {where} "
            "ORDER BY seq LIMIT $2 FOR UPDATE SKIP LOCKED), "
            f"upd AS (UPDATE {s}.deliveries d "
            f"SET attempt = d.attempt + 1, lease_until = {_NOW} + $3, owner = $4 FROM picked "
            "WHERE d.listener = $1 AND d.seq = picked.seq RETURNING d.seq, d.attempt) "
            "SELECT upd.seq, upd.attempt, e.id, e.name, e.data, e.headers, e.created, "
            f"e.version FROM upd LEFT JOIN {s}.events e ON e.seq = upd.seq ORDER BY upd.seq"
        )

    @classmethod
    def from_url(cls, url: str, **options: Any) -> PostgresBackend:
        """``postgresql://user:password@host:port/db``; the query may set ``schema``,
        ``migrate``, ``lease``, ``poll_interval``, ``batch``, ``concurrency``,
        ``max_lost_runs``, ``stale_after``, ``codec`` and ``retention`` (durations in
        seconds); other parameters are asyncpg's."""
        rest, ours = split_options(
            url, floats=_FLOAT_OPTIONS, ints=_INT_OPTIONS, strs=_STR_OPTIONS, bools=("migrate",)
        )
        parts = urlsplit(rest)
        scheme = "postgresql" if parts.scheme in ("postgres", "postgresql") else parts.scheme
        return cls(urlunsplit(parts._replace(scheme=scheme)), **options, **ours)

    def __repr__(self) -> str:
        return f"PostgresBackend({redact(self.dsn)!r}, schema={self.schema!r})"

    # -- connection -----------------------------------------------------------------

    async def connect(self) -> None:
        try:
            import asyncpg
        except ImportError as exc:  # pragma: no cover - the extra is installed in tests
            raise ImportError(
                "the PostgreSQL backend needs asyncpg: pip install 'tidings[postgres]'"
            ) from exc
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn, min_size=1, max_size=10, timeout=_CONNECT_TIMEOUT_S, command_timeout=60
            )
        except Exception as exc:
            raise BackendError(
                f"cannot connect to PostgreSQL at {redact(self.dsn)}: {_connect_failure(exc)}"
            ) from exc
        if self.migrate:
            await self.run_migrations()
        if self.consume:
            self._listen_task = asyncio.get_running_loop().create_task(self._listen())

    async def disconnect(self) -> None:
        if self._listen_task is not None:
            self._listen_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listen_task
            self._listen_task = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    def _p(self) -> asyncpg.Pool:
        if self._pool is None:
            raise BackendError("the PostgreSQL backend is not connected (start the bus first)")
        return self._pool

    async def run_migrations(self) -> list[int]:
        """Create the schema and run the migrations not yet run; their versions."""
        s = self.schema
        async with self._p().acquire() as conn, conn.transaction():
            # One migrator at a time, across processes.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"tidings:{s}")
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {s}.migrations "
                "(version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            done = {r[0] for r in await conn.fetch(f"SELECT version FROM {s}.migrations")}
            ran = []
            for version, sql in enumerate(MIGRATIONS, start=1):
                if version in done:
                    continue
                await conn.execute(sql.format(s=s))
                await conn.execute(f"INSERT INTO {s}.migrations (version) VALUES ($1)", version)
                ran.append(version)
        return ran

    async def _listen(self) -> None:
        """Wake the consumers on NOTIFY; reconnect after a loss; give up quietly where
        LISTEN is not available (polling goes on)."""
        import asyncpg

        delay = 0.5
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self.dsn, timeout=_CONNECT_TIMEOUT_S)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(self._channel, self._notified)
                delay = 0.5
                await lost.wait()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.debug("LISTEN %s unavailable (%s); polling", self._channel, exc)
            finally:
                if conn is not None and not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await conn.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    def _notified(self, *_: Any) -> None:
        for consumer in self._consumers:
            consumer.wake.set()

    # -- producing ------------------------------------------------------------------

    def _columns(self, records: Sequence[Stored]) -> tuple[list[Any], ...]:
        return (
            [r.id for r in records],
            [r.name for r in records],
            [r.data for r in records],
            [_headers_enc.encode(r.headers).decode() if r.headers else None for r in records],
            [r.created for r in records],
            [r.due for r in records],
            [r.version for r in records],
        )

    async def store(self, records: Sequence[Stored]) -> None:
        async with self._p().acquire() as conn, conn.transaction():
            await self.store_with(conn, records)

    def refuses(self, exc: BaseException) -> bool:
        import asyncpg

        # The server's data errors (SQLSTATE 22: a NUL in text, a bad encoding, a value
        # out of range), constraints, limits; an argument asyncpg cannot encode.
        refused = (
            asyncpg.DataError,
            asyncpg.IntegrityConstraintViolationError,
            asyncpg.ProgramLimitExceededError,
            asyncpg.exceptions._base.DataError,
        )
        return isinstance(exc, refused) or super().refuses(exc)

    def translate(self, exc: BaseException, what: str) -> BackendError:
        error = super().translate(exc, what)
        import asyncpg

        # A table or column missing: the schema was never migrated (migrate=false), is
        # older than this version, or was dropped; say how to make it.
        if isinstance(exc, asyncpg.UndefinedTableError | asyncpg.UndefinedColumnError):
            hint = "run `tidings db migrate APP`"
            if not self.migrate:
                hint += ", or drop migrate=false from the URL"
            error = type(error)(f"{error}; the tables are missing or out of date: {hint}")
        return error

    async def store_in(self, connection: Any, event: Event, delay_s: float | None) -> None:
        """Store ``event`` with an asyncpg ``connection``, in its current transaction (the
        outbox: see :mod:`tidings.outbox`)."""
        due = event.timestamp if delay_s is None else event.timestamp + delay_s
        await self._listeners_joined()
        await self.store_with(connection, [self._record(event, due)])

    async def store_with(self, conn: Any, records: Sequence[Stored]) -> None:
        """Store events with ``conn``, in its current transaction if it is in one."""
        await conn.execute(self._sql_insert, *self._columns(records))
        await conn.execute("SELECT pg_notify($1, '')", self._channel)

    async def join(self, listener: str, names: Sequence[str]) -> None:
        async with self._p().acquire() as conn:
            await conn.execute(
                f"INSERT INTO {self.schema}.listeners (listener, names, regex, joined) "
                "VALUES ($1, $2, $3, $4) ON CONFLICT (listener) DO UPDATE "
                "SET names = excluded.names, regex = excluded.regex",
                listener,
                " ".join(names),
                pattern_regex(names),
                time.time(),
            )

    # -- consuming ------------------------------------------------------------------

    async def claim(
        self, listener: str, names: Sequence[str], limit: int, lease_s: float
    ) -> list[Claimed]:
        now = time.monotonic()
        reclaim = now - self._reclaimed.get(listener, -math.inf) >= max(lease_s / 4, self.poll_s)
        lost = False
        async with self._p().acquire() as conn, conn.transaction():
            # The table's statistics are those of when it was small (a queue grows
            # faster than ANALYZE runs): plan for these values each time (a generic
            # plan joins by scanning whole tables), and walk the index in order to the
            # limit (not a bitmap scan of every waiting delivery, sorted). And no wait
            # for the disk: a lease lost in a crash of the server only makes the
            # delivery claimable again.
            await conn.execute(
                "SET LOCAL plan_cache_mode = force_custom_plan; "
                "SET LOCAL enable_bitmapscan = off; SET LOCAL synchronous_commit = off"
            )
            rows = []
            if reclaim:
                # A delivery whose lease expired is reclaimed alone (see Claimed.lost).
                rows = await conn.fetch(self._sql_reclaim, listener, 1, lease_s, self.owner)
                lost = bool(rows)
                if not lost:
                    self._reclaimed[listener] = now
            if not lost:
                rows = await conn.fetch(self._sql_claim, listener, limit, lease_s, self.owner)
            if now - self._seen.get(listener, -math.inf) >= _SEEN_S:
                self._seen[listener] = now
                await conn.execute(
                    f"UPDATE {self.schema}.listeners SET last_seen = {_NOW} WHERE listener = $1",
                    listener,
                )
        if now - self._last_cleanup > _CLEANUP_S:
            self._last_cleanup = now
            await self._cleanup(time.time())
        out: list[Claimed] = []
        for seq, attempt, id_, *fields in rows:
            try:
                if id_ is None:
                    raise LookupError(f"the stored event of delivery {seq} is missing")
                name, data, headers, created, version = fields
                record = stored_row(id_, name, data, headers, created, created, version)
            except Exception as exc:
                out.append(unreadable(listener, attempt, id_ or f"#{seq}", seq, exc))
                continue
            out.append(Claimed(listener, attempt, record, seq, lost=lost))
        return out

    async def settle(self, outcomes: Outcomes) -> None:
        s = self.schema
        owner = self.owner
        async with self._p().acquire() as conn, conn.transaction():
            # An outcome lost in a crash of the server means the delivery runs again
            # (at least once), so its commit need not wait for the disk. (Plans as in
            # claim.) Each only where this process still holds the lease: a worker that
            # lost it (frozen past it) must not settle what another now runs.
            await conn.execute(
                "SET LOCAL plan_cache_mode = force_custom_plan; SET LOCAL synchronous_commit = off"
            )
            if outcomes.uncounted:
                # Only while the attempt is the one that claim counted (its outcome may
                # have been written meanwhile; never another process's claim).
                await conn.executemany(
                    f"UPDATE {s}.deliveries SET attempt = attempt - 1 WHERE listener = $1 "
                    "AND seq = $2 AND attempt = $3 AND (owner IS NULL OR owner = $4)",
                    [(c.listener, c.ref, c.attempt, owner) for c in outcomes.uncounted],
                )
            if outcomes.acks:
                by_listener: dict[str, list[int]] = {}
                for c in outcomes.acks:
                    by_listener.setdefault(c.listener, []).append(c.ref)
                # Each statement counts what it wrote in the listener's totals too (for
                # the rates of a dashboard that runs no listener): no round trip more.
                for listener, seqs in by_listener.items():
                    await conn.execute(
                        f"WITH done AS (DELETE FROM {s}.deliveries WHERE listener = $1 "
                        "AND seq = ANY($2) AND owner = $3 RETURNING 1) "
                        f"UPDATE {s}.listeners SET delivered = delivered + "
                        "(SELECT count(*) FROM done) WHERE listener = $1",
                        listener,
                        seqs,
                        owner,
                    )
            failed = (
                f"UPDATE {s}.listeners SET failed = failed + (SELECT count(*) FROM done) "
                "WHERE listener = $2"
            )
            if outcomes.retries:
                await conn.executemany(
                    f"WITH done AS (UPDATE {s}.deliveries SET due = {_NOW} + $1, "
                    "lease_until = 0, owner = NULL WHERE listener = $2 AND seq = $3 "
                    f"AND owner = $4 RETURNING 1) {failed}",
                    [(delay, c.listener, c.ref, owner) for c, delay, _ in outcomes.retries],
                )
            if outcomes.burials:
                await conn.executemany(
                    f"WITH done AS (UPDATE {s}.deliveries SET dead = TRUE, error = $1, "
                    f"traceback = $3, failed_at = {_NOW}, lease_until = 0, owner = NULL "
                    f"WHERE listener = $2 AND seq = $4 AND owner = $5 RETURNING 1) {failed}",
                    [(err, c.listener, tb, c.ref, owner) for c, err, tb in outcomes.burials],
                )
            if outcomes.releases:
                # A lost one's lease is left expired: it is reclaimed as lost again.
                await conn.executemany(
                    f"UPDATE {s}.deliveries SET attempt = GREATEST(attempt - 1, 0), "
                    "lease_until = $1, owner = NULL WHERE listener = $2 AND seq = $3 "
                    "AND owner = $4",
                    [
                        (_LEASE_EXPIRED if c.lost else 0.0, c.listener, c.ref, owner)
                        for c in outcomes.releases
                    ],
                )
        for c in outcomes.releases:
            if c.lost:
                self._reclaimed.pop(c.listener, None)  # the next claim takes it over

    async def renew(self, claimed: Sequence[Claimed], lease_s: float) -> list[Claimed]:
        by_listener: dict[str, list[int]] = {}
        for c in claimed:
            by_listener.setdefault(c.listener, []).append(c.ref)
        renewed: set[tuple[str, int]] = set()
        async with self._p().acquire() as conn:
            for listener, seqs in by_listener.items():
                rows = await conn.fetch(
                    f"UPDATE {self.schema}.deliveries SET lease_until = {_NOW} + $1 "
                    "WHERE listener = $2 AND seq = ANY($3) AND owner = $4 RETURNING seq",
                    lease_s,
                    listener,
                    seqs,
                    self.owner,
                )
                renewed.update((listener, r[0]) for r in rows)
        return [c for c in claimed if (c.listener, c.ref) not in renewed]

    async def joined(self) -> dict[str, list[str]]:
        async with self._p().acquire() as conn:
            rows = await conn.fetch(f"SELECT listener, names FROM {self.schema}.listeners")
        return {r[0]: r[1].split() for r in rows}

    async def forget(self, listener: str) -> bool:
        s = self.schema
        async with self._p().acquire() as conn, conn.transaction():
            await conn.execute(f"DELETE FROM {s}.deliveries WHERE listener = $1", listener)
            status = await conn.execute(f"DELETE FROM {s}.listeners WHERE listener = $1", listener)
        return not status.endswith(" 0")

    async def _cleanup(self, now: float) -> None:
        s = self.schema
        async with self._p().acquire() as conn:
            await conn.execute(
                f"DELETE FROM {s}.events e WHERE e.created < $1 AND NOT EXISTS "
                f"(SELECT 1 FROM {s}.deliveries d WHERE d.seq = e.seq)",
                now - self.retention_s,
            )
            await conn.execute(f"DELETE FROM {s}.ticks WHERE tick < $1", now - 86400)

    async def claim_tick(self, schedule: str, tick: float) -> bool:
        async with self._p().acquire() as conn:
            status = await conn.execute(
                f"INSERT INTO {self.schema}.ticks (schedule, tick) VALUES ($1, $2) "
                "ON CONFLICT DO NOTHING",
                schedule,
                tick,
            )
        return bool(status.endswith(" 1"))

    # -- inspecting -----------------------------------------------------------------

    async def list_dead(self, listener: str | None, limit: int) -> list[DeadLetter]:
        s = self.schema
        async with self._p().acquire() as conn:
            rows = await conn.fetch(
                "SELECT d.listener, d.attempt, d.error, d.traceback, d.failed_at, e.id, "
                f"e.name, e.data, e.headers, e.created FROM {s}.deliveries d "
                f"JOIN {s}.events e ON e.seq = d.seq WHERE d.dead "
                "AND ($1::text IS NULL OR d.listener = $1) "
                "ORDER BY d.failed_at, d.seq LIMIT $2",
                listener,
                limit,
            )
        return [dead_letter_row(row) for row in rows]

    def _dead_filter(
        self, ids: Sequence[str] | None, listener: str | None
    ) -> tuple[str, list[Any]]:
        where = "dead AND ($1::text IS NULL OR listener = $1)"
        params: list[Any] = [listener]
        if ids is not None:
            where += f" AND seq IN (SELECT seq FROM {self.schema}.events WHERE id = ANY($2))"
            params.append(list(ids))
        return where, params

    async def replay_dead(self, ids: Sequence[str] | None, listener: str | None) -> int:
        where, params = self._dead_filter(ids, listener)
        async with self._p().acquire() as conn:
            status = await conn.execute(
                f"UPDATE {self.schema}.deliveries SET dead = FALSE, attempt = 0, "
                f"due = {_NOW}, lease_until = 0, owner = NULL, error = NULL, "
                f"traceback = NULL WHERE {where}",
                *params,
            )
        for consumer in self._consumers:
            consumer.wake.set()
        return int(status.split()[-1])

    async def purge_dead(self, ids: Sequence[str] | None, listener: str | None) -> int:
        where, params = self._dead_filter(ids, listener)
        async with self._p().acquire() as conn:
            status = await conn.execute(
                f"DELETE FROM {self.schema}.deliveries WHERE {where}", *params
            )
        return int(status.split()[-1])

    async def listener_stats(self) -> dict[str, ListenerStats]:
        s = self.schema
        async with self._p().acquire() as conn:
            now = await conn.fetchval(f"SELECT {_NOW}")
            joined = await conn.fetch(
                f"SELECT listener, last_seen, delivered, failed FROM {s}.listeners "
                "ORDER BY listener"
            )
            rows = await conn.fetch(
                "SELECT d.listener, "
                "COUNT(*) FILTER (WHERE NOT d.dead AND d.due <= $1 AND d.lease_until <= $1), "
                "COUNT(*) FILTER (WHERE NOT d.dead AND d.lease_until > $1), "
                "COUNT(*) FILTER (WHERE NOT d.dead AND d.attempt > 0 AND d.due > $1 "
                "AND d.lease_until <= $1), "
                "COUNT(*) FILTER (WHERE NOT d.dead AND d.attempt = 0 AND d.due > $1), "
                "COUNT(*) FILTER (WHERE d.dead), "
                # The oldest of the pending ones, since it came due (its retry's or
                # delay's end, else its emit): a delayed or running one is not waiting.
                "MIN(d.due) FILTER (WHERE NOT d.dead AND d.due <= $1 AND d.lease_until <= $1) "
                f"FROM {s}.deliveries d GROUP BY d.listener",
                now,
            )
        seen = {r[0]: r[1] for r in joined}
        totals = {r[0]: (r[2], r[3]) for r in joined}
        out = {r[0]: ListenerStats(last_seen=r[1], delivered=r[2], failed=r[3]) for r in joined}
        for lst, pending, in_flight, retrying, delayed, dead, oldest in rows:
            delivered, failed = totals.get(lst, (None, None))
            out[lst] = ListenerStats(
                pending=pending,
                in_flight=in_flight,
                retrying=retrying,
                delayed=delayed,
                dead=dead,
                oldest_age_s=None if oldest is None else max(0.0, now - oldest),
                last_seen=seen.get(lst),
                delivered=delivered,
                failed=failed,
            )
        return out

    async def list_delayed(self, within_s: float, limit: int) -> list[dict[str, Any]]:
        """Events stored for later and due within ``within_s`` seconds, soonest first
        (``event_id``, ``name``, ``created``, ``due``)."""
        async with self._p().acquire() as conn:
            now = await conn.fetchval(f"SELECT {_NOW}")
            rows = await conn.fetch(
                f"SELECT id, name, created, due FROM {self.schema}.events "
                "WHERE due > $1 AND due <= $2 ORDER BY due LIMIT $3",
                now,
                now + within_s,
                limit,
            )
        return [{"event_id": r[0], "name": r[1], "created": r[2], "due": r[3]} for r in rows]
