"""A delivery stays its process's until its outcome is written: its lease is renewed
meanwhile, and the same process never runs it again when the store hands it back. A
delivery stopped while its sync listener's thread runs on stays its process's until the
thread returns, even past closing."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from tidings import Bus, Event, Retry, listener
from tidings.backends.durable import Claimed, Outcomes
from tidings.backends.sqlite import SQLiteBackend


class _SlowToSettle(SQLiteBackend):
    """Writes outcomes only once ``opened`` is set; tells of claims and renewals."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.opened = asyncio.Event()
        self.settling = asyncio.Event()
        self.claims = 0
        self.claimed_twice = asyncio.Event()
        self.renewed: list[int] = []
        self.renewing = asyncio.Event()

    async def settle(self, outcomes: Outcomes) -> None:
        if outcomes:
            self.settling.set()
            await self.opened.wait()
        await super().settle(outcomes)

    async def claim(
        self, listener: str, names: Sequence[str], limit: int, lease_s: float
    ) -> list[Claimed]:
        claimed = await super().claim(listener, names, limit, lease_s)
        if claimed:
            self.claims += 1
            if self.claims >= 2:
                self.claimed_twice.set()
        return claimed

    async def renew(self, claimed: Sequence[Claimed], lease_s: float) -> list[Claimed]:
        self.renewed += [c.attempt for c in claimed]
        self.renewing.set()
        return await super().renew(claimed, lease_s)


async def test_a_delivery_handed_back_before_its_ack_is_written_runs_once(
    tmp_path: Path,
) -> None:
    runs: list[int] = []

    @listener("x")
    async def on_x(n: int) -> None:
        runs.append(n)

    backend = _SlowToSettle(tmp_path / "events.db", poll_interval=0.01, lease=30)
    async with Bus(backend, listeners=[on_x]) as bus:
        await bus.publish("x", n=1)
        await backend.settling.wait()  # ran; its ack is not written yet
        backend.clock = lambda: time.time() + 31  # its lease ran out meanwhile
        await backend.claimed_twice.wait()  # the store handed it back to this process
        backend.opened.set()
        await bus.drain()
        stats = (await bus.listener_stats())[on_x.qualname]
        assert (stats.pending, stats.in_flight, stats.dead) == (0, 0, 0)
    assert runs == [1]


async def test_a_delivery_handed_back_before_its_burial_is_written_is_one_dead_letter(
    tmp_path: Path,
) -> None:
    dead: list[str] = []

    @listener("x", retry=Retry(attempts=1))
    async def on_x() -> None:
        raise ValueError("no")

    backend = _SlowToSettle(tmp_path / "events.db", poll_interval=0.01, lease=30)
    on_dead = lambda event, fn, exc: dead.append(event.id)  # noqa: E731
    async with Bus(backend, listeners=[on_x], on_dead=on_dead) as bus:
        await bus.publish("x")
        await backend.settling.wait()
        backend.clock = lambda: time.time() + 31
        await backend.claimed_twice.wait()
        backend.opened.set()
        await bus.drain()
        (letter,) = await bus.list_dead_letters()
    assert dead == [letter.event.id]


async def test_the_lease_of_a_delivery_is_renewed_until_its_outcome_is_written(
    tmp_path: Path,
) -> None:
    @listener("x")
    async def on_x() -> None:
        pass

    backend = _SlowToSettle(tmp_path / "events.db", poll_interval=0.01, lease=1.0)
    async with Bus(backend, listeners=[on_x]) as bus:
        await bus.publish("x")
        await backend.settling.wait()  # ran; its ack is not written yet
        backend.renewed.clear()
        backend.renewing.clear()
        await asyncio.wait_for(backend.renewing.wait(), 10)
        assert backend.renewed == [1]  # its first claim's, not one reclaimed
        backend.opened.set()
        await bus.drain()


class _Gated:
    """A sync listener's thread held until ``gate`` opens; ``started`` is set on the loop
    once it runs."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = asyncio.Event()
        self.loop = asyncio.get_running_loop()

    def hold(self) -> None:
        self.loop.call_soon_threadsafe(self.started.set)
        self.gate.wait(30)


async def _stats(path: Path, name: str) -> tuple[int, int, int, int]:
    """(pending, retrying, in flight, dead) of listener ``name`` in the store at ``path``."""
    async with Bus(f"sqlite:///{path}", consume=False) as bus:
        s = (await bus.listener_stats())[name]
        return s.pending, s.retrying, s.in_flight, s.dead


async def test_a_delivery_whose_thread_outlived_closing_is_buried_when_it_raises(
    tmp_path: Path,
) -> None:
    gated = _Gated()
    dead: list[str] = []

    @listener("x", retry=Retry(attempts=1))
    def fails() -> None:
        gated.hold()
        raise ValueError("late")

    backend = SQLiteBackend(tmp_path / "events.db", poll_interval=0.01)
    on_dead = lambda event, fn, exc: dead.append(str(exc))  # noqa: E731
    bus = Bus(backend, listeners=[fails], on_dead=on_dead)
    try:
        await bus.start()
        bus.emit("x")
        await gated.started.wait()
        await bus.aclose(timeout=0)
    finally:
        gated.gate.set()
    await backend.wait_closed()  # the thread returned, and its outcome was written
    assert dead == ["late"]
    assert await _stats(tmp_path / "events.db", fails.qualname) == (0, 0, 0, 1)


async def test_a_timed_out_delivery_whose_thread_outlived_closing_is_retried(
    tmp_path: Path,
) -> None:
    gated = _Gated()
    attempts: list[int] = []

    @listener("x", timeout=0.01, retry=Retry(attempts=2, backoff=0, jitter=0))
    def slow(event: Event) -> None:
        attempts.append(event.attempt)
        if event.attempt == 1:
            gated.hold()  # returns, but long after its timeout

    path = tmp_path / "events.db"
    backend = SQLiteBackend(path, poll_interval=0.01)
    bus = Bus(backend, listeners=[slow])
    try:
        await bus.start()
        bus.emit("x")
        await gated.started.wait()
        await asyncio.sleep(0.1)  # past its timeout: it waits for its thread
        await bus.aclose(timeout=0)
    finally:
        gated.gate.set()
    await backend.wait_closed()
    assert await _stats(path, slow.qualname) == (1, 0, 0, 0)  # its retry is due
    async with Bus(f"sqlite:///{path}?poll_interval=0.01", listeners=[slow]) as again:
        await again.drain()
    assert attempts == [1, 2]


def test_a_stopped_delivery_is_left_to_its_lease_when_the_loop_stops_first(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gate = threading.Event()
    started = threading.Event()

    @listener("x")
    def blocked() -> None:
        started.set()
        gate.wait(30)

    path = tmp_path / "events.db"
    url = f"sqlite:///{path}?poll_interval=0.01"
    try:
        with Bus(url, listeners=[blocked], shutdown_timeout=0) as bus:
            bus.emit("x")
            assert started.wait(30)
        # The bus's loop stopped with it, while the thread runs on.
        assert "their leases are left to expire" in caplog.text
        assert asyncio.run(_stats(path, blocked.qualname)) == (0, 0, 1, 0)
    finally:
        gate.set()
