"""What only PostgreSQL shows: the transactional outbox, migrations, NOTIFY and polling,
leases, fan-out in the storing transaction, and a server restarted mid-stream."""

from __future__ import annotations

import asyncio
import re
import socket
import time
import types
from collections.abc import AsyncIterator

import asyncpg
import pytest
from typer.testing import CliRunner

from tidings import Bus, ConfigurationError, Retry, listener
from tidings._patterns import matches
from tidings.backends import postgres
from tidings.backends.postgres import PostgresBackend, pattern_regex
from tidings.cli import app as cli
from tidings.errors import BackendError, PublishFailed

from ..services import POSTGRES_URL, drop_schema, require_postgres, unique_schema


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    require_postgres()
    name = unique_schema()
    try:
        yield name
    finally:
        await drop_schema(name)


@pytest.fixture
async def db() -> AsyncIterator[asyncpg.Connection]:
    require_postgres()
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        yield conn
    finally:
        await conn.close()


def _url(schema: str, **options: object) -> str:
    query = "&".join(
        f"{k}={v}" for k, v in {"schema": schema, "poll_interval": 0.01, **options}.items()
    )
    return f"{POSTGRES_URL}?{query}"


PATTERNS = ["user.created", "user.*", "user.**", "**", "*", "order_*", "a.**.z", "a.*.z", "x+y"]
NAMES = ["user.created", "user.created.email", "user", "order_paid", "order", "a.z", "a.b.z"]
NAMES += ["a.b.c.z", "x+y", "xxy", "users.created"]


async def test_the_sql_pattern_matches_as_tidings_does(db: asyncpg.Connection) -> None:
    for pattern in PATTERNS:
        regex = pattern_regex([pattern])
        for name in NAMES:
            matched = await db.fetchval("SELECT ($1 || '.') ~ $2", name, regex)
            assert matched is matches(pattern, name), (pattern, name)


async def test_a_rolled_back_transaction_never_delivers(
    schema: str, db: asyncpg.Connection
) -> None:
    seen: list[str] = []

    @listener("user.created")
    async def welcome(email: str) -> None:
        seen.append(email)

    async with Bus(_url(schema), listeners=[welcome]) as bus:
        await db.execute(f"CREATE TABLE {schema}.users (email TEXT)")
        failed = db.transaction()
        await failed.start()
        await db.execute(f"INSERT INTO {schema}.users VALUES ('gone@x.y')")
        await bus.options(connection=db).publish("user.created", email="gone@x.y")
        await failed.rollback()  # the payment failed, say
        async with db.transaction():
            await db.execute(f"INSERT INTO {schema}.users VALUES ('ada@x.y')")
            await bus.options(connection=db).publish("user.created", email="ada@x.y")
            await asyncio.sleep(0.1)
            assert seen == []  # not committed yet: nobody can see it
        await bus.drain()
    assert seen == ["ada@x.y"]


async def test_a_sqlalchemy_session_is_an_outbox_too(schema: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    seen: list[int] = []

    @listener("order.paid")
    async def charge(order_id: int) -> None:
        seen.append(order_id)

    engine = create_async_engine(POSTGRES_URL.replace("postgresql://", "postgresql+asyncpg://"))
    try:
        async with Bus(_url(schema), listeners=[charge]) as bus:
            async with AsyncSession(engine) as session:
                await session.execute(text("SELECT 1"))
                await bus.options(session=session).publish("order.paid", order_id=1)
                await session.rollback()
            async with AsyncSession(engine) as session:
                await bus.options(session=session).publish("order.paid", order_id=2)
                await session.commit()
            await bus.drain()
    finally:
        await engine.dispose()
    assert seen == [2]


async def test_a_sqlalchemy_session_rolls_back_an_event_published_before_anything_else(
    schema: str,
) -> None:
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    seen: list[int] = []

    @listener("order.paid")
    async def charge(order_id: int) -> None:
        seen.append(order_id)

    engine = create_async_engine(POSTGRES_URL.replace("postgresql://", "postgresql+asyncpg://"))
    try:
        async with Bus(_url(schema), listeners=[charge]) as bus:

            async def publish_then_fail() -> None:
                async with AsyncSession(engine) as session, session.begin():
                    await bus.options(session=session).publish("order.paid", order_id=1)
                    raise RuntimeError("the payment failed")

            with pytest.raises(RuntimeError, match="payment failed"):
                await publish_then_fail()
            async with AsyncSession(engine) as session:
                await bus.options(session=session).publish("order.paid", order_id=2)
                await session.rollback()
            async with AsyncSession(engine) as session, session.begin():
                await bus.options(session=session).publish("order.paid", order_id=3)
            await bus.drain()
    finally:
        await engine.dispose()
    assert seen == [3]


async def test_each_listener_gets_exactly_one_delivery_of_a_committed_event(
    schema: str, db: asyncpg.Connection
) -> None:
    a: list[int] = []
    b: list[int] = []

    @listener("x")
    async def first(n: int) -> None:
        a.append(n)

    @listener("*")
    async def second(n: int) -> None:
        b.append(n)

    async with Bus(_url(schema), listeners=[first, second]) as bus:
        for n in range(20):
            async with db.transaction():
                await bus.options(connection=db).publish("x", n=n)
        await bus.drain()
    assert sorted(a) == sorted(b) == list(range(20))


async def test_outbox_needs_postgres() -> None:
    async with Bus() as bus:
        with pytest.raises(ConfigurationError, match="only the PostgreSQL backend"):
            await bus.options(connection=object()).publish("x")


async def test_migrations_run_once_and_are_recorded(schema: str, db: asyncpg.Connection) -> None:
    backend = PostgresBackend(POSTGRES_URL, schema=schema, migrate=False, consume=False)
    await backend.connect()
    try:
        assert await backend.run_migrations() == [1, 2, 3]
        assert await backend.run_migrations() == []
    finally:
        await backend.disconnect()
    versions = await db.fetch(f"SELECT version FROM {schema}.migrations")
    assert [r[0] for r in versions] == [1, 2, 3]


def test_tidings_db_migrate(schema: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDINGS_TEST_URL", _url(schema, migrate="false"))
    runner = CliRunner(env={"COLUMNS": "250"})
    result = runner.invoke(cli, ["db", "migrate", "tests.cli_app:make_bus()"])
    assert result.exit_code == 0, result.output
    assert f"schema {schema}: ran migration(s) 1, 2, 3" in result.output
    result = runner.invoke(cli, ["db", "migrate", "tests.cli_app:make_bus()"])
    assert f"schema {schema} is up to date" in result.output


def test_tables_not_yet_migrated_are_named_with_the_command_that_makes_them(
    schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIDINGS_TEST_URL", _url(schema, migrate="false"))
    runner = CliRunner(env={"COLUMNS": "250"})
    result = runner.invoke(cli, ["emit", "tests.cli_app:make_bus()", "order.paid"])
    assert result.exit_code != 0
    assert "UndefinedTableError" in result.output
    assert "the tables are missing or out of date" in result.output
    assert "run `tidings db migrate APP`" in result.output
    assert "or drop migrate=false from the URL" in result.output


async def test_a_migrated_store_whose_tables_were_dropped_names_the_command_too(
    schema: str, db: asyncpg.Connection
) -> None:
    @listener("x")
    async def on_x() -> None:
        pass

    async with Bus(_url(schema), listeners=[on_x], consume=False) as bus:
        await db.execute(f"DROP TABLE {schema}.deliveries")
        with pytest.raises(BackendError, match="run `tidings db migrate APP`") as caught:
            await bus.listener_stats()
    assert "migrate=false" not in str(caught.value)


async def test_notify_wakes_a_consumer_long_before_it_would_poll(schema: str) -> None:
    got = asyncio.Event()

    @listener("ping")
    async def pong() -> None:
        got.set()

    async with Bus(_url(schema, poll_interval=30), listeners=[pong]) as consumer:
        await consumer.drain()  # the consumer has polled and found nothing: it sleeps 30s
        async with Bus(_url(schema), consume=False) as producer:
            began = time.monotonic()
            await producer.publish("ping")
        await asyncio.wait_for(got.wait(), 10)
        assert time.monotonic() - began < 5


async def test_without_listen_polling_delivers(schema: str) -> None:
    got = asyncio.Event()

    @listener("ping")
    async def pong() -> None:
        got.set()

    bus = Bus(_url(schema, poll_interval=0.05), listeners=[pong])
    async with bus:
        backend: PostgresBackend = bus.backend  # type: ignore[assignment]
        assert backend._listen_task is not None
        backend._listen_task.cancel()  # as behind a proxy where LISTEN is refused
        async with Bus(_url(schema), consume=False) as producer:
            await producer.publish("ping")
        await asyncio.wait_for(got.wait(), 10)


async def test_delivered_events_are_deleted(schema: str, db: asyncpg.Connection) -> None:
    @listener("x")
    async def on_x() -> None:
        pass

    async with Bus(_url(schema), listeners=[on_x], consume=False) as bus:
        for _ in range(5):
            bus.emit("x")
        bus.options(delay=60).emit("x")
    backend = PostgresBackend(POSTGRES_URL, schema=schema, poll_interval=0.01)
    async with Bus(backend, listeners=[on_x]) as bus:
        await bus.drain()
        await backend._cleanup(time.time())
    assert await db.fetchval(f"SELECT COUNT(*) FROM {schema}.events") == 1  # the delayed one


async def test_unreachable_postgres_is_a_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(BackendError, match="cannot connect to PostgreSQL"):
        async with Bus(f"postgresql://postgres:secret@127.0.0.1:{port}/x", consume=False):
            pass


async def test_a_postgres_that_never_answers_is_a_timeout_in_words(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(postgres, "_CONNECT_TIMEOUT_S", 0.2)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()  # connections are accepted (by the kernel), and never answered
        port = server.getsockname()[1]
        with pytest.raises(BackendError) as caught:
            async with Bus(f"postgresql://postgres:secret@127.0.0.1:{port}/x", consume=False):
                pass
    assert str(caught.value) == (
        f"cannot connect to PostgreSQL at postgresql://postgres:***@127.0.0.1:{port}/x: "
        "no answer within 0.2s (TimeoutError)"
    )


def test_urls() -> None:
    backend = Bus(
        "postgres://u:secret@db.example/app?schema=events&lease=5&batch=9&max_lost_runs=0"
    ).backend
    assert isinstance(backend, PostgresBackend)
    assert backend.schema == "events"
    assert backend.lease_s == 5.0
    assert backend.batch == 9
    assert backend.max_lost_runs == 0
    assert backend.dsn == "postgresql://u:secret@db.example/app"
    assert "secret" not in repr(backend)
    with pytest.raises(ConfigurationError, match="schema name"):
        Bus("postgresql://db/app?schema=Bad-Name")
    for reserved in ("select", "user", "pg_catalog"):
        with pytest.raises(ConfigurationError, match=f"schema='{reserved}' is reserved"):
            Bus(f"postgresql://db/app?schema={reserved}")
    with pytest.raises(ConfigurationError, match=r"^batch must be"):
        Bus("postgresql://db/app?batch=0")


async def test_leases_run_on_the_databases_clock(
    schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    @listener("x", retry=Retry(attempts=5))
    async def on_x() -> None:
        pass

    async with (
        Bus(_url(schema), listeners=[on_x], consume=False) as a,
        Bus(_url(schema), listeners=[on_x], consume=False) as b,
    ):
        first: PostgresBackend = a.backend  # type: ignore[assignment]
        second: PostgresBackend = b.backend  # type: ignore[assignment]
        await a.publish("x")
        # The first worker's clock is an hour behind: its lease must still hold.
        behind = types.SimpleNamespace(time=lambda: time.time() - 3600, monotonic=time.monotonic)
        monkeypatch.setattr(postgres, "time", behind)
        (claimed,) = await first.claim(on_x.qualname, on_x.names, 10, lease_s=30)
        monkeypatch.undo()
        assert await second.claim(on_x.qualname, on_x.names, 10, lease_s=30) == []
        assert await first.renew([claimed], 30) == []


async def test_a_failed_publish_in_the_callers_transaction_is_publish_failed(
    schema: str, db: asyncpg.Connection
) -> None:
    async with Bus(_url(schema), consume=False) as bus:
        await db.execute(f"DROP TABLE {schema}.deliveries")
        with pytest.raises(PublishFailed) as failed:
            await bus.options(connection=db).publish("x")
        assert isinstance(failed.value.__cause__, asyncpg.PostgresError)


# A private server killed mid-stream: tests/faults/test_broker_restart.py.


def test_the_regex_is_anchored() -> None:
    assert re.fullmatch(r"\^\(\?:.*\)\$", pattern_regex(["a.*", "b"]))
