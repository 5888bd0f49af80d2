"""tidings.forward.bridge: events re-published on another backend."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from tidings import Bus, ConfigurationError, Event, Retry, forward, listener


async def test_a_memory_bus_bridges_events_into_a_sqlite_store(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'bridged.db'}?poll_interval=0.01"
    received: list[tuple[str, dict[str, object], dict[str, str]]] = []

    @listener("order.*")
    async def ship(event: Event) -> None:
        received.append((event.name, event.kwargs, dict(event.headers)))

    bridge = forward.bridge(url, "order.*")
    assert bridge.qualname == f"tidings.forward.bridge(sqlite:///{tmp_path / 'bridged.db'})"
    async with Bus(url, listeners=[ship]) as store:  # joins ship to the store, and runs it
        async with Bus(listeners=[bridge]) as web:
            for n in range(20):
                await web.publish("order.paid", order_id=n)
            await web.publish("user.created", name="Ada")  # not bridged
            await web.drain()
            assert web.dead_letters() == []
            # The bridge's own bus is open until this one closes.
            target = bridge.forwarder._connections[asyncio.get_running_loop()]  # type: ignore[attr-defined]
            assert target.started
        assert target._closed
        await store.drain()
    assert sorted(kwargs["order_id"] for _, kwargs, _ in received) == list(range(20))  # type: ignore[type-var]
    assert {name for name, _, _ in received} == {"order.paid"}


async def test_a_bridge_into_a_bus_object_keeps_the_payload_and_headers(tmp_path: Path) -> None:
    got: list[Event] = []

    @listener("report.*")
    def keep(event: Event) -> None:
        got.append(event)

    url = f"sqlite:///{tmp_path / 'source.db'}?poll_interval=0.01"
    async with Bus(listeners=[keep]) as target:
        bridge = forward.bridge(target, "report.*", retry=Retry(attempts=2, backoff=0))
        assert bridge.qualname == "tidings.forward.bridge(memory://)"
        async with Bus(url, listeners=[bridge]) as source:
            await source.options(headers={"traceparent": "00-abc"}).publish(
                "report.due", 3, report="r1", headers="payload too"
            )
            await source.drain()
        await target.drain()
        assert target.started  # the caller's bus stays the caller's
    (event,) = got
    assert (event.name, event.args, event.kwargs) == (
        "report.due",
        (3,),
        {"report": "r1", "headers": "payload too"},
    )
    assert event.headers == {"traceparent": "00-abc"}


def test_a_bridge_needs_names_and_a_bus_that_outlives_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"bridge\(sqlite:///.*\) forwards no event name"):
        forward.bridge(f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(ConfigurationError, match="pass the started Bus itself"):
        forward.bridge("memory://", "order.*")


@dataclasses.dataclass
class Paid:
    __event_name__ = "order.paid"
    order_id: int


async def test_a_typed_event_crosses_a_bridge_from_a_durable_store(tmp_path: Path) -> None:
    got: list[Paid] = []

    @listener(Paid)
    def keep(paid: Paid) -> None:
        got.append(paid)

    url = f"sqlite:///{tmp_path / 'typed.db'}?poll_interval=0.01"
    async with Bus(listeners=[keep]) as target:
        bridge = forward.bridge(target, Paid, retry=1)
        async with Bus(url, listeners=[bridge]) as source:
            await source.publish(Paid(order_id=3))
            await source.drain()
            assert await source.list_dead_letters() == []
        await target.drain()
        assert target.dead_letters() == []
    assert got == [Paid(order_id=3)]
