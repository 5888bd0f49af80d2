"""What only a durable store can show: restarts, several consumers, leases, retention."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tidings import (
    Bus,
    ConfigurationError,
    Event,
    PublishFailed,
    Retry,
    listener,
)
from tidings.backends._options import redact
from tidings.backends.durable import Outcomes, Stored
from tidings.backends.sqlite import SQLiteBackend
from tidings.cli import app as cli


def _url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'events.db'}"


def _fast(bus: Bus) -> Bus:
    bus.backend.poll_s = 0.01  # type: ignore[attr-defined]
    return bus


async def test_publish_returns_once_the_event_is_stored(tmp_path: Path) -> None:
    async with Bus(_url(tmp_path), consume=False) as bus:
        await bus.publish("x", n=1)
        with sqlite3.connect(tmp_path / "events.db") as db:
            assert db.execute("SELECT name FROM tidings_events").fetchall() == [("x",)]


async def test_an_event_is_deleted_once_no_joined_listener_needs_it(tmp_path: Path) -> None:
    @listener("x")
    async def kept() -> None:
        pass

    @listener("x")
    async def removed() -> None:
        pass

    def count(table: str) -> int:
        with sqlite3.connect(tmp_path / "events.db") as db:
            (n,) = db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()
            return int(n)

    backend = SQLiteBackend(tmp_path / "events.db", poll_interval=0.01)
    async with Bus(_url(tmp_path), listeners=[kept, removed], consume=False):
        pass  # both joined
    async with Bus(backend, listeners=[kept]) as bus:
        for _ in range(100):
            bus.emit("x")
        await bus.drain()
        await backend._cleanup()
        assert count("tidings_events") == 100  # the removed listener's deliveries wait
        assert await bus.forget_listener(removed.qualname) is True
        await backend._cleanup()
    assert (count("tidings_events"), count("tidings_deliveries")) == (0, 0)


def test_urls() -> None:
    backend = Bus("sqlite:///some/dir/events.db?create_dirs=1").backend
    assert isinstance(backend, SQLiteBackend)
    assert backend.path == "some/dir/events.db"
    assert Bus("sqlite:////tmp/events.db").backend.path == "/tmp/events.db"  # type: ignore[attr-defined]
    assert Bus("sqlite:///x.db?max_lost_runs=2").backend.max_lost_runs == 2  # type: ignore[attr-defined]
    assert Bus("sqlite:///x.db?stale_after=60").backend.stale_listener_s == 60  # type: ignore[attr-defined]
    with pytest.raises(ConfigurationError, match="names no database file"):
        Bus("sqlite://")
    with pytest.raises(ConfigurationError, match="codec must be one of json, msgpack"):
        Bus("sqlite:///x.db?codec=pickle")
    with pytest.raises(ConfigurationError, match=r"bad 'max_lost_runs' in 'sqlite:///x\.db"):
        Bus("sqlite:///x.db?max_lost_runs=many")
    with pytest.raises(ConfigurationError, match="max_lost_runs must be 0 or more, not -1"):
        Bus("sqlite:///x.db?max_lost_runs=-1")
    with pytest.raises(ConfigurationError, match="unknown option 'nope'"):
        Bus("sqlite:///x.db?nope=1")
    assert redact("redis://user:secret@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact("sqlite:///x.db") == "sqlite:///x.db"
    with pytest.raises(ConfigurationError) as info:
        Bus("nope://user:secret@host")
    assert "secret" not in str(info.value)


@pytest.mark.parametrize(
    ("query", "option"),
    [
        ("batch=0", "batch"),
        ("lease=0", "lease"),
        ("lease=-1", "lease"),
        ("poll_interval=0", "poll_interval"),
        ("poll_interval=nan", "poll_interval"),
        ("concurrency=0", "concurrency"),
    ],
)
def test_options_out_of_range_are_refused_by_name(query: str, option: str) -> None:
    with pytest.raises(ConfigurationError, match=f"^{option} must be"):
        Bus(f"sqlite:///x.db?{query}")


async def test_a_row_whose_name_is_not_text_is_a_dead_letter_and_the_rest_runs(
    tmp_path: Path,
) -> None:
    # (SQLite stores any type in any column; headers that are not JSON: the fault suite.)
    got: list[int] = []

    @listener("x")
    async def on_x(n: int) -> None:
        got.append(n)

    async with Bus(_url(tmp_path), listeners=[on_x], consume=False) as producer:
        await producer.publish("x", n=1)
        with sqlite3.connect(tmp_path / "events.db") as db:
            db.execute(
                "INSERT INTO tidings_events (id, name, data, headers, created, due) "
                "VALUES ('bad-name', x'ff', x'7b7d', NULL, 0, 0)"
            )
        await producer.publish("x", n=2)
    async with _fast(Bus(_url(tmp_path), listeners=[on_x])) as worker:
        await worker.drain()
        dead = {d.event.id: d.error for d in await worker.list_dead_letters()}
    assert sorted(got) == [1, 2]
    assert set(dead) == {"bad-name"}
    assert dead["bad-name"].startswith("PayloadError: the stored row of event 'bad-name' is not")


_OLD_SCHEMA = """
CREATE TABLE tidings_events (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL,
    name TEXT NOT NULL, data BLOB NOT NULL, headers TEXT, created REAL NOT NULL,
    due REAL NOT NULL);
CREATE TABLE tidings_listeners (listener TEXT PRIMARY KEY, names TEXT NOT NULL,
    position INTEGER NOT NULL);
CREATE TABLE tidings_deliveries (listener TEXT NOT NULL, seq INTEGER NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0, due REAL NOT NULL,
    lease_until REAL NOT NULL DEFAULT 0, owner TEXT, dead INTEGER NOT NULL DEFAULT 0,
    error TEXT, traceback TEXT, failed_at REAL, PRIMARY KEY (listener, seq)) WITHOUT ROWID;
"""


async def test_a_file_of_an_older_version_is_migrated_and_its_events_delivered(
    tmp_path: Path,
) -> None:
    got: list[int] = []

    @listener("x")
    async def on_x(n: int) -> None:
        got.append(n)

    with sqlite3.connect(tmp_path / "events.db") as db:
        db.executescript(_OLD_SCHEMA)
        db.execute("INSERT INTO tidings_listeners VALUES (?, 'x', 0)", (on_x.qualname,))
        db.execute(
            "INSERT INTO tidings_events (id, name, data, headers, created, due) "
            "VALUES ('old', 'x', ?, NULL, 0, 0)",
            (b'{"args":[],"kwargs":{"n":7},"obj":null}',),
        )
    async with _fast(Bus(_url(tmp_path), listeners=[on_x])) as bus:
        await bus.drain()
        assert await bus.list_dead_letters() == []
    assert got == [7]


async def test_a_frozen_workers_lease_goes_by_the_injected_clock(tmp_path: Path) -> None:
    @listener("x", retry=Retry(attempts=5))
    async def on_x() -> None:
        pass

    first = SQLiteBackend(tmp_path / "events.db", consume=False)
    second = SQLiteBackend(tmp_path / "events.db", consume=False)
    async with Bus(first, listeners=[on_x]) as bus, Bus(second, listeners=[on_x]):
        await bus.publish("x")
        (stale,) = await first.claim(on_x.qualname, on_x.names, 10, lease_s=30)
        assert await second.claim(on_x.qualname, on_x.names, 10, lease_s=30) == []
        second.clock = lambda: time.time() + 31  # past the lease, without waiting for it
        (taken,) = await second.claim(on_x.qualname, on_x.names, 10, lease_s=30)
        assert (taken.attempt, taken.lost) == (2, True)
        assert await first.renew([stale], 30) == [stale]
        await first.settle(Outcomes(acks=[stale]))
        assert (await bus.listener_stats())[on_x.qualname].in_flight == 1


def test_tidings_listeners_forget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from .. import cli_app

    @listener("order.*")
    async def removed() -> None:
        pass

    removed.qualname = "tests.removed_since"
    monkeypatch.setenv("TIDINGS_TEST_URL", _url(tmp_path))

    async def join() -> None:
        async with Bus(_url(tmp_path), listeners=[removed], consume=False):
            pass  # joined by an older version of the app

    asyncio.run(join())
    runner = CliRunner(env={"COLUMNS": "250"})
    target = "tests.cli_app:make_bus()"
    result = runner.invoke(cli, ["stats", target])
    assert result.exit_code == 0, result.output
    assert "last seen" in result.output
    assert "never" in result.output
    assert removed.qualname in result.output
    result = runner.invoke(cli, ["listeners", "forget", target, removed.qualname])
    assert result.exit_code == 0, result.output
    assert f"forgot listener {removed.qualname!r}" in result.output
    result = runner.invoke(cli, ["stats", target])
    assert removed.qualname not in result.output
    result = runner.invoke(cli, ["listeners", "forget", target, removed.qualname])
    assert result.exit_code == 1
    assert "no listener" in result.output
    result = runner.invoke(cli, ["listeners", "forget", target, cli_app.audit.qualname])
    assert result.exit_code == 1
    assert "remove it from the code first" in result.output
    result = runner.invoke(cli, ["listeners", "forget", target])
    assert result.exit_code == 2  # a usage error, as for any command
    assert "forget takes APP NAME: tidings listeners forget APP NAME" in result.output


async def test_listeners_nobody_claims_for_are_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    @listener("x")
    async def gone() -> None:
        pass

    @listener("y")
    async def running() -> None:
        pass

    async with _fast(Bus(_url(tmp_path), listeners=[gone])) as bus:
        await bus.drain()  # gone has claimed once
    backend = SQLiteBackend(tmp_path / "events.db", poll_interval=0.01, stale_after=3600)
    async with Bus(backend, listeners=[running]) as bus:
        await bus.drain()
        backend.clock = lambda: time.time() + 7200
        with caplog.at_level(logging.WARNING, "tidings.backends.durable"):
            await backend._check_stale()
    warned = [r.getMessage() for r in caplog.records if "no process has claimed" in r.getMessage()]
    assert len(warned) == 1
    assert gone.qualname in warned[0]


async def test_events_not_stored_by_close_are_reported_by_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = SQLiteBackend(tmp_path / "events.db", consume=False, busy_timeout=0.01)
    bus = Bus(backend)
    await bus.start()
    locker = sqlite3.connect(tmp_path / "events.db", isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")  # another process holds the file: an outage
        events = [Event("x") for _ in range(3)]
        for event in events:
            backend.put(event, (), contextvars.copy_context())
        with caplog.at_level(logging.ERROR):
            await bus.aclose(timeout=0.2)
    finally:
        locker.close()
    (closing,) = [r.getMessage() for r in caplog.records if r.name == "tidings.bus"]
    assert "3 undelivered event(s)" in closing
    assert all(event.id in closing for event in events)


async def test_shutdown_is_bounded_while_a_claim_hangs(tmp_path: Path) -> None:
    @listener("x")
    async def on_x() -> None:
        pass

    backend = SQLiteBackend(tmp_path / "events.db", busy_timeout=3)
    bus = _fast(Bus(backend, listeners=[on_x]))
    await bus.start()
    locker = sqlite3.connect(tmp_path / "events.db", isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")  # the next claim waits for the lock
        began = time.monotonic()
        await bus.aclose(timeout=0.2)
        assert time.monotonic() - began < 2.5  # not the lock's 3s, nor more
    finally:
        locker.close()
        await backend.disconnect()  # once the lock is gone, the connection closes


class _SlowToStore(SQLiteBackend):
    """Stores the events named ``follow`` only once ``opened`` is set; records writes."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.opened = asyncio.Event()
        self.writes: list[str] = []

    async def store(self, records: Sequence[Stored]) -> None:
        if any(r.name == "follow" for r in records):
            await self.opened.wait()
            self.writes.append("follow stored")
        await super().store(records)

    async def settle(self, outcomes: Outcomes) -> None:
        if outcomes.acks:
            self.writes.append("ack")
        await super().settle(outcomes)


async def test_an_ack_waits_for_the_events_its_listener_emitted(tmp_path: Path) -> None:
    ran = asyncio.Event()

    @listener("x")
    async def on_x() -> None:
        bus.emit("follow")
        ran.set()

    backend = _SlowToStore(tmp_path / "events.db", poll_interval=0.01)
    async with Bus(backend, listeners=[on_x]) as bus:
        bus.emit("x")
        await ran.wait()
        await asyncio.sleep(0.1)  # time for an ack written too early
        backend.opened.set()
        await bus.drain()
    assert backend.writes[:2] == ["follow stored", "ack"]


def test_a_missing_directory_is_refused_unless_asked_to_create_it(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(ConfigurationError, match=r"does not exist.*create_dirs=true"):
        Bus(f"sqlite:///{missing / 'e.db'}")
    assert not missing.exists()
    Bus(f"sqlite:///{missing / 'e.db'}?create_dirs=true")
    Bus(f"sqlite:///{tmp_path / 'e.db'}")  # an existing directory needs nothing


async def test_create_dirs_makes_the_directory_at_start(tmp_path: Path) -> None:
    missing = tmp_path / "new"
    async with Bus(f"sqlite:///{missing / 'e.db'}?create_dirs=true"):
        pass
    assert (missing / "e.db").exists()


async def test_publish_with_a_delay_returns_once_the_event_is_stored(tmp_path: Path) -> None:
    async with Bus(_url(tmp_path), consume=False) as bus:
        await bus.options(delay=60).publish("later", n=1)
        with sqlite3.connect(tmp_path / "events.db") as db:
            assert db.execute("SELECT name FROM tidings_events").fetchall() == [("later",)]


async def test_publish_with_a_delay_fails_when_the_store_is_out_of_reach(tmp_path: Path) -> None:
    backend = SQLiteBackend(tmp_path / "events.db", consume=False, busy_timeout=0.01)
    async with Bus(backend) as bus:
        locker = sqlite3.connect(tmp_path / "events.db", isolation_level=None)
        try:
            locker.execute("BEGIN EXCLUSIVE")  # another process holds the file
            with pytest.raises(PublishFailed, match="was not stored"):
                await bus.options(delay=60).publish("later", n=1)
        finally:
            locker.close()


async def test_a_claim_with_nothing_to_do_takes_no_write_lock(tmp_path: Path) -> None:
    @listener("x")
    async def on_x() -> None:
        pass

    # A write would wait at most 10ms for the lock held below, then fail.
    backend = SQLiteBackend(tmp_path / "events.db", consume=False, busy_timeout=0.01)
    async with Bus(backend, listeners=[on_x]):
        assert await backend.claim(on_x.qualname, on_x.names, 10, lease_s=30) == []
        backend._quiet.clear()  # claim again, not only remember that nothing came
        locker = sqlite3.connect(tmp_path / "events.db", isolation_level=None)
        try:
            locker.execute("BEGIN IMMEDIATE")  # another process writes meanwhile
            assert await backend.claim(on_x.qualname, on_x.names, 10, lease_s=30) == []
        finally:
            locker.close()


async def test_a_listener_the_store_refuses_to_join_once_started_holds_back_no_event(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[int] = []

    @listener("x")
    async def kept(n: int) -> None:
        seen.append(n)

    @listener("y", name="tests.refused")
    async def refused() -> None:
        pass

    bus = _fast(Bus(_url(tmp_path), listeners=[kept]))
    backend = bus.backend
    assert isinstance(backend, SQLiteBackend)
    join = backend.join

    async def refusing(listener: str, names: Sequence[str]) -> None:
        if listener == "tests.refused":
            raise sqlite3.IntegrityError("refused")  # as the store refuses what it holds
        await join(listener, names)

    backend.join = refusing  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, "tidings.backends.durable"):
        async with bus:
            bus.subscribe(refused)
            await asyncio.wait_for(bus.publish("x", n=1), 5)
            await asyncio.wait_for(bus.drain(), 5)
            assert backend.stats()["consumers"] == 1
            assert "tests.refused" not in await bus.listener_stats()
    assert seen == [1]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("refuses to join listener tests.refused" in m for m in errors)
    assert not any("retrying" in m for m in errors)


async def test_a_listener_subscribed_while_the_bus_starts_is_checked_joined_and_run(
    tmp_path: Path,
) -> None:
    seen: list[int] = []

    @listener("a")
    async def first() -> None:
        pass

    @listener("x", name="tests.late")
    async def late(n: int) -> None:
        seen.append(n)

    @listener("x", name="tests.late")
    async def same_name(n: int) -> None:
        seen.append(-n)

    bus = _fast(Bus(_url(tmp_path), listeners=[first]))
    backend = bus.backend
    assert isinstance(backend, SQLiteBackend)
    join = backend.join
    refused: list[ConfigurationError] = []

    async def subscribing(listener: str, names: Sequence[str]) -> None:
        if listener == first.qualname:
            # As another task or thread would, while start waits for the store.
            bus.subscribe(late)
            try:
                bus.subscribe(same_name)
            except ConfigurationError as exc:
                refused.append(exc)
        await join(listener, names)

    backend.join = subscribing  # type: ignore[method-assign]
    async with bus:
        await bus.publish("x", n=1)
        await asyncio.wait_for(bus.drain(), 5)
        assert "tests.late" in await bus.listener_stats()
        assert backend.stats()["consumers"] == 2
    assert seen == [1]
    (error,) = refused
    assert "two listeners are named tests.late" in str(error)


async def test_concurrency_holds_across_an_unsubscribe_and_subscribe_while_it_runs(
    tmp_path: Path,
) -> None:
    running: list[int] = []
    peak = 0
    started = asyncio.Event()
    beside = asyncio.Event()
    release = asyncio.Event()

    @listener("x", name="tests.serial", concurrency=1)
    async def serial(n: int) -> None:
        nonlocal peak
        running.append(n)
        peak = max(peak, len(running))
        started.set()
        if len(running) > 1:
            beside.set()
        await release.wait()
        running.remove(n)

    bus = _fast(Bus(_url(tmp_path), listeners=[serial]))
    backend = bus.backend
    assert isinstance(backend, SQLiteBackend)
    async with bus:
        for n in range(3):
            await bus.publish("x", n=n)
        await asyncio.wait_for(started.wait(), 5)
        (sub,) = bus.registry.subscriptions()
        sub.unsubscribe()
        bus.subscribe(serial)  # again, while its first delivery still runs
        await asyncio.wait_for(backend._listeners_joined(), 5)
        # Were the running delivery not counted, the new consumer would start another.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(beside.wait(), 0.3)
        assert running == [0]
        release.set()
        await asyncio.wait_for(bus.drain(), 5)
    assert peak == 1
    assert not running
