"""Listener annotations on every backend: a stored value is converted back to the type
its parameter names, strictly, or the delivery is a ``BindingError`` dead letter."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from tidings import BindingError, Event, Retry, listener

from .conftest import BusFactory


async def test_a_value_that_does_not_fit_its_annotation_is_a_binding_error_dead_letter(
    make_bus: BusFactory, backend_name: str
) -> None:
    if backend_name == "memory":
        pytest.skip("in process, a listener gets the values as they were emitted")
    got: list[tuple[str, Any]] = []
    dead: list[BaseException] = []

    def on_dead(event: Event, _listener: object, error: BaseException) -> None:
        dead.append(error)

    @listener("count", retry=Retry(attempts=3, backoff=0.001))
    def count(n: int) -> None:
        got.append(("count", n))

    @listener("add")
    async def add(a: int, b: float) -> None:
        got.append(("add", (a, b)))

    @listener("due")
    async def due(when: dt.datetime) -> None:
        got.append(("due", when))

    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    async with make_bus(listeners=[count, add, due], on_dead=on_dead) as bus:
        for n in ("abc", "42", 4.5, True, 7):
            bus.emit("count", n=n)
        bus.emit("add", 1, 2)  # positional, and an int where a float is named: both fit
        bus.emit("add", "1", 2.5)
        bus.emit("due", when=when)
        bus.emit("due", when="yesterday")
        await bus.drain()
        letters = await bus.list_dead_letters()
    assert sorted(got, key=repr) == sorted(
        [("count", 7), ("add", (1, 2.0)), ("due", when)], key=repr
    )
    assert type(next(v for k, v in got if k == "add")[1]) is float
    assert len(letters) == 6
    assert all(letter.error.startswith("BindingError: ") for letter in letters)
    assert all(letter.attempts == 1 for letter in letters)  # never retried
    errors = sorted(letter.error for letter in letters)
    for bad in ("'abc'", "'42'", "4.5", "True"):
        assert any(
            f"listener {count.qualname} " in e and f"parameter 'n' takes int, not {bad} " in e
            for e in errors
        ), bad
    assert any(
        f"listener {add.qualname} " in e and "parameter 'a' takes int, not '1'" in e for e in errors
    )
    assert any(
        f"listener {due.qualname} " in e and "parameter 'when' takes datetime, not 'yesterday'" in e
        for e in errors
    )
    # Told as any dead letter is: logged, and the on_dead hooks called.
    assert len(dead) == 6
    assert all(isinstance(error, BindingError) for error in dead)


async def test_sets_bytes_and_timedeltas_arrive_as_their_annotated_types(
    make_bus: BusFactory,
) -> None:
    got: list[tuple[Any, ...]] = []

    @listener("backup.done")
    async def record(
        tags: set[int],
        blob: bytes,
        took: dt.timedelta,
        names: frozenset[str],
        pair: tuple[int, str],
        maybe: int | None = None,
    ) -> None:
        got.append((tags, blob, took, names, pair, maybe))

    async with make_bus(listeners=[record]) as bus:
        bus.emit(
            "backup.done",
            {1, 2},  # positional arguments are converted too
            blob=b"\x00bytes\xff",
            took=dt.timedelta(seconds=3, microseconds=5),
            names=frozenset({"a", "b"}),
            pair=(1, "x"),
            maybe=None,
        )
        await bus.drain()
        assert await bus.list_dead_letters() == []
    ((tags, blob, took, names, pair, maybe),) = got
    assert (tags, blob, took, names, pair, maybe) == (
        {1, 2},
        b"\x00bytes\xff",
        dt.timedelta(seconds=3, microseconds=5),
        frozenset({"a", "b"}),
        (1, "x"),
        None,
    )
    assert [type(v) for v in (tags, blob, took, names, pair)] == [
        set,
        bytes,
        dt.timedelta,
        frozenset,
        tuple,
    ]


async def test_a_strict_bus_refuses_at_emit_what_a_listener_could_not_take(
    make_bus: BusFactory,
) -> None:
    got: list[Any] = []

    @listener("count")
    async def count(n: int, /, tags: set[str], when: dt.datetime | None = None) -> None:
        got.append((n, tags, when))

    when = dt.datetime(2026, 1, 2, tzinfo=dt.UTC)
    async with make_bus(listeners=[count], strict=True) as bus:
        with pytest.raises(BindingError, match=r"count cannot .* 'n' takes int, not '42'"):
            bus.emit("count", "42", tags=[])
        with pytest.raises(BindingError, match=r"parameter 'tags' takes set\[str\], not \[1\]"):
            await bus.publish("count", 1, tags=[1])
        with pytest.raises(BindingError, match=r"parameter 'when' takes .*, not 'soon'"):
            bus.emit("count", 1, tags=[], when="soon")
        bus.emit("count", 2, tags={"a"}, when=when)
        bus.emit("count", 3, tags=["b"], when=when.isoformat())  # what JSON would carry
        await bus.drain()
    assert sorted(n for n, _, _ in got) == [2, 3]
