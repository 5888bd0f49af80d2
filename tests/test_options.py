"""Emit options, apart from the payload; and what an emit refuses: names, delays, headers."""

from __future__ import annotations

import enum
from datetime import UTC, datetime, timedelta

import pytest

from tidings import Bus, ConfigurationError, EmitError, EmitOptions, Event, listener

from .conftest import Counter


async def test_every_keyword_of_emit_and_publish_is_payload() -> None:
    seen: list[dict[str, object]] = []

    @listener("x")
    async def on_x(**payload: object) -> None:
        seen.append(payload)

    names = ("key", "delay", "at", "headers", "connection", "session")
    async with Bus(listeners=[on_x]) as bus:
        bus.emit("x", **{name: name for name in names})
        await bus.publish("x", **dict.fromkeys(names, 1))
        await bus.drain()
    assert seen == [{name: name for name in names}, dict.fromkeys(names, 1)]


async def test_options_travel_apart_from_the_payload() -> None:
    seen: list[Event] = []

    @listener("x")
    async def on_x(event: Event) -> None:
        seen.append(event)

    async with Bus(listeners=[on_x]) as bus:
        bus.options(headers={"trace": "t1"}, key="k").emit("x", 1, key="payload", a=2)
        await bus.options(headers={"trace": "t2"}).publish("x", b=3)
        await bus.drain()
    assert [(e.args, e.kwargs, dict(e.headers)) for e in seen] == [
        ((1,), {"key": "payload", "a": 2}, {"trace": "t1"}),
        ((), {"b": 3}, {"trace": "t2"}),
    ]


async def test_options_are_immutable_and_reusable() -> None:
    counter = Counter()

    @listener("x")
    async def on_x(n: int) -> None:
        counter.add(n)

    async with Bus(listeners=[on_x]) as bus:
        soon = bus.options(delay=timedelta(0))
        assert isinstance(soon, EmitOptions)
        with pytest.raises(AttributeError, match="immutable"):
            soon.delay_s = 5
        soon.emit("x", n=1)
        soon.emit("x", n=2)
        await counter.wait_for(2)
    assert sorted(counter.calls) == [1, 2]  # type: ignore[type-var]


async def test_emit_with_a_connection_says_only_publish_takes_it() -> None:
    async with Bus() as bus:
        with pytest.raises(ConfigurationError, match="only publish takes connection="):
            bus.options(connection=object()).emit("x")
        with pytest.raises(ConfigurationError, match="only publish takes session="):
            bus.options(session=object()).emit("x")
        with pytest.raises(ConfigurationError, match="not both"):
            bus.options(connection=object(), session=object())


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"delay": "soon"}, "delay= takes seconds"),
        ({"delay": True}, "delay= takes seconds"),
        ({"delay": float("nan")}, "finite"),
        ({"delay": float("inf")}, "finite"),
        ({"delay": 10**400}, "finite"),
        ({"at": "noon"}, "at= takes a datetime"),
        ({"at": datetime(2030, 1, 1)}, "aware datetime"),
        ({"delay": 1, "at": datetime.now(UTC)}, "not both"),
        ({"headers": {"h": 1}}, "header 'h': its value must be a str"),
        ({"headers": {1: "v"}}, "its name must be a str"),
        ({"headers": {"h": "\ud800"}}, "lone surrogate"),
        ({"headers": {"": "v"}}, "cannot be empty"),
        ({"headers": ["h", "v"]}, "dict of str to str"),
    ],
)
async def test_bad_options_are_one_clear_error(options: dict[str, object], match: str) -> None:
    async with Bus() as bus:
        with pytest.raises(EmitError, match=match):
            bus.options(**options)  # type: ignore[arg-type]


async def test_a_negative_delay_or_a_past_at_means_now() -> None:
    counter = Counter()

    @listener("x")
    async def on_x(n: int) -> None:
        counter.add(n)

    async with Bus(listeners=[on_x]) as bus:
        bus.options(delay=-5).emit("x", n=1)
        bus.options(at=datetime.now(UTC) - timedelta(days=1)).emit("x", n=2)
        await bus.options(delay=-timedelta(hours=1)).publish("x", n=3)
        # Due now: drained like any event, without waiting for a timer.
        await counter.wait_for(3)
    assert sorted(counter.calls) == [1, 2, 3]  # type: ignore[type-var]


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("", "cannot be empty"),
        ("user created", "' '"),
        ("user.*", "wildcard"),
        ("**", "wildcard"),
        ("tab\there", "'\\\\t'"),
        ("nul\x00", "'\\\\x00'"),
        ("a\x85b", "control"),
        ("lone\ud800", "lone surrogate"),
        ("x" * 256, "256 bytes"),
        ("é" * 128, "256 bytes"),
    ],
)
async def test_an_event_name_that_breaks_the_grammar_is_refused(name: str, match: str) -> None:
    @listener("**")
    async def everything() -> None:
        pass

    async with Bus(listeners=[everything]) as bus:
        with pytest.raises(EmitError, match=match):
            bus.emit(name)
        with pytest.raises(EmitError, match=match):
            await bus.publish(name)
        with pytest.raises(EmitError, match=match):
            bus.options(delay=1).emit(name)
    assert name not in bus.registry.routes


async def test_names_at_the_limits_are_emitted() -> None:
    counter = Counter()

    @listener("**")
    async def everything(event: Event) -> None:
        counter.add(event.name)

    long = "x" * 255
    wide = "é" * 127  # 254 bytes
    async with Bus(listeners=[everything]) as bus:
        bus.emit(long)
        bus.emit(wide)
        bus.emit("ünïcode.名前")
        await counter.wait_for(3)
    assert counter.calls == [long, wide, "ünïcode.名前"]


async def test_endless_distinct_names_keep_the_route_cache_bounded() -> None:
    counter = Counter()

    @listener("metric.**")
    async def metric() -> None:
        counter.add()

    async with Bus(listeners=[metric]) as bus:
        bus.registry.max_routes = 100
        for i in range(5_000):
            bus.emit(f"metric.{i}")
        assert len(bus.registry._cache) == 100
        assert len(bus.registry.routes) == 100
        assert "metric.4999" in bus.registry.routes  # the newest stay
        bus.emit("metric.0")  # evicted long ago: resolved again
        await counter.wait_for(5_001)


async def test_a_plain_enum_member_names_the_event_its_value_names() -> None:
    class Names(enum.Enum):
        CREATED = "user.created"

    counter = Counter()

    @listener(Names.CREATED)
    async def created(event: Event, n: int) -> None:
        counter.add((event.name, n))

    async with Bus(listeners=[created]) as bus:
        bus.emit(Names.CREATED, n=1)
        await bus.publish(Names.CREATED, n=2)
        bus.options(headers={"h": "v"}).emit(Names.CREATED, n=3)
        await counter.wait_for(3)
    assert counter.calls == [("user.created", 1), ("user.created", 2), ("user.created", 3)]
