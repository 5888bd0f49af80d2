"""Listeners, registries, once, max_listeners, typed events, and the public names."""

from __future__ import annotations

import asyncio
import dataclasses

import msgspec
import pydantic
import pytest

import tidings
from tidings import (
    BindingError,
    Bus,
    ConfigurationError,
    Event,
    PayloadError,
    QueueFull,
    Registry,
    Retry,
    listener,
    register_event,
)

from .conftest import Counter


@dataclasses.dataclass
class UserCreated:
    __event_name__ = "user.created"
    email: str
    name: str = "-"


class OrderPaid(msgspec.Struct):
    __event_name__ = "order.paid"
    order_id: int


class InvoiceSent(pydantic.BaseModel):
    __event_name__ = "invoice.sent"
    number: str


def test_decorated_functions_stay_callable() -> None:
    @listener("x")
    def add(a: int, b: int) -> int:
        return a + b

    @listener("x")
    async def double(a: int) -> int:
        return 2 * a

    assert add(1, 2) == 3
    assert asyncio.run(double(4)) == 8
    assert add.names == ("x",)
    assert add.fn.__name__ == "add"
    assert "test_decorated_functions_stay_callable.<locals>.add" in add.qualname


def test_listener_options_are_checked() -> None:
    with pytest.raises(ConfigurationError, match="no event name"):
        listener()(lambda: None)
    with pytest.raises(ConfigurationError, match="a timeout cannot apply"):
        listener("x", inline=True, timeout=1)(lambda: None)
    with pytest.raises(ConfigurationError, match="concurrency"):
        listener("x", concurrency=0)(lambda: None)
    with pytest.raises(ConfigurationError, match="not a listener"):
        Registry([lambda: None])  # type: ignore[list-item]
    with pytest.raises(ConfigurationError, match="name must be a non-empty string"):
        listener("x", name=" ")(lambda: None)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("billing.bad\x00name", r"listener name 'billing.bad\\x00name' holds the character"),
        ("billing charge", "no whitespace or control characters"),
        ("b" * 256, "is 256 bytes long in UTF-8; the most is 255"),
        ("\ud800", "lone surrogate"),
    ],
)
def test_a_listener_name_a_store_could_not_keep_is_refused(name: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        listener("x", name=name)(lambda: None)


def test_a_listener_is_known_by_its_name_when_given_one() -> None:
    @listener("x", name="billing.charge")
    def charge() -> None: ...

    assert charge.qualname == "billing.charge"
    assert charge.fn.__name__ == "charge"


async def wrong_options_target() -> None: ...


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"retry": "3"}, "retry of listener .*wrong_options_target must be a Retry or a whole"),
        ({"retry": 1.5}, r"retry of listener .* not 1\.5"),
        ({"retry": True}, "retry of listener .* not True"),
        ({"retry": 0}, "retry of listener .* not 0"),
        ({"concurrency": "2"}, "concurrency of listener .* whole number of at least 1, not '2'"),
        ({"concurrency": 2.5}, r"concurrency of listener .* not 2\.5"),
        ({"concurrency": 0}, "concurrency of listener .* not 0"),
        ({"once": "yes"}, "once of listener .* must be True or False, not 'yes'"),
        ({"inline": 1}, "inline of listener .* must be True or False, not 1"),
        ({"on_error": "log"}, "on_error of listener .* must be a function or a list"),
        ({"on_dead": [print, 3]}, "on_dead of listener .* must be a function or a list"),
        ({"on_success": 3}, "on_success of listener .* must be a function or a list"),
        ({"retries": 3}, "wrong_options_target: no option retries .*retry"),
    ],
)
def test_listener_options_of_the_wrong_type_are_refused(
    options: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        listener("x", **options)(wrong_options_target)
    with pytest.raises(ConfigurationError, match=message):
        Bus().subscribe(wrong_options_target, "x", **options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"retry": "3"}, "the bus's retry must be a Retry or a whole number .* not '3'"),
        ({"retry": 2.0}, r"the bus's retry .* not 2\.0"),
        ({"concurrency": "2"}, "concurrency must be a whole number of at least 1, not '2'"),
        ({"max_pending": 0}, "max_pending must be a whole number of at least 1, not 0"),
        ({"sync_workers": 0}, "sync_workers must be a whole number of at least 1, not 0"),
        ({"on_error": "log"}, "the bus's on_error must be a function or a list"),
    ],
)
def test_bus_options_of_the_wrong_type_are_refused(
    options: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Bus(**options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"attempts": "3"}, r"Retry\(attempts=...\) must be a whole number of at least 1, not '3'"),
        ({"factor": "2"}, r"Retry\(factor=...\) must be a number, not '2'"),
        ({"on": ("ValueError",)}, r"Retry\(on=...\) must be an exception class or a tuple"),
        ({"on": [ValueError, 3]}, r"Retry\(on=...\) must be an exception class or a tuple"),
    ],
)
def test_retry_fields_of_the_wrong_type_are_refused(
    options: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Retry(**options)  # type: ignore[arg-type]


def test_retry_on_takes_one_class_or_a_list_as_a_tuple() -> None:
    assert Retry(on=ValueError).on == (ValueError,)  # type: ignore[arg-type]
    assert Retry(on=[ValueError, KeyError]).on == (ValueError, KeyError)  # type: ignore[arg-type]


async def test_a_listener_failing_with_a_retry_count_is_a_dead_letter_and_others_run() -> None:
    ran: list[str] = []

    @listener("x.y", retry=2)
    async def fails(event: Event) -> None:
        ran.append(f"fails {event.attempt}")
        raise ValueError("no")

    @listener("x.y")
    async def works() -> None:
        ran.append("works")

    async with Bus(listeners=[fails, works], retry=Retry(backoff=0)) as bus:
        bus.emit("x.y")
    assert sorted(ran) == ["fails 1", "fails 2", "works"]
    [dead] = await bus.list_dead_letters()
    assert (dead.listener, dead.attempts) == (fails.qualname, 2)


async def test_once_delivers_one_event_then_unsubscribes() -> None:
    counter = Counter()

    @listener("ready", once=True)
    async def first_time(n: int) -> None:
        counter.add(n)

    async with Bus(listeners=[first_time]) as bus:
        for n in range(5):
            bus.emit("ready", n=n)
        await asyncio.to_thread(bus.emit, "ready", n=99)
        await bus.drain()
        assert bus.listeners() == []
    assert counter.calls == [0]


async def test_an_emit_that_is_refused_uses_no_once_listener_up() -> None:
    got: list[object] = []
    release = asyncio.Event()

    @listener("block")
    async def blocker() -> None:
        await release.wait()

    @listener("report.due", once=True)
    async def first(value: object) -> None:
        got.append(value)

    @listener("report.due")
    async def also(value: object) -> None:
        pass

    async with Bus(
        listeners=[blocker, first, also], max_pending=1, strict=True, check_serializable=True
    ) as bus:
        with pytest.raises(PayloadError):
            bus.emit("report.due", value=object())
        with pytest.raises(BindingError):
            bus.emit("report.due")  # no value for either listener
        bus.emit("block")  # max_pending=1: the queue is full until the loop runs
        with pytest.raises(QueueFull):
            bus.emit("report.due", value=1)
        release.set()
        await bus.drain()
        assert [lst.qualname for lst in bus.listeners()] == [
            lst.qualname for lst in (blocker, first, also)
        ]  # and in its place
        bus.emit("report.due", value=2)
        await bus.drain()
    assert got == [2]


async def test_a_callable_objects_attributes_are_not_the_listeners_options() -> None:
    got: list[str] = []

    class WebhookSender:
        def __init__(self) -> None:
            self.timeout = 0.001  # its HTTP timeout, not the delivery's
            self.retry = 3
            self.once = True

        async def __call__(self, url: str) -> None:
            await asyncio.sleep(0.01)
            got.append(url)

    sender = listener("user.created")(WebhookSender())
    assert (sender.timeout, sender.retry, sender.once) == (None, None, False)
    async with Bus(listeners=[sender]) as bus:
        bus.emit("user.created", url="https://example.com/a")
        bus.emit("user.created", url="https://example.com/b")
    assert got == ["https://example.com/a", "https://example.com/b"]


def test_subscribing_a_listener_with_names_or_options_of_its_own_is_an_error() -> None:
    @listener("a")
    def on_a() -> None:
        pass

    registry = Registry()
    with pytest.raises(ConfigurationError, match=r"its function \(listener\.fn\)"):
        registry.subscribe(on_a, "b")
    with pytest.raises(ConfigurationError, match=r"its function \(listener\.fn\)"):
        registry.subscribe(on_a, retry=3)
    registry.subscribe(on_a.fn, "b")
    registry.subscribe(on_a)
    assert [s.listener.names for s in registry.subscriptions()] == [("b",), ("a",)]


async def test_a_publish_cancelled_while_it_waits_for_room_uses_no_once_listener_up() -> None:
    running = asyncio.Event()
    release = asyncio.Event()
    got: list[int] = []

    @listener("busy")
    async def busy() -> None:
        running.set()
        await release.wait()

    @listener("x", once=True)
    async def first(n: int) -> None:
        got.append(n)

    async with Bus(listeners=[busy, first], max_pending=1, concurrency=1) as bus:
        bus.emit("busy")
        await running.wait()
        bus.emit("busy")  # the queue is full now
        waiting = asyncio.create_task(bus.publish("x", n=1))
        await asyncio.wait([waiting], timeout=0.05)
        assert not waiting.done()  # it waits for room
        waiting.cancel()  # the caller gives up before it was accepted
        await asyncio.gather(waiting, return_exceptions=True)
        release.set()
        await bus.drain()
        bus.emit("x", n=2)
        await bus.drain()
    assert got == [2]


def test_max_listeners() -> None:
    registry = Registry(max_listeners=2)
    for _ in range(2):
        registry.subscribe(lambda: None, "x")
    registry.subscribe(lambda: None, "y")
    with pytest.raises(ConfigurationError, match="max_listeners"):
        registry.subscribe(lambda: None, "x")


async def test_subscribe_and_unsubscribe_at_runtime_refresh_the_routes() -> None:
    counter = Counter()
    async with Bus() as bus:
        bus.emit("x")  # nobody listens yet: resolved to nothing and cached
        handle = bus.subscribe(lambda: counter.add("late"), "x")
        bus.emit("x")
        await bus.drain()
        handle.unsubscribe()
        handle.unsubscribe()  # harmless
        bus.emit("x")
        await bus.drain()
    assert counter.calls == ["late"]


async def test_nested_registries_like_routers() -> None:
    counter = Counter()
    users = Registry()
    admin = Registry()
    users.include(admin)

    @admin.listener("user.*")
    async def audit(event: Event) -> None:
        counter.add(event.name)

    bus = Bus()
    bus.include(users)
    with pytest.raises(ConfigurationError, match="cannot include itself"):
        admin.include(users)
    async with bus:
        bus.emit("user.created")
    assert counter.calls == ["user.created"]


async def test_typed_events_by_class_and_annotation() -> None:
    seen: list[object] = []

    @listener(UserCreated)
    async def welcome(user: UserCreated) -> None:
        seen.append(user)

    @listener("user.created")
    async def by_field(email: str) -> None:
        seen.append(email)

    @listener(OrderPaid)
    def paid(event: Event, order: OrderPaid) -> None:
        seen.append((event.name, order.order_id))

    @listener(InvoiceSent)
    async def sent(invoice: InvoiceSent) -> None:
        seen.append(invoice.number)

    async with Bus(listeners=[welcome, by_field, paid, sent]) as bus:
        bus.emit(UserCreated(email="a@example.com"))
        bus.emit(OrderPaid(order_id=3))
        await bus.publish(InvoiceSent(number="F-1"))
    assert UserCreated(email="a@example.com") in seen
    assert "a@example.com" in seen
    assert ("order.paid", 3) in seen
    assert "F-1" in seen


def test_two_classes_under_one_name_is_a_configuration_error() -> None:
    @dataclasses.dataclass
    class Other:
        __event_name__ = "user.created"
        email: str

    @listener(UserCreated)
    async def one(user: UserCreated) -> None:
        pass

    @listener(Other)
    async def two(user: Other) -> None:
        pass

    with pytest.raises(ConfigurationError, match=r"user\.created"):
        Registry([one, two])


async def test_two_classes_emitted_under_one_name_is_a_configuration_error() -> None:
    @dataclasses.dataclass
    class Other:
        __event_name__ = "user.created"
        email: str

    @listener("user.created")  # by name: binds no class
    async def audit(event: Event) -> None:
        pass

    async with Bus(listeners=[audit]) as bus:
        bus.emit(UserCreated(email="a"))
        with pytest.raises(ConfigurationError, match=r"'user\.created' is bound to UserCreated"):
            bus.emit(Other(email="b"))


async def test_typed_event_errors() -> None:
    class NoName:
        pass

    async with Bus() as bus:
        with pytest.raises(ConfigurationError, match="__event_name__"):
            bus.emit(NoName())
        with pytest.raises(tidings.PayloadError, match="emitted alone"):
            bus.emit(UserCreated(email="a"), extra=1)


def test_register_event_names_a_class_without_touching_it() -> None:
    @dataclasses.dataclass
    class Shipped:
        parcel: str

    register_event(Shipped, "parcel.shipped")
    register_event(Shipped, "parcel.shipped")
    with pytest.raises(ConfigurationError, match="already registered"):
        register_event(Shipped, "parcel.sent")

    @dataclasses.dataclass
    class Sent:
        parcel: str

    with pytest.raises(ConfigurationError, match=r"already registered for .*Shipped"):
        register_event(Sent, "parcel.shipped")

    @listener(Shipped)
    async def on_shipped(s: Shipped) -> None:
        pass

    assert on_shipped.names == ("parcel.shipped",)


def test_all_is_complete() -> None:
    public = {
        name
        for name in dir(tidings)
        if not name.startswith("_")
        and name not in {"annotations"}
        and not isinstance(getattr(tidings, name), type(tidings))
    }
    assert set(tidings.__all__) == public
    for name in tidings.__all__:
        assert getattr(tidings, name) is not None


async def test_subscribe_takes_the_function_first_positionally() -> None:
    seen: list[str] = []

    @listener("a")
    async def on_a(event: Event) -> None:
        seen.append(f"listener {event.name}")

    async def on_b(event: Event) -> None:
        seen.append(f"function {event.name}")

    async with Bus() as bus:
        bus.subscribe(on_a)
        handle = bus.subscribe(on_b, "b", "c", retry=2)
        with pytest.raises(ConfigurationError, match="takes the function first"):
            bus.subscribe("d", on_b)  # type: ignore[arg-type]
        for name in ("a", "b", "c"):
            bus.emit(name)
        await bus.drain()
        handle.unsubscribe()
        bus.emit("b")
        await bus.drain()
    assert seen == ["listener a", "function b", "function c"]


async def test_one_registry_serves_several_buses() -> None:
    seen: list[tuple[str, int]] = []
    shared = Registry()

    @shared.listener("order.paid")
    async def paid(order_id: int) -> None:
        seen.append(("paid", order_id))

    async with Bus() as first, Bus() as second:
        first.include(shared)
        second.include(shared)
        with pytest.raises(ConfigurationError, match="already included here"):
            second.include(shared)
        first.emit("order.paid", order_id=1)
        second.emit("order.paid", order_id=2)
        await first.drain()
        await second.drain()

        # Changed once, seen by both.
        @shared.listener("order.paid")
        async def refund(order_id: int) -> None:
            seen.append(("refund", order_id))

        second.emit("order.paid", order_id=3)
        first.emit("order.paid", order_id=4)
        await first.drain()
        await second.drain()
    assert sorted(seen) == [
        ("paid", 1),
        ("paid", 2),
        ("paid", 3),
        ("paid", 4),
        ("refund", 3),
        ("refund", 4),
    ]
    with pytest.raises(ConfigurationError, match="cannot include itself"):
        shared.include(first.registry)


@pytest.mark.parametrize("name", ["user created", "user.\tcreated", "x" * 256, "a\ud800.*"])
def test_a_pattern_no_event_could_match_is_refused_at_registration(name: str) -> None:
    with pytest.raises(ConfigurationError, match="no event could match it"):

        @listener(name)
        def never() -> None:
            pass
