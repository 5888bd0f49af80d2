"""A delivery stays its process's until its outcome is written: its lease is renewed
meanwhile, and the same process never runs it again when the store hands it back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

from tidings import Bus, Retry, listener
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
