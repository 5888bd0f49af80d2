"""The durable backends the fault suite runs on, each behind the same small interface.

A new durable backend joins the whole suite by adding a subclass of
:class:`DurableStore` here and its name to :data:`STORES`: an isolated URL on the
machine's service, a way to write an entry straight into the store (as another process
or a corrupt disk would), and, if it is a server, a private one the suite may kill.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from pathlib import Path
from typing import ClassVar

import msgspec

from tidings.backends.durable import Stored

from ..services import (
    POSTGRES_URL,
    REDIS_URL,
    drop_prefix,
    drop_schema,
    require_postgres,
    require_redis,
    unique_prefix,
    unique_schema,
)
from .servers import Server, postgres_server, redis_server

# Headers no reader can parse: an entry whose envelope is broken, not only its payload.
BROKEN_HEADERS = '{"unterminated'


def _query(options: dict[str, object]) -> str:
    return "&".join(f"{k}={v}" for k, v in options.items())


def new_event_id() -> str:
    """An event id of the shape tidings makes."""
    return uuid.uuid4().hex


class DurableStore(ABC):
    """One durable backend as the fault suite drives it.

    Args:
        tmp_path: the test's own directory.
    """

    kind: ClassVar[str]

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path

    async def setup(self) -> None:  # noqa: B027 - a file needs nothing made
        """Check the service is there and make what the store needs (skips without it)."""

    async def teardown(self) -> None:  # noqa: B027 - the file goes with tmp_path
        """Delete everything the test stored."""

    @abstractmethod
    def url(self, **options: object) -> str:
        """A URL of this test's own store, with ``options`` in its query."""

    @abstractmethod
    async def write_payload(self, name: str, data: bytes, *, version: int = 1) -> str:
        """Store an event named ``name`` whose payload bytes are ``data``, in stored
        format ``version``, as another process would (for every listener joined); its id.

        An event of ``name`` must have been stored before by a bus (so a broker that
        makes per-name structures, such as Redis's consumer groups, has them).
        """

    @abstractmethod
    async def write_unreadable(self, name: str) -> None:
        """Store an entry of ``name`` whose envelope itself cannot be read."""

    def private_server(
        self, directory: Path, *, persistent: bool
    ) -> AbstractContextManager[Server] | None:
        """A private server of this backend the test may kill and restart; ``None``
        where the backend has no server, or none with that persistence."""
        return None

    def server_url(self, server: Server, **options: object) -> str:
        """A URL of :meth:`private_server`'s ``server``."""
        raise NotImplementedError


class SQLiteStore(DurableStore):
    kind = "sqlite"

    @property
    def path(self) -> Path:
        return self.tmp_path / "events.db"

    def url(self, **options: object) -> str:
        query = _query(options)
        return f"sqlite:///{self.path}" + (f"?{query}" if query else "")

    def _insert(self, name: str, data: bytes, headers: str | None, version: int = 1) -> str:
        event_id = new_event_id()
        now = time.time()
        # Its own connection: the bus's may be in a transaction, which this waits for.
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute(
                "INSERT INTO tidings_events (id, name, data, headers, created, due, version) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (event_id, name, data, headers, now, now, version),
            )
        finally:
            db.close()
        return event_id

    async def write_payload(self, name: str, data: bytes, *, version: int = 1) -> str:
        return await asyncio.to_thread(self._insert, name, data, None, version)

    async def write_unreadable(self, name: str) -> None:
        await asyncio.to_thread(self._insert, name, b"{}", BROKEN_HEADERS)


class RedisStore(DurableStore):
    kind = "redis"

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path)
        self.prefix = unique_prefix()

    async def setup(self) -> None:
        require_redis()

    async def teardown(self) -> None:
        await drop_prefix(self.prefix)

    def url(self, **options: object) -> str:
        return f"{REDIS_URL}?{_query({'prefix': self.prefix, **options})}"

    async def _xadd(self, name: str, entry: bytes) -> None:
        from redis.asyncio import Redis

        redis = Redis.from_url(REDIS_URL)
        try:
            stream = f"{self.prefix}:s:{name}"
            assert await redis.exists(stream), f"no stream {stream}: store an event first"
            await redis.xadd(stream, {"e": entry})
        finally:
            await redis.aclose()

    async def write_payload(self, name: str, data: bytes, *, version: int = 1) -> str:
        event_id = new_event_id()
        now = time.time()
        record = Stored(
            id=event_id, name=name, data=data, headers={}, created=now, due=now, version=version
        )
        await self._xadd(name, msgspec.msgpack.encode(record))
        return event_id

    async def write_unreadable(self, name: str) -> None:
        await self._xadd(name, b"\xc1 not an entry")

    def private_server(
        self, directory: Path, *, persistent: bool
    ) -> AbstractContextManager[Server] | None:
        return redis_server(directory, persistent=persistent)

    def server_url(self, server: Server, **options: object) -> str:
        query = _query(options)
        return f"redis://127.0.0.1:{server.port}/0" + (f"?{query}" if query else "")


class PostgresStore(DurableStore):
    kind = "postgres"

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path)
        self.schema = unique_schema()

    async def setup(self) -> None:
        require_postgres()

    async def teardown(self) -> None:
        await drop_schema(self.schema)

    def url(self, **options: object) -> str:
        return f"{POSTGRES_URL}?{_query({'schema': self.schema, **options})}"

    async def _insert(self, name: str, data: bytes, headers: str | None, version: int = 1) -> str:
        import asyncpg

        s = self.schema
        event_id = new_event_id()
        now = time.time()
        conn = await asyncpg.connect(POSTGRES_URL)
        try:
            # One delivery per joined listener whose patterns match, as a producer makes.
            await conn.execute(
                f"WITH e AS (INSERT INTO {s}.events "
                "(id, name, data, headers, created, due, version) "
                "VALUES ($1, $2, $3, $4, $5, $5, $6) RETURNING seq, name, due) "
                f"INSERT INTO {s}.deliveries (listener, seq, due) "
                f"SELECT l.listener, e.seq, e.due FROM e JOIN {s}.listeners l "
                "ON (e.name || '.') ~ l.regex",
                event_id,
                name,
                data,
                headers,
                now,
                version,
            )
        finally:
            await conn.close()
        return event_id

    async def write_payload(self, name: str, data: bytes, *, version: int = 1) -> str:
        return await self._insert(name, data, None, version)

    async def write_unreadable(self, name: str) -> None:
        await self._insert(name, b"{}", BROKEN_HEADERS)

    def private_server(
        self, directory: Path, *, persistent: bool
    ) -> AbstractContextManager[Server] | None:
        # PostgreSQL without its write-ahead log is not a configuration to support.
        return postgres_server() if persistent else None

    def server_url(self, server: Server, **options: object) -> str:
        query = _query(options)
        url = f"postgresql://postgres@127.0.0.1:{server.port}/postgres"
        return url + (f"?{query}" if query else "")


#: Every durable backend, by the name tests are parametrized with.
STORES: dict[str, type[DurableStore]] = {
    "sqlite": SQLiteStore,
    "redis": RedisStore,
    "postgres": PostgresStore,
}
