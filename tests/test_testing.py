"""The testing helpers: capture, the pytest fixture."""

from __future__ import annotations

import dataclasses

import pytest

from tidings import BindingError, Bus, PayloadError, listener
from tidings.testing import capture


@dataclasses.dataclass
class UserCreated:
    __event_name__ = "user.created"
    email: str


async def test_capture_records_emitted_events_in_order() -> None:
    @listener("user.created")
    async def welcome(email: str) -> None:
        pass

    async with Bus(listeners=[welcome]) as bus:
        bus.emit("before")
        with capture(bus) as events:
            bus.emit("user.created", email="a@example.com")
            bus.emit("nobody.listens", 1, 2)
            await bus.publish("user.created", email="b@example.com")
            bus.emit(UserCreated(email="c@example.com"))
        bus.emit("after")
    assert events.names == ["user.created", "nobody.listens", "user.created", "user.created"]
    assert len(events) == 4
    last = events.assert_emitted("user.created", email="b@example.com")
    assert last.kwargs == {"email": "b@example.com"}
    events.assert_emitted("user.created", times=3)
    events.assert_emitted("nobody.listens", 1, 2)
    events.assert_not_emitted("before")
    events.assert_not_emitted("after")
    assert events.named("user.created")[2].obj == UserCreated(email="c@example.com")
    typed = events.assert_emitted("user.created", email="c@example.com")  # by its field
    assert typed.obj == UserCreated(email="c@example.com")


async def test_capture_assertions_explain_what_was_emitted() -> None:
    async with Bus() as bus:
        with capture(bus) as events:
            bus.emit("a", x=1)
    with pytest.raises(AssertionError, match=r"'b' was not emitted; emitted: \[a\(x=1\)\]"):
        events.assert_emitted("b")
    with pytest.raises(AssertionError, match="not emitted"):
        events.assert_emitted("a", x=2)
    with pytest.raises(AssertionError, match="1 times, not 2"):
        events.assert_emitted("a", times=2)
    with pytest.raises(AssertionError, match="emitted 1 times"):
        events.assert_not_emitted("a")


async def test_capture_leaves_the_fast_path_as_it_found_it() -> None:
    @listener("x")
    async def on_x() -> None:
        pass

    async with Bus(listeners=[on_x]) as bus:
        assert bus._hot
        with capture(bus):
            assert not bus._hot
        assert bus._hot


async def test_fixture_gives_a_started_bus_that_rejects_what_durable_backends_would(
    tidings_bus: Bus,
) -> None:
    assert tidings_bus.started
    with pytest.raises(PayloadError):
        tidings_bus.emit("x", value=object())


async def test_fixture_rejects_a_value_a_durable_worker_would_make_a_dead_letter(
    tidings_bus: Bus,
) -> None:
    got: list[int] = []

    @tidings_bus.listener("order.paid")
    async def paid(order_id: int) -> None:
        got.append(order_id)

    with pytest.raises(BindingError, match="'order_id' takes int"):
        tidings_bus.emit("order.paid", order_id="42")
    tidings_bus.emit("order.paid", order_id=42)
    await tidings_bus.drain()
    assert got == [42]


async def test_a_payload_named_name_is_asserted_like_any_other() -> None:
    async with Bus() as bus:
        with capture(bus) as events:
            bus.emit("user.created", name="Ada", email="ada@example.com")
    event = events.assert_emitted("user.created", name="Ada")
    assert event.kwargs["email"] == "ada@example.com"
    with pytest.raises(AssertionError) as failed:
        events.assert_emitted("user.created", name="Bob")
    # What was emitted, with its arguments, to compare against.
    assert "user.created(name='Ada', email='ada@example.com')" in str(failed.value)
    assert events.named("user.created") == [event]
