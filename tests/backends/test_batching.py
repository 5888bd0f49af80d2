"""Batch listeners on every backend: full batches, partial batches after their wait,
retries of a whole batch and a dead letter per event, typed batches."""

from __future__ import annotations

import dataclasses
from decimal import Decimal

from tidings import Event, Retry, listener

from .conftest import BusFactory


@dataclasses.dataclass
class OrderPaid:
    __event_name__ = "order.paid"
    order_id: int
    amount: Decimal


async def test_a_batch_listener_gets_full_batches(make_bus: BusFactory) -> None:
    batches: list[list[int]] = []

    # A wait far past the test's timeout: only full batches can be called.
    @listener("tick", batch=5, batch_wait=3600)
    async def many(events: list[Event]) -> None:
        batches.append([event.kwargs["n"] for event in events])

    async with make_bus(listeners=[many]) as bus:
        for n in range(10):
            await bus.publish("tick", n=n)
        await bus.drain()
    assert [len(batch) for batch in batches] == [5, 5]
    assert sorted(n for batch in batches for n in batch) == list(range(10))


async def test_a_partial_batch_is_called_after_its_wait(make_bus: BusFactory) -> None:
    batches: list[list[int]] = []

    @listener("tick", batch=100, batch_wait=0.05)
    def many(events: list[Event]) -> None:  # a sync one runs in a thread
        batches.append(sorted(event.kwargs["n"] for event in events))

    async with make_bus(listeners=[many]) as bus:
        for n in range(3):
            bus.emit("tick", n=n)  # stored in one write, claimed in one go
        await bus.drain()
    assert batches == [[0, 1, 2]]


async def test_a_failing_batch_is_retried_whole_then_each_event_is_a_dead_letter(
    make_bus: BusFactory,
) -> None:
    calls: list[list[tuple[int, int]]] = []

    @listener("tick", batch=3, batch_wait=3600, retry=Retry(attempts=3, backoff=0.001, jitter=0))
    async def many(events: list[Event]) -> None:
        calls.append(sorted((event.kwargs["n"], event.attempt) for event in events))
        raise ValueError(f"cannot take {len(events)}")

    async with make_bus(listeners=[many]) as bus:
        for n in range(3):
            await bus.publish("tick", n=n)
        await bus.drain()
        dead = await bus.list_dead_letters()
    # The same batch, three times, each event's attempt counting up.
    assert calls == [[(n, attempt) for n in range(3)] for attempt in (1, 2, 3)]
    assert sorted(letter.event.kwargs["n"] for letter in dead) == [0, 1, 2]
    assert {letter.listener for letter in dead} == {many.qualname}
    assert {letter.error for letter in dead} == {"ValueError: cannot take 3"}
    assert all("attempt 3/3" in letter.traceback for letter in dead)


async def test_a_typed_batch_gets_the_objects(make_bus: BusFactory) -> None:
    batches: list[list[OrderPaid]] = []
    by_name: list[list[OrderPaid]] = []

    @listener(OrderPaid, batch=2, batch_wait=3600)
    async def paid(orders: list[OrderPaid]) -> None:
        batches.append(orders)

    # Subscribed by name: the annotation alone ties the name to the class.
    @listener("order.paid", batch=2, batch_wait=3600)
    def paid_too(orders: list[OrderPaid]) -> None:
        by_name.append(orders)

    async with make_bus(listeners=[paid, paid_too]) as bus:
        await bus.publish(OrderPaid(1, Decimal("9.50")))
        await bus.publish(OrderPaid(2, Decimal("20")))
        await bus.drain()
    for got in (batches, by_name):
        assert len(got) == 1
        assert sorted(got[0], key=lambda order: order.order_id) == [
            OrderPaid(1, Decimal("9.50")),
            OrderPaid(2, Decimal("20")),
        ]


async def test_a_succeeded_batch_is_not_delivered_again(make_bus: BusFactory) -> None:
    seen: list[int] = []

    @listener("tick", batch=4, batch_wait=3600)
    async def many(events: list[Event]) -> None:
        seen.extend(event.kwargs["n"] for event in events)

    async with make_bus(listeners=[many]) as bus:
        for n in range(4):
            await bus.publish("tick", n=n)
        await bus.drain()
    # A second bus on the same store (the same file, prefix or schema) finds nothing due.
    async with make_bus(listeners=[many]) as bus:
        await bus.drain()
    assert sorted(seen) == [0, 1, 2, 3]
