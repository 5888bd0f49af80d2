"""The bus: lifecycle, emit and publish, threads, strict mode, options."""

from __future__ import annotations

import asyncio
import contextvars
import enum
import gc
import logging
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tidings import (
    BindingError,
    Bus,
    ConfigurationError,
    Event,
    NoListenersError,
    NotStartedError,
    PayloadError,
    QueueFull,
    Registry,
    Subscription,
    listener,
)
from tidings.backends.memory import MemoryBackend
from tidings.testing import capture

from .conftest import Counter, noop

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


async def test_async_with_returns_the_started_bus_and_drains_on_exit() -> None:
    seen: list[str] = []

    @listener("user.created")
    async def welcome(email: str) -> None:
        await asyncio.sleep(0)
        seen.append(email)

    bus = Bus(listeners=[welcome])
    assert not bus.started
    async with bus as entered:
        assert entered is bus
        assert bus.started
        for i in range(100):
            bus.emit("user.created", email=f"u{i}@example.com")
    assert not bus.started
    assert seen == [f"u{i}@example.com" for i in range(100)]


async def test_emit_returns_none_and_does_not_run_listeners_synchronously() -> None:
    seen: list[int] = []

    @listener("tick")
    async def on_tick(n: int) -> None:
        seen.append(n)

    async with Bus(listeners=[on_tick]) as bus:
        assert bus.emit("tick", n=1) is None  # type: ignore[func-returns-value]
        assert seen == []
        await bus.drain()
        assert seen == [1]


async def test_emit_before_start_says_how_to_start() -> None:
    bus = Bus()
    with pytest.raises(NotStartedError, match="async with bus") as info:
        bus.emit("user.created", email="a@example.com")
    assert isinstance(info.value, RuntimeError)
    assert "'user.created'" in str(info.value)


async def test_emit_after_close_says_the_bus_is_closed() -> None:
    bus = Bus(listeners=[listener("x")(noop)])
    async with bus:
        bus.emit("x")
    with pytest.raises(NotStartedError, match="closed"):
        bus.emit("x")


async def test_a_closed_bus_starts_again_with_its_listeners_and_dead_letters() -> None:
    counter = Counter()

    @listener("x")
    async def on_x(n: int) -> None:
        if n < 0:
            raise ValueError("negative")
        counter.add(n)

    bus = Bus(listeners=[on_x])
    async with bus:
        bus.emit("x", n=-1)
        bus.emit("x", n=1)
    # Started again (as by a second test client of one app): every event gets through.
    async with bus:
        for n in range(2, 500):
            bus.emit("x", n=n)
        await bus.publish("x", n=500)
    assert counter.calls == list(range(1, 501))
    assert [d.event.kwargs for d in bus.dead_letters()] == [{"n": -1}]


def test_a_closed_bus_starts_again_on_another_event_loop(tmp_path: Path) -> None:
    seen: list[tuple[str, int]] = []

    @listener("x")
    def on_x(n: int, event: Event) -> None:
        seen.append((event.name, n))

    for url in ("memory://", f"sqlite:///{tmp_path / 'e.db'}?poll_interval=0.01"):
        bus = Bus(url, listeners=[on_x])
        for n in range(3):  # each run on an event loop of its own, as a test client's

            async def run(n: int = n, bus: Bus = bus) -> None:
                async with bus:
                    bus.emit("x", n=n)
                    await bus.drain()

            asyncio.run(run())
    assert seen == [("x", 0), ("x", 1), ("x", 2)] * 2


async def test_a_closed_bus_on_a_durable_backend_object_says_to_give_a_url(
    tmp_path: Path,
) -> None:
    from tidings.backends.sqlite import SQLiteBackend

    bus = Bus(SQLiteBackend(str(tmp_path / "e.db")))
    async with bus:
        pass
    with pytest.raises(NotStartedError, match="give the bus a URL"):
        await bus.start()


async def test_start_twice_is_harmless_and_aclose_before_start_too() -> None:
    bus = Bus()
    await bus.start()
    await bus.start()
    await bus.aclose()
    await Bus().aclose()


async def test_unknown_name_is_ignored_with_a_debug_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="tidings")
    async with Bus() as bus:
        bus.emit("nobody.listens", x=1)
    assert "no listener for event 'nobody.listens'" in caplog.text


async def test_strict_bus_raises_for_unknown_names() -> None:
    async with Bus(strict=True) as bus:
        with pytest.raises(NoListenersError, match=r"'nobody\.listens'") as info:
            bus.emit("nobody.listens")
        assert isinstance(info.value, LookupError)
        with pytest.raises(NoListenersError):
            await bus.publish("nobody.listens")


class Names(enum.StrEnum):
    SIGNED_UP = "user.signed_up"


@pytest.mark.parametrize("strict", [False, True])
async def test_a_str_subclass_names_the_event_its_value_names(strict: bool) -> None:
    names: list[tuple[type[str], str]] = []

    @listener(Names.SIGNED_UP)
    async def on_sign_up(event: Event, email: str) -> None:
        names.append((type(event.name), event.name))

    async with Bus(listeners=[on_sign_up], strict=strict) as bus:
        bus.emit(Names.SIGNED_UP, email="a@example.com")
        bus.emit("user.signed_up", email="b@example.com")
        bus.options(headers={"h": "1"}).emit(Names.SIGNED_UP, email="c@example.com")
        await bus.publish(Names.SIGNED_UP, email="d@example.com")
        bus.emit(Names.SIGNED_UP, email="e@example.com")  # a route known by now
        await bus.drain()
    assert names == [(str, "user.signed_up")] * 5


async def test_publish_waits_for_the_backend_and_delivers() -> None:
    counter = Counter()

    @listener("job")
    async def job(n: int) -> None:
        counter.add(n)

    async with Bus(listeners=[job]) as bus:
        for n in range(10):
            await bus.publish("job", n=n)
        await bus.drain()
    assert counter.calls == list(range(10))


async def test_emit_from_threads_delivers_everything_in_the_emitters_context() -> None:
    counter = Counter()

    @listener("from.thread")
    async def on_event(thread: int, n: int) -> None:
        counter.add((thread, n, request_id.get()))

    async with Bus(listeners=[on_event]) as bus:

        def work(thread: int) -> None:
            request_id.set(f"req-{thread}")
            for n in range(200):
                bus.emit("from.thread", thread=thread, n=n)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        await counter.wait_for(800)
        await bus.drain()
    assert len(counter.calls) == 800
    for thread in range(4):
        mine = [c for c in counter.calls if isinstance(c, tuple) and c[0] == thread]
        assert [c[1] for c in mine] == list(range(200))  # per-thread order kept
        assert {c[2] for c in mine} == {f"req-{thread}"}


async def test_a_thread_that_changes_its_context_between_emits_is_seen_as_it_was() -> None:
    # Emits in a row from one thread share a copy of its context while it stays the
    # same; a change makes a new one, and no event sees another's.
    seen: list[tuple[int, str]] = []

    @listener("from.thread")
    async def on_event(n: int) -> None:
        seen.append((n, request_id.get()))

    async with Bus(listeners=[on_event]) as bus:

        def work() -> None:
            for n in range(300):
                if n % 7 == 0:
                    request_id.set(f"req-{n // 7}")
                bus.emit("from.thread", n=n)

        await asyncio.to_thread(contextvars.Context().run, work)
        await bus.drain()
    assert seen == [(n, f"req-{n // 7}") for n in range(300)]


async def test_no_context_of_a_thread_is_kept_alive_once_its_events_ran() -> None:
    class Session:
        pass

    session_var: contextvars.ContextVar[Session] = contextvars.ContextVar("session")
    seen: list[bool] = []

    @listener("x")
    async def uses(n: int) -> None:
        seen.append(isinstance(session_var.get(), Session))

    def request() -> weakref.ref[Session]:
        session = Session()
        session_var.set(session)
        bus.emit("x", n=1)
        return weakref.ref(session)

    async with Bus(listeners=[uses]) as bus:
        # A pool's thread outlives the request it ran.
        with ThreadPoolExecutor(1) as pool:
            ref = await asyncio.get_running_loop().run_in_executor(
                pool, contextvars.Context().run, request
            )
            await bus.drain()
            gc.collect()
            assert seen == [True]
            assert ref() is None


async def test_publish_from_another_thread_with_its_own_loop() -> None:
    counter = Counter()

    @listener("x")
    async def on_x(n: int) -> None:
        counter.add(n)

    async with Bus(listeners=[on_x]) as bus:

        def work() -> None:
            asyncio.run(bus.publish("x", n=7))

        await asyncio.to_thread(work)
        await counter.wait_for(1)
    assert counter.calls == [7]


async def test_drain_from_another_loop_waits_on_the_buss_own() -> None:
    # A test client that runs the app (and its bus) on a loop in a thread of its own.
    started = threading.Event()
    release = threading.Event()
    loop = asyncio.new_event_loop()
    holder: dict[str, Bus] = {}
    done: list[int] = []

    @listener("x")
    async def slow(n: int) -> None:
        await asyncio.sleep(0.05)
        done.append(n)

    async def serve() -> None:
        async with Bus(listeners=[slow]) as bus:
            holder["bus"] = bus
            bus.emit("x", n=1)
            started.set()
            await asyncio.to_thread(release.wait)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),))
    thread.start()
    try:
        await asyncio.to_thread(started.wait)
        await holder["bus"].drain()
        assert done == [1]
    finally:
        release.set()
        await asyncio.to_thread(thread.join)
        loop.close()
    with pytest.raises(RuntimeError, match="not running"):
        await holder["bus"].drain()


async def test_context_variables_reach_sync_and_async_listeners() -> None:
    seen: list[tuple[str, str]] = []

    @listener("order.paid")
    async def async_listener() -> None:
        await asyncio.sleep(0)
        seen.append(("async", request_id.get()))

    @listener("order.paid")
    def sync_listener() -> None:
        seen.append(("sync", request_id.get()))

    @listener("order.paid")
    async def changes_its_copy() -> None:
        request_id.set("changed by a listener")

    async with Bus(listeners=[async_listener, sync_listener, changes_its_copy]) as bus:
        token = request_id.set("req-42")
        bus.emit("order.paid")
        request_id.reset(token)
        await bus.drain()
        assert request_id.get() == "-"
    assert sorted(seen) == [("async", "req-42"), ("sync", "req-42")]


async def test_listener_context_changes_stay_inside_one_delivery() -> None:
    seen: list[str] = []

    @listener("a")
    async def first() -> None:
        request_id.set("first was here")

    @listener("a")
    async def second() -> None:
        seen.append(request_id.get())

    async with Bus(listeners=[first, second]) as bus:
        request_id.set("emitter")
        bus.emit("a")
        await bus.drain()
    assert seen == ["emitter"]


async def test_aclose_drains_pending_deliveries() -> None:
    counter = Counter()

    @listener("slow")
    async def slow(n: int) -> None:
        await asyncio.sleep(0.001)
        counter.add(n)

    bus = Bus(listeners=[slow])
    await bus.start()
    for n in range(50):
        bus.emit("slow", n=n)
    await bus.aclose(timeout=10)
    assert sorted(counter.calls) == list(range(50))  # type: ignore[type-var]


async def test_aclose_timeout_cancels_and_logs_undelivered_ids(
    caplog: pytest.LogCaptureFixture,
) -> None:
    started = asyncio.Event()
    cancelled = Counter()

    @listener("stuck")
    async def stuck(event: Event) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.add(event.id)
            raise

    bus = Bus(listeners=[stuck])
    await bus.start()
    ids: list[str] = []
    with caplog.at_level(logging.ERROR, logger="tidings"):
        from tidings.testing import capture

        with capture(bus) as captured:
            bus.emit("stuck")
            bus.emit("stuck")
        ids = [e.id for e in captured.events]
        await started.wait()
        await bus.aclose(timeout=0.05)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "2 undelivered" in errors[0].getMessage()
    for event_id in ids:
        assert event_id in errors[0].getMessage()
    assert sorted(cancelled.calls) == sorted(ids)  # type: ignore[type-var]


async def test_aclose_accepts_a_timedelta() -> None:
    bus = Bus(shutdown_timeout=timedelta(seconds=1))
    await bus.start()
    await bus.aclose(timeout=timedelta(seconds=1))
    assert not bus.started


async def test_delay_runs_later_and_at_runs_at_a_time() -> None:
    counter = Counter()

    @listener("later")
    async def later(n: int) -> None:
        counter.add(n)

    async with Bus(listeners=[later]) as bus:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        bus.options(delay=0.05).emit("later", n=1)
        bus.options(at=datetime.now(UTC) + timedelta(milliseconds=20)).emit("later", n=2)
        await bus.options(delay=timedelta(milliseconds=10)).publish("later", n=3)
        await bus.drain()
        assert counter.calls == []  # drain does not wait for events that are not due
        await counter.wait_for(3)
        assert loop.time() - t0 >= 0.04
    assert counter.calls == [3, 2, 1]


async def test_emit_raises_queue_full_when_the_queue_is_full() -> None:
    @listener("x")
    async def on_x() -> None:
        pass

    async with Bus(listeners=[on_x], max_pending=3) as bus:
        for _ in range(3):
            bus.emit("x")
        with pytest.raises(QueueFull, match="max_pending=3"):
            bus.emit("x")
        await bus.drain()
        bus.emit("x")  # room again


async def test_emit_from_a_thread_raises_queue_full_too() -> None:
    @listener("x")
    async def on_x() -> None:
        pass

    async with Bus(listeners=[on_x], max_pending=2) as bus:
        bus.emit("x")
        bus.emit("x")
        with pytest.raises(QueueFull):
            await asyncio.to_thread(bus.emit, "x")


async def test_threads_cannot_outrun_max_pending_while_the_loop_is_busy() -> None:
    # Events from other threads reach the loop in bursts; while it cannot take them,
    # they count against max_pending all the same, and drain() takes them at once.
    got: list[int] = []
    refused: list[int] = []

    @listener("x")
    async def on_x(n: int) -> None:
        got.append(n)

    def emits() -> None:
        for n in range(5):
            try:
                bus.emit("x", n=n)
            except QueueFull:
                refused.append(n)

    async with Bus(listeners=[on_x], max_pending=3) as bus:
        thread = threading.Thread(target=emits)
        thread.start()
        thread.join()  # blocks the loop: nothing is taken meanwhile
        await bus.drain()
        assert got == [0, 1, 2]
    assert refused == [3, 4]


async def test_aclose_reports_events_from_threads_that_still_wait_for_room(
    caplog: pytest.LogCaptureFixture,
) -> None:
    started = asyncio.Event()
    seen: list[int] = []

    @listener("x")
    async def stuck(n: int) -> None:
        seen.append(n)
        started.set()
        await asyncio.Event().wait()

    bus = Bus(listeners=[stuck], max_pending=1, concurrency=1)
    await bus.start()
    bus.emit("x", n=0)
    await started.wait()  # runs, and holds the only place to run
    thread = threading.Thread(target=bus.emit, args=("x",), kwargs={"n": 2})
    thread.start()
    thread.join()  # blocks the loop: the event waits in the inbox
    bus.emit("x", n=1)  # fills the queue before the loop takes the inbox
    with caplog.at_level(logging.ERROR, logger="tidings"):
        await bus.aclose(timeout=0.05)
    assert seen == [0]
    (error,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "3 undelivered" in error.getMessage()


async def test_publish_waits_for_room_instead_of_raising() -> None:
    counter = Counter()

    @listener("x")
    async def on_x(n: int) -> None:
        counter.add(n)

    async with Bus(listeners=[on_x], max_pending=2) as bus:
        for n in range(20):
            await bus.publish("x", n=n)
        await bus.drain()
    assert counter.calls == list(range(20))


async def test_disable_makes_emit_a_logged_no_op(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TIDINGS_DISABLE", "1")
    caplog.set_level(logging.DEBUG, logger="tidings")
    counter = Counter()

    @listener("x")
    async def on_x() -> None:
        counter.add()

    bus = Bus(listeners=[on_x])
    bus.emit("x")  # not even started: still a no-op
    async with bus:
        bus.emit("x")
        await bus.publish("x")
    assert counter.calls == []
    assert "TIDINGS_DISABLE" in caplog.text


async def test_check_serializable_rejects_at_emit_before_anything_is_queued() -> None:
    counter = Counter()

    @listener("x")
    async def on_x(value: object) -> None:
        counter.add(value)

    async with Bus(listeners=[on_x], check_serializable=True) as bus:
        with pytest.raises(PayloadError, match="value"):
            bus.emit("x", value=object())
        with pytest.raises(PayloadError):
            await bus.publish("x", value={"nested": [1, 1j]})
        bus.emit("x", value=[1, "two", {"three": 3.0}])
    assert counter.calls == [[1, "two", {"three": 3.0}]]


async def test_check_serializable_rejects_at_emit_what_a_durable_store_would_not_deliver() -> None:
    counter = Counter()

    @listener("x")
    async def on_x(n: int) -> None:
        counter.add(n)

    async with Bus(listeners=[on_x], check_serializable=True) as bus:
        # Read back from a store, '42' is not an int: a durable worker makes it a dead
        # letter, so an in-process bus that checks refuses it at once.
        with pytest.raises(BindingError, match=r"parameter 'n' takes int, not '42'"):
            bus.emit("x", n="42")
        with pytest.raises(BindingError, match="'n'"):
            await bus.publish("x", n="42")
        bus.emit("x", n=42)
        await bus.drain()
    assert counter.calls == [42]
    async with Bus(listeners=[on_x]) as unchecked:
        unchecked.emit("x", n="42")  # not asked to check: delivered as it is
        await unchecked.drain()
    assert counter.calls == [42, "42"]


async def test_bus_level_listener_and_subscribe() -> None:
    bus = Bus()
    counter = Counter()

    @bus.listener("a")
    async def on_a() -> None:
        counter.add("a")

    handle = bus.subscribe(lambda: counter.add("b"), "b")
    async with bus:
        bus.emit("a")
        bus.emit("b")
        await bus.drain()
        handle.unsubscribe()
        bus.emit("b")
        await bus.drain()
    assert sorted(counter.calls) == ["a", "b"]  # type: ignore[type-var]
    assert [lst.qualname.rsplit(".", 1)[-1] for lst in bus.listeners()] == ["on_a"]


async def test_include_a_registry_like_a_router() -> None:
    users = Registry()
    counter = Counter()

    @users.listener("user.created")
    async def welcome(email: str) -> None:
        counter.add(email)

    bus = Bus()
    bus.include(users)

    @users.listener("user.created")  # added after include: seen by the bus too
    async def audit(email: str) -> None:
        counter.add("audit " + email)

    async with bus:
        bus.emit("user.created", email="a@example.com")
    assert sorted(counter.calls) == ["a@example.com", "audit a@example.com"]  # type: ignore[type-var]


async def test_stats_and_repr() -> None:
    @listener("x")
    async def ok() -> None:
        pass

    @listener("x")
    async def bad() -> None:
        raise RuntimeError("no")

    bus = Bus(listeners=[ok, bad])
    assert "not started" in repr(bus)
    async with bus:
        bus.emit("x")
        bus.emit("x")
        await bus.drain()
        stats = bus.stats()
        assert "started" in repr(bus)
    assert stats["listeners"][ok.qualname] == {"delivered": 2, "failed": 0}
    assert stats["listeners"][bad.qualname] == {"delivered": 0, "failed": 2}
    assert "backend" in stats


def test_backend_argument_is_checked() -> None:
    with pytest.raises(ConfigurationError, match="backend"):
        Bus(backend=42)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="nope://"):
        Bus(backend="nope://x")
    assert isinstance(Bus("memory://").backend, MemoryBackend)
    backend = MemoryBackend(max_pending=5)
    assert Bus(backend).backend is backend


async def test_aclose_error_names_at_most_a_hundred_ids(caplog: pytest.LogCaptureFixture) -> None:
    @listener("later")
    async def later() -> None:
        pass

    bus = Bus(listeners=[later])
    await bus.start()
    for _ in range(150):
        bus.options(delay=60).emit("later")
    with caplog.at_level(logging.DEBUG, logger="tidings"):
        await bus.aclose(timeout=0.01)
    (error,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "150 undelivered" in error.getMessage()
    assert "and 50 more" in error.getMessage()


def _in_a_thread(fn: Callable[[], None]) -> None:
    """Run ``fn`` in a thread and wait for it without yielding to the event loop, so the
    loop takes what the thread emitted only afterwards."""
    thread = threading.Thread(target=fn)
    thread.start()
    thread.join()


async def test_a_payload_changed_after_a_thread_emitted_it_is_stored_as_emitted(
    tmp_path: Path,
) -> None:
    counter = Counter()

    @listener("order.paid")
    async def paid(order: dict[str, object]) -> None:
        counter.add(order)

    async with Bus(f"sqlite:///{tmp_path / 'e.db'}?poll_interval=0.01", listeners=[paid]) as bus:
        orders = [{"id": n, "lines": [n]} for n in range(4)]

        def emit_then_change() -> None:
            for order in orders:
                bus.emit("order.paid", order=order)
                order["lines"] = [object()]  # no longer serializable
            bus.options(delay=0).emit("order.paid", order={"id": 9, "lines": []})

        _in_a_thread(emit_then_change)
        await counter.wait_for(5)
    assert sorted(counter.calls, key=lambda o: o["id"]) == [  # type: ignore[index]
        *({"id": n, "lines": [n]} for n in range(4)),
        {"id": 9, "lines": []},
    ]


class _Refusing(MemoryBackend):
    """Fails to queue the events called ``bad``, as a backend might."""

    def put(self, event: Event, subs: tuple[Subscription, ...], ctx: contextvars.Context) -> None:
        if event.name == "bad":
            raise RuntimeError("refused")
        super().put(event, subs, ctx)

    def put_later(
        self,
        event: Event,
        subs: tuple[Subscription, ...],
        ctx: contextvars.Context,
        delay_s: float,
    ) -> None:
        if event.name == "bad":
            raise RuntimeError("refused later")
        super().put_later(event, subs, ctx, delay_s)


async def test_a_thread_emit_that_fails_on_the_loop_is_logged_and_stalls_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    counter = Counter()

    @listener("bad", "good")
    async def on_event(event: Event) -> None:
        counter.add(event.name)

    ids: list[str] = []
    bus = Bus(_Refusing(), listeners=[on_event])
    with capture(bus) as captured:
        await bus.start()

        def emit() -> None:
            bus.emit("bad")
            bus.options(delay=0.001).emit("bad")
            for _ in range(3):
                bus.emit("good")
            bus.options(delay=0.001).emit("good")

        _in_a_thread(emit)
        ids = [e.id for e in captured.events if e.name == "bad"]
        await counter.wait_for(4)
        await bus.aclose()
    assert not bus.started
    assert counter.calls == ["good"] * 4
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2
    for event_id, message in zip(ids, errors, strict=True):
        assert event_id in message
        assert "could not be queued" in message


async def test_aclose_takes_its_timeout_by_keyword_only() -> None:
    bus = Bus()
    await bus.start()
    with pytest.raises(TypeError, match=r"aclose\(timeout=5\)"):
        await bus.aclose(5)
    await bus.aclose(object())  # what a framework's shutdown hook passes: ignored
    assert not bus.started


@pytest.mark.parametrize(
    ("value", "disabled"),
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        ("on", True),
        ("false", False),
        ("0", False),
        ("no", False),
        ("off", False),
        ("", False),
    ],
)
async def test_tidings_disable_is_read_as_a_boolean_when_the_bus_starts(
    monkeypatch: pytest.MonkeyPatch, value: str, disabled: bool
) -> None:
    counter = Counter()

    @listener("x")
    async def on_x() -> None:
        counter.add()

    bus = Bus(listeners=[on_x])  # made before the variable is set, as at import
    monkeypatch.setenv("TIDINGS_DISABLE", value)
    async with bus:
        assert bus.disabled is disabled
        bus.emit("x")
        await bus.drain()
    assert len(counter.calls) == (0 if disabled else 1)


def test_tidings_disable_that_is_no_boolean_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TIDINGS_DISABLE", "maybe")
    with pytest.raises(ConfigurationError, match="TIDINGS_DISABLE='maybe' is not a boolean"):
        Bus()


async def test_a_bus_closed_before_it_started_still_starts(tmp_path: Path) -> None:
    from tidings.backends.sqlite import SQLiteBackend

    counter = Counter()

    @listener("x")
    async def on_x() -> None:
        counter.add()

    bus = Bus(SQLiteBackend(str(tmp_path / "e.db"), poll_interval=0.01), listeners=[on_x])
    await bus.aclose()
    async with bus:
        await bus.publish("x")
        await counter.wait_for(1)
