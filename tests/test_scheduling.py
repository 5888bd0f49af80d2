"""Cron schedules: on time, and once per tick across workers."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path

import pydantic
import pytest

from tidings import Bus, ConfigurationError, Event, listener
from tidings.scheduling import Schedule


def test_ticks_follow_the_expression() -> None:
    every_five = Schedule("*/5 * * * *", "report.due")
    assert every_five.next_after(0) == 300.0
    assert every_five.next_after(300) == 600.0
    assert Schedule("* * * * * */10", "x").next_after(5) == 10.0
    assert every_five.key == "report.due @ */5 * * * *"


def test_bad_schedules_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="not a cron expression"):
        Bus().schedule("every monday", "report.due")
    with pytest.raises(ConfigurationError, match="event name"):
        Bus().schedule("* * * * *", "")


async def test_a_schedule_emits_its_event_with_its_payload() -> None:
    seen: list[tuple[str, str]] = []
    two = asyncio.Event()

    @listener("report.due")
    async def report(kind: str, event: Event) -> None:
        seen.append((kind, event.headers["tidings-cron-tick"]))
        if len(seen) == 2:
            two.set()

    bus = Bus(listeners=[report])
    bus.schedule("* * * * * *", "report.due", kind="daily")
    async with bus:
        await asyncio.wait_for(two.wait(), 5)
    assert [kind for kind, _ in seen[:2]] == ["daily", "daily"]
    assert float(seen[1][1]) - float(seen[0][1]) == 1.0


async def test_the_cron_decorator() -> None:
    ran = asyncio.Event()
    bus = Bus()

    @bus.cron("* * * * * *")
    async def cleanup() -> None:
        ran.set()

    assert cleanup.names == ("cron.cleanup",)
    async with bus:
        await asyncio.wait_for(ran.wait(), 5)


async def test_several_workers_fire_each_tick_once(tmp_path: Path) -> None:
    ticks: collections.Counter[str] = collections.Counter()
    enough = asyncio.Event()

    def make() -> Bus:
        @listener("tick")
        async def on_tick(event: Event) -> None:
            ticks[event.headers["tidings-cron-tick"]] += 1
            if len(ticks) >= 3:
                enough.set()

        on_tick.qualname = "tests.on_tick"
        bus = Bus(f"sqlite:///{tmp_path / 'cron.db'}?poll_interval=0.01", listeners=[on_tick])
        bus.schedule("* * * * * *", "tick")
        return bus

    a, b, producer = make(), make(), make()
    producer.backend.consume = False
    async with a, b, producer:
        await asyncio.wait_for(enough.wait(), 10)
        await a.drain()
        await b.drain()
    assert len(ticks) >= 3
    assert set(ticks.values()) == {1}


def test_an_expression_that_never_fires_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"'0 0 30 2 \*' never fires"):
        Bus().schedule("0 0 30 2 *", "report.due")
    with pytest.raises(ConfigurationError, match="wildcard"):
        Bus().schedule("* * * * *", "report.*")


class _Strict(pydantic.BaseModel):
    n: int


class _Fading(Schedule):
    """A schedule with one tick, and none after it."""

    def next_after(self, timestamp: float) -> float:
        if timestamp > 1e9 and getattr(self, "_fired", False):
            raise ValueError("failed to find next date")
        object.__setattr__(self, "_fired", True)
        return super().next_after(timestamp)


async def test_a_schedule_that_fails_stops_no_other(caplog: pytest.LogCaptureFixture) -> None:
    ticks: collections.Counter[str] = collections.Counter()
    three = asyncio.Event()

    @listener("a", "b", "fading")
    async def tick(event: Event) -> None:
        ticks[event.name] += 1
        if ticks["b"] == 3:
            three.set()

    bus = Bus(listeners=[tick])
    bus.schedule("* * * * * *", "a")
    bus.schema("a", _Strict)  # every tick of "a" fails to publish
    bus.scheduler.entries.append(_Fading("* * * * * *", "fading"))
    bus.schedule("* * * * * *", "b")
    async with bus:
        await asyncio.wait_for(three.wait(), 10)
    assert ticks["a"] == 0
    assert ticks["b"] >= 3
    assert "could not fire its tick" in caplog.text
    assert "has no tick after" in caplog.text
