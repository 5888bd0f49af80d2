"""Calling each listener with what its signature names."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import TYPE_CHECKING, Any

import pytest

from tidings import BindingError, Bus, Event, listener
from tidings._binding import CallPlan

if TYPE_CHECKING:
    from decimal import Decimal  # for type checkers only: unresolvable at run time


@dataclasses.dataclass
class OrderPaid:
    __event_name__ = "order.paid"
    order_id: int


def plan(fn: Any) -> CallPlan:
    return CallPlan(fn, fn.__qualname__)


def test_only_named_keywords_are_passed() -> None:
    def f(email: str) -> Any:
        return email

    assert plan(f).call(Event("x", (), {"email": "a", "name": "b"})) == "a"


def test_kwargs_receives_everything_and_args_the_rest() -> None:
    def f(first: int, *args: int, **kwargs: Any) -> Any:
        return first, args, kwargs

    assert plan(f).call(Event("x", (1, 2, 3), {"k": "v"})) == (1, (2, 3), {"k": "v"})


def test_kwargs_beside_named_parameters_gets_the_other_keywords() -> None:
    def f(user_id: int, *, event: Event, **rest: Any) -> Any:
        return user_id, event.name, rest

    payload = {"user_id": 1, "email": "a@b.c", "event": "a payload key"}
    assert plan(f).call(Event("x", (), payload)) == (1, "x", {"email": "a@b.c"})
    assert plan(f).call(Event("x", (2,), {"email": "a@b.c"})) == (2, "x", {"email": "a@b.c"})


async def test_a_listener_with_kwargs_beside_a_named_parameter_gets_every_keyword() -> None:
    got: list[Any] = []

    @listener("user.created")
    async def on_async(user_id: int, **rest: Any) -> None:
        got.append((user_id, rest))

    @listener("user.created")
    def on_sync(user_id: int, **rest: Any) -> None:
        got.append((user_id, rest))

    @listener("user.created")
    async def audit(**payload: Any) -> None:
        got.append(payload)

    async with Bus(listeners=[on_async, on_sync, audit]) as bus:
        bus.emit("user.created", user_id=1, email="a@b.c")
        bus.emit("user.created", user_id=2)
        await bus.drain()
        assert bus.dead_letters() == []
    expected = [(1, {"email": "a@b.c"}), (2, {})] * 2 + [{"user_id": 1, "email": "a@b.c"}]
    assert sorted(got, key=repr) == sorted([*expected, {"user_id": 2}], key=repr)


def test_envelope_and_defaults() -> None:
    def f(event: Event, name: str = "anon") -> Any:
        return event.name, event.attempt, name

    assert plan(f).call(Event("x")) == ("x", 1, "anon")
    assert plan(f).call(Event("x", (), {"name": "Ada"})) == ("x", 1, "Ada")


def test_a_missing_argument_names_listener_event_and_parameter() -> None:
    def needs(phone: str) -> None:
        pass

    with pytest.raises(BindingError) as info:
        plan(needs).call(Event("user.created", (), {"email": "a"}))
    message = str(info.value)
    assert "needs" in message
    assert "'user.created'" in message
    assert "'phone'" in message
    assert "['email']" in message


async def test_the_litestar_docs_example_without_kwargs() -> None:
    # Litestar's events docs: two listeners on one event, each naming what it needs.
    sent: list[str] = []
    stats: list[int] = []

    @listener("user_created")
    async def send_welcome_mail(email: str) -> None:
        sent.append(email)

    @listener("user_created")
    async def update_user_stats(user_id: int) -> None:
        stats.append(user_id)

    async with Bus(listeners=[send_welcome_mail, update_user_stats]) as bus:
        bus.emit("user_created", email="a@example.com", user_id=1)
    assert sent == ["a@example.com"]
    assert stats == [1]


def test_check_plans_without_calling() -> None:
    calls: list[int] = []

    def f(a: int) -> None:
        calls.append(a)

    p = plan(f)
    p.check(Event("x", (), {"a": 1}))
    with pytest.raises(BindingError):
        p.check(Event("x"))
    assert calls == []


def test_positional_arguments_fill_parameters_in_order() -> None:
    def f(a: int, b: int, c: int = 3) -> Any:
        return a, b, c

    assert plan(f).call(Event("x", (1, 2))) == (1, 2, 3)
    assert plan(f).call(Event("x", (1,), {"b": 5})) == (1, 5, 3)


async def test_a_typed_event_reaches_any_object_and_optional_annotations() -> None:
    got: dict[str, Any] = {}

    @listener(OrderPaid)
    def by_any(order_id: Any) -> None:
        got["any"] = order_id

    @listener(OrderPaid)
    def by_object(order_id: object) -> None:
        got["object"] = order_id

    @listener(OrderPaid)
    def no_such_field(payload: object) -> None:
        got["no field"] = payload

    @listener(OrderPaid)
    def optional(order: OrderPaid | None = None, event: Event | None = None) -> None:
        got["optional"] = (order, event and event.name)

    async with Bus(listeners=[by_any, by_object, no_such_field, optional]) as bus:
        bus.emit(OrderPaid(7))
        await bus.drain()
        assert bus.dead_letters() == []
    assert got == {
        "any": 7,
        "object": 7,
        "no field": OrderPaid(7),  # an "anything" annotation: the object itself
        "optional": (OrderPaid(7), "order.paid"),
    }


async def test_annotations_are_resolved_one_by_one_when_one_cannot_be() -> None:
    got: list[Any] = []

    @listener(OrderPaid)
    def on_paid(order: OrderPaid, amount: Decimal | None = None) -> None:
        got.append(order)

    async with Bus(listeners=[on_paid]) as bus:
        bus.emit(OrderPaid(7))
        await bus.drain()
        assert bus.dead_letters() == []
    assert got == [OrderPaid(7)]


async def test_a_typed_event_class_defined_in_a_function_binds_by_its_name() -> None:
    @dataclasses.dataclass
    class Shipped:
        __event_name__ = "order.shipped"
        order_id: int

    got: list[Any] = []

    @listener(Shipped)
    def on_shipped(shipment: Shipped) -> None:  # "Shipped": not resolvable from here
        got.append(shipment)

    async with Bus(listeners=[on_shipped]) as bus:
        bus.emit(Shipped(3))
        await bus.drain()
        assert bus.dead_letters() == []
    assert got == [Shipped(3)]


def test_revive_converts_stored_values_strictly_and_names_what_does_not_fit() -> None:
    def f(n: int, when: dt.datetime, *, tags: set[str], note: Any = None) -> Any:
        return n, when, tags, note

    p = plan(f)
    event = Event("x", (3, "2026-01-02T03:04:05Z"), {"tags": ["a"], "note": [1]})
    shared = event.kwargs
    p.revive(event)
    assert p.call(event) == (3, dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC), {"a"}, [1])
    assert shared == {"tags": ["a"], "note": [1]}  # the stored payload is left as it was
    for bad, shown in (("42", "'42'"), (4.5, "4.5"), (True, "True")):
        with pytest.raises(BindingError, match=rf"its parameter 'n' takes int, not {shown} "):
            p.revive(Event("x", (bad, "2026-01-02T03:04:05Z"), {"tags": []}))
    with pytest.raises(BindingError, match=r"f cannot .* parameter 'when' takes datetime"):
        p.revive(Event("x", (1, "soon"), {"tags": []}))


def test_revive_keeps_the_payload_whose_values_fit_already() -> None:
    def f(n: int, *, name: str) -> None: ...

    p = plan(f)
    event = Event("x", (1,), {"name": "a"})
    args, kwargs = event.args, event.kwargs
    p.revive(event)
    assert event.args is args
    assert event.kwargs is kwargs


def test_every_annotated_parameter_is_revived_but_those_with_nothing_to_check() -> None:
    def f(a, b: Any, c: object, d: Decimal, e: Event, n: int, s: str, **rest: int) -> None:  # type: ignore[no-untyped-def]
        ...

    assert plan(f).revivable == (("n", int), ("s", str))
