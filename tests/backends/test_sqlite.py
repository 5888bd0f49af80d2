"""What only a durable store can show: restarts, several consumers, leases, retention."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from tidings import Bus, ConfigurationError, Event, Retry, listener
from tidings.backends.base import redact
from tidings.backends.sqlite import SQLiteBackend


def _url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'events.db'}"


def _fast(bus: Bus) -> Bus:
    bus.backend.poll_s = 0.01  # type: ignore[attr-defined]
    return bus


async def test_events_stored_before_any_worker_ran_reach_it(tmp_path: Path) -> None:
    seen: list[int] = []

    @listener("user.created")
    async def welcome(n: int) -> None:
        seen.append(n)

    async with Bus(_url(tmp_path), listeners=[welcome], consume=False) as producer:
        for n in range(100):
            producer.emit("user.created", n=n)
        await producer.publish("user.created", n=100)
    assert seen == []
    async with _fast(Bus(_url(tmp_path), listeners=[welcome])) as worker:
        await worker.drain()
    assert sorted(seen) == list(range(101))


async def test_publish_returns_once_the_event_is_stored(tmp_path: Path) -> None:
    async with Bus(_url(tmp_path), consume=False) as bus:
        await bus.publish("x", n=1)
        with sqlite3.connect(tmp_path / "events.db") as db:
            assert db.execute("SELECT name FROM tidings_events").fetchall() == [("x",)]


async def test_a_listener_added_later_receives_new_events_only(tmp_path: Path) -> None:
    first: list[int] = []
    later: list[int] = []

    @listener("x")
    async def old(n: int) -> None:
        first.append(n)

    @listener("x")
    async def new(n: int) -> None:
        later.append(n)

    async with _fast(Bus(_url(tmp_path), listeners=[old])) as bus:
        bus.emit("x", n=1)
        await bus.drain()
    async with _fast(Bus(_url(tmp_path), listeners=[old, new])) as bus:
        bus.emit("x", n=2)
        await bus.drain()
    assert first == [1, 2]
    assert later == [2]


async def test_two_consumers_on_one_file_never_run_a_delivery_twice(tmp_path: Path) -> None:
    seen: list[tuple[str, int]] = []

    def make(tag: str) -> Bus:
        @listener("job")
        async def job(n: int) -> None:
            await asyncio.sleep(0.01)  # long enough that one consumer cannot take all
            seen.append((tag, n))

        # Both buses run "the same" listener: one qualified name, one delivery per event.
        job.qualname = "tests.job"
        return _fast(Bus(_url(tmp_path), listeners=[job]))

    a, b = make("a"), make("b")
    async with a, b:
        for n in range(500):
            (a if n % 2 else b).emit("job", n=n)
        await a.drain()
        await b.drain()
    assert sorted(n for _, n in seen) == list(range(500))
    assert {tag for tag, _ in seen} == {"a", "b"}


async def test_an_expired_lease_is_reclaimed_with_the_next_attempt(tmp_path: Path) -> None:
    attempts: list[int] = []

    @listener("x", retry=Retry(attempts=5))
    async def on_x(event: Event) -> None:
        attempts.append(event.attempt)

    # A worker that claims and dies: its lease is never renewed nor released.
    dying = SQLiteBackend(tmp_path / "events.db", consume=False)
    async with Bus(dying, listeners=[on_x]) as producer:
        await producer.publish("x")
        claimed = await dying.claim(on_x.qualname, on_x.names, 10, lease_s=0.05)
        assert [c.attempt for c in claimed] == [1]
    async with _fast(Bus(_url(tmp_path), listeners=[on_x])) as bus:
        await bus.drain()
    assert attempts == [2]


async def test_the_attempt_count_survives_a_restart(tmp_path: Path) -> None:
    attempts: list[int] = []
    first = asyncio.Event()

    @listener("x", retry=Retry(attempts=3, backoff=0.05, jitter=0))
    async def flaky(event: Event) -> None:
        attempts.append(event.attempt)
        first.set()
        raise ConnectionError("down")

    bus = _fast(Bus(_url(tmp_path), listeners=[flaky]))
    await bus.start()
    bus.emit("x")
    await first.wait()
    await bus.aclose(timeout=0)  # stops before the retry is due
    assert attempts == [1]
    async with _fast(Bus(_url(tmp_path), listeners=[flaky])) as bus:
        await bus.drain()
        (dead,) = await bus.list_dead_letters()
    assert attempts == [1, 2, 3]
    assert dead.attempts == 3


async def test_a_worker_stopping_hands_back_what_it_did_not_run(tmp_path: Path) -> None:
    started = asyncio.Event()
    runs: list[int] = []

    @listener("slow", concurrency=1)
    async def slow(n: int) -> None:
        runs.append(n)
        started.set()
        await asyncio.sleep(0.05)

    worker = _fast(Bus(_url(tmp_path), listeners=[slow]))
    worker.backend.drain_on_close = False  # type: ignore[attr-defined]
    await worker.start()
    for n in range(10):
        worker.emit("slow", n=n)
    await started.wait()
    await worker.aclose(timeout=5)  # finishes the running one, claims no more
    assert runs == [0]
    async with _fast(Bus(_url(tmp_path), listeners=[slow])) as bus:
        stats = await bus.listener_stats()
        assert stats[slow.qualname].pending == 9
        await bus.drain()
    assert runs == list(range(10))  # nothing lost, nothing repeated


async def test_delivered_events_are_deleted(tmp_path: Path) -> None:
    @listener("x")
    async def on_x() -> None:
        pass

    backend = SQLiteBackend(tmp_path / "events.db", poll_s=0.01)
    async with Bus(backend, listeners=[on_x]) as bus:
        for _ in range(100):
            bus.emit("x")
        await bus.drain()
        await backend._cleanup()
    with sqlite3.connect(tmp_path / "events.db") as db:
        assert db.execute("SELECT COUNT(*) FROM tidings_events").fetchone() == (0,)
        assert db.execute("SELECT COUNT(*) FROM tidings_deliveries").fetchone() == (0,)


async def test_stats_count_what_waits(tmp_path: Path) -> None:
    @listener("x")
    async def on_x() -> None:
        pass

    async with Bus(_url(tmp_path), listeners=[on_x], consume=False) as bus:
        for _ in range(5):
            bus.emit("x")
        bus.options(delay=60).emit("x")
        await bus.drain()
        stats = (await bus.listener_stats())[on_x.qualname]
    assert stats.pending == 5
    assert stats.oldest_age_s is not None


def test_urls() -> None:
    backend = Bus("sqlite:///some/dir/events.db?create_dirs=1").backend
    assert isinstance(backend, SQLiteBackend)
    assert backend.path == "some/dir/events.db"
    assert Bus("sqlite:////tmp/events.db").backend.path == "/tmp/events.db"  # type: ignore[attr-defined]
    assert Bus("sqlite:///x.db?max_lost_runs=2").backend.max_lost_runs == 2  # type: ignore[attr-defined]
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
