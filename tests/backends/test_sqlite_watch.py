"""An idle SQLite consumer is woken by new events at once, not at its next poll."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from tidings import Bus, listener
from tidings.backends._sqlite_watch import Watch
from tidings.backends.sqlite import SQLiteBackend

# Far longer than any test waits: a delivery that arrives came from a wake-up, not a poll.
_POLL = "poll_interval=60"
# Generous, for a loaded machine: still far below the poll interval.
_ARRIVES_S = 20.0

_PRODUCER = """
import asyncio, sys
from tidings import Bus

async def main() -> None:
    async with Bus(sys.argv[1], consume=False) as bus:
        await bus.publish("x", n=int(sys.argv[2]))

asyncio.run(main())
"""


def _url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'events.db'}?{_POLL}"


async def test_an_event_published_in_the_same_process_wakes_its_consumer(
    tmp_path: Path,
) -> None:
    got: asyncio.Queue[int] = asyncio.Queue()

    @listener("x")
    async def on_x(n: int) -> None:
        got.put_nowait(n)

    async with Bus(_url(tmp_path), listeners=[on_x]) as bus:
        await bus.drain()  # the consumer has claimed once, found nothing, and waits
        await bus.publish("x", n=1)
        assert await asyncio.wait_for(got.get(), _ARRIVES_S) == 1


async def test_an_event_stored_by_another_process_wakes_an_idle_worker(tmp_path: Path) -> None:
    got: asyncio.Queue[int] = asyncio.Queue()

    @listener("x")
    async def on_x(n: int) -> None:
        got.put_nowait(n)

    async with Bus(_url(tmp_path), listeners=[on_x]) as worker:
        await worker.drain()  # idle: the next poll is a minute away
        for n in (1, 2):
            producer = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _PRODUCER, _url(tmp_path), str(n)
            )
            assert await producer.wait() == 0
            assert await asyncio.wait_for(got.get(), _ARRIVES_S) == n


async def test_a_watch_sees_commits_of_other_connections_only(tmp_path: Path) -> None:
    bus = Bus(_url(tmp_path), consume=False)
    async with bus:
        watch = Watch(str(tmp_path / "events.db"))
        try:
            before = watch.version()
            assert watch.version() == before
            await bus.publish("x", n=1)
            assert watch.version() != before
        finally:
            await watch.aclose()


async def test_a_busy_consumer_still_reclaims_an_expired_lease_alone(tmp_path: Path) -> None:
    @listener("x")
    async def on_x(n: int) -> None:
        pass

    first = SQLiteBackend(tmp_path / "events.db", consume=False)
    second = SQLiteBackend(tmp_path / "events.db", consume=False)
    now = time.time() + 5  # the events published below are due by then
    second.clock = lambda: now
    async with Bus(first, listeners=[on_x]) as bus, Bus(second, listeners=[on_x]):
        await bus.publish("x", n=1)
        (stale,) = await first.claim(on_x.qualname, on_x.names, 10, lease_s=30)
        assert await second.claim(on_x.qualname, on_x.names, 10, lease_s=30) == []
        await bus.publish("x", n=2)
        (busy,) = await second.claim(on_x.qualname, on_x.names, 10, lease_s=30)
        assert (busy.record.id, busy.lost) != (stale.record.id, True)
        await bus.publish("x", n=3)
        now += 31  # past the first lease, while new events keep coming
        (taken,) = await second.claim(on_x.qualname, on_x.names, 10, lease_s=30)
        assert (taken.record.id, taken.attempt, taken.lost) == (stale.record.id, 2, True)


async def test_a_delayed_event_is_claimed_once_due_with_nothing_committed_since(
    tmp_path: Path,
) -> None:
    @listener("x")
    async def on_x(n: int) -> None:
        pass

    backend = SQLiteBackend(tmp_path / "events.db", consume=False)
    now = time.time()
    backend.clock = lambda: now
    async with Bus(backend, listeners=[on_x]) as bus:
        await bus.options(delay=60).publish("x", n=1)
        assert await backend.claim(on_x.qualname, on_x.names, 10, lease_s=30) == []
        assert await backend.claim(on_x.qualname, on_x.names, 10, lease_s=30) == []
        now += 61
        (claimed,) = await backend.claim(on_x.qualname, on_x.names, 10, lease_s=30)
        assert claimed.record.name == "x"
