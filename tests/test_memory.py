"""The in-process backend: ordering, concurrency limits, eager starts, dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Generator
from typing import Any

import pytest

from tidings import Bus, Event, Listener, NotStartedError, QueueFull, listener
from tidings.backends.base import ListenerStats
from tidings.backends.memory import MemoryBackend
from tidings.testing import capture

from .conftest import Counter


async def test_concurrency_one_keeps_a_listeners_deliveries_in_emit_order() -> None:
    seen: list[int] = []
    running = 0
    most = 0

    @listener("x", concurrency=1)
    async def ordered(n: int) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        for _ in range(n % 3):
            await asyncio.sleep(0)
        seen.append(n)
        running -= 1

    @listener("x")
    async def free(n: int) -> None:
        await asyncio.sleep(0)

    async with Bus(listeners=[ordered, free]) as bus:
        for n in range(300):
            bus.emit("x", n=n)
    assert seen == list(range(300))
    assert most == 1


async def test_listener_concurrency_limit_is_respected() -> None:
    running = 0
    most = 0
    done = Counter()

    @listener("x", concurrency=3)
    async def limited() -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.001)
        running -= 1
        done.add()

    async with Bus(listeners=[limited]) as bus:
        for _ in range(30):
            bus.emit("x")
    assert most == 3
    assert len(done.calls) == 30


async def test_global_concurrency_limit_bounds_suspended_deliveries() -> None:
    running = 0
    most = 0

    @listener("x")
    async def waits() -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.001)
        running -= 1

    async with Bus(listeners=[waits], concurrency=5) as bus:
        for _ in range(100):
            bus.emit("x")
        await bus.drain()
        assert bus.stats()["backend"]["pending"] == 0
    assert most == 5


async def test_what_waits_behind_a_suspended_delivery_is_counted_and_reported() -> None:
    # Events 0-4 run in line, 5 suspends and fills the only slot: 6-9 (and the second
    # listener's delivery of 5) wait, taken from the queue but not started.
    release = asyncio.Event()
    fifth_ran = asyncio.Event()
    ran: list[tuple[str, int]] = []

    @listener("x")
    async def first(n: int) -> None:
        if n == 5:
            await release.wait()
        ran.append(("first", n))

    @listener("x")
    async def second(n: int) -> None:
        ran.append(("second", n))
        if n == 4:
            fifth_ran.set()  # wakes this test once the run of deliveries has stopped

    bus = Bus(listeners=[first, second], concurrency=1)
    await bus.start()
    with capture(bus) as seen:
        for n in range(10):
            bus.emit("x", n=n)
    ids = [event.id for event in seen.events]
    await fifth_ran.wait()
    assert ran == [(name, n) for n in range(5) for name in ("first", "second")]
    assert bus.stats()["backend"] == {
        "pending": 1 + 4 * 2,
        "running": 1,
        "retrying": 0,
        "scheduled": 0,
        "dead": 0,
    }
    assert sorted(await bus.backend.aclose(0)) == sorted(ids[5:])
    await bus.aclose(timeout=0)


async def test_deliveries_behind_suspended_ones_start_in_emit_order() -> None:
    # Each delivery of a listener that awaits goes on in a task; the events after it
    # wait where they are and start in order, each once. (That they are not copied
    # back into the queue each time, which made a burst cost the square of its
    # length, is a matter of speed: bench/inproc.py's listener that awaits.)
    order: list[int] = []
    done = asyncio.Event()

    @listener("x")
    async def awaits(n: int) -> None:
        order.append(n)
        await asyncio.sleep(0)
        if n == 1999:
            done.set()

    async with Bus(listeners=[awaits], concurrency=10_000) as bus:
        for n in range(2000):
            bus.emit("x", n=n)
        await done.wait()
        await bus.drain()
    assert order == list(range(2000))


def _counting_tasks(loop: asyncio.AbstractEventLoop, started: list[str]) -> Any:
    default_factory = loop.get_task_factory()

    def factory(
        loop: asyncio.AbstractEventLoop,
        coro: Coroutine[Any, Any, Any] | Generator[Any, None, Any],
        **kwargs: Any,
    ) -> asyncio.Future[Any]:
        started.append(getattr(coro, "__qualname__", repr(coro)))
        if default_factory is not None:
            return default_factory(loop, coro, **kwargs)
        return asyncio.Task(coro, loop=loop, **kwargs)

    return factory


async def test_listeners_that_do_not_suspend_cost_no_task() -> None:
    loop = asyncio.get_running_loop()
    tasks: list[str] = []
    done = Counter()

    @listener("fast")
    async def fast(n: int) -> None:
        done.add(n)

    @listener("fast")
    async def with_envelope(event: Event, n: int) -> None:
        done.add(n)

    async with Bus(listeners=[fast, with_envelope]) as bus:
        loop.set_task_factory(_counting_tasks(loop, tasks))
        try:
            for n in range(1000):
                bus.emit("fast", n=n)
            await bus.drain()
        finally:
            loop.set_task_factory(None)
    assert tasks == []
    assert len(done.calls) == 2000


async def test_deliveries_that_suspend_cost_no_task_of_their_own() -> None:
    # A suspended delivery keeps its worker, another goes on; the workers stay for the
    # next deliveries: however many deliveries suspend, the tasks are at most as many
    # as the deliveries suspended at once, made once.
    loop = asyncio.get_running_loop()
    tasks: list[str] = []
    calls: list[int] = []

    @listener("x")
    async def sometimes_waits(n: int, waits: bool) -> None:
        calls.append(n)
        if waits:
            await asyncio.sleep(0)

    async with Bus(listeners=[sometimes_waits], concurrency=4) as bus:
        loop.set_task_factory(_counting_tasks(loop, tasks))
        try:
            for burst in range(5):
                for n in range(burst * 12, burst * 12 + 12):
                    bus.emit("x", n=n, waits=n % 12 < 4 or n % 12 >= 8)
                await bus.drain()
        finally:
            loop.set_task_factory(None)
        assert bus.stats()["listeners"][sometimes_waits.qualname]["delivered"] == 60
    assert calls == list(range(60))
    assert 0 < len(tasks) <= 3  # the bus started with one
    assert set(tasks) == {"Pump._work"}


async def test_dead_letters_keep_the_most_recent() -> None:
    @listener("x")
    async def fails(n: int) -> None:
        raise RuntimeError(n)

    async with Bus(MemoryBackend(max_dead_letters=5), listeners=[fails]) as bus:
        for n in range(20):
            bus.emit("x", n=n)
        await bus.drain()
        dead = bus.dead_letters()
        assert bus.stats()["backend"]["dead"] == 5
    assert [d.event.kwargs["n"] for d in dead] == [15, 16, 17, 18, 19]


async def test_replaying_dead_letters_into_a_full_queue_waits_for_room() -> None:
    failing = True
    delivered: list[int] = []
    release = asyncio.Event()

    @listener("x")
    async def flaky(n: int) -> None:
        if failing:
            raise RuntimeError(n)
        delivered.append(n)

    @listener("block")
    async def block() -> None:
        await release.wait()

    async with Bus(listeners=[flaky, block], max_pending=2) as bus:
        for n in range(3):
            await bus.publish("x", n=n)
        await bus.drain()
        assert len(bus.dead_letters()) == 3
        failing = False
        while bus.backend.has_room(1):
            bus.emit("block")  # the queue is full until the loop's next turn
        try:
            assert await bus.replay_dead_letters() == 3
        finally:
            release.set()
        await bus.drain()
        assert bus.dead_letters() == []
    assert delivered == [0, 1, 2]


async def test_listener_stats_list_every_listener_before_the_bus_starts() -> None:
    @listener("x")
    async def one(n: int) -> None:
        pass

    bus = Bus(listeners=[one])
    assert await bus.listener_stats() == {one.qualname: ListenerStats()}


async def test_nothing_starts_once_aclose_reported_it_undelivered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    started: list[int] = []
    running = asyncio.Event()

    @listener("x")
    async def stuck(n: int) -> None:
        started.append(n)
        running.set()
        await asyncio.Event().wait()

    bus = Bus(listeners=[stuck], concurrency=1)
    await bus.start()
    bus.emit("x", n=0)
    bus.emit("x", n=1)  # waits for the first, which never ends
    await running.wait()
    with caplog.at_level(logging.ERROR, logger="tidings"):
        await bus.aclose(timeout=0.05)
    # Cancelling the first made room for the second: it must not start all the same.
    assert started == [0]
    assert "2 undelivered" in caplog.text


async def test_max_pending_counts_what_waits_behind_a_suspended_delivery() -> None:
    # A pump takes the waiting events at once; those it could not start yet (the only
    # place to run is taken) still wait, and count against max_pending.
    release = asyncio.Event()
    suspended = asyncio.Event()

    @listener("x")
    async def slow(n: int) -> None:
        if n == 1:
            suspended.set()
            await release.wait()

    bus = Bus(listeners=[slow], max_pending=3, concurrency=1)
    await bus.start()
    for n in range(3):
        bus.emit("x", n=n)
    await suspended.wait()  # 0 ran, 1 holds the only place, 2 waits
    bus.emit("x", n=3)
    bus.emit("x", n=4)
    with pytest.raises(QueueFull, match="holds 3 events"):
        bus.emit("x", n=5)
    assert bus.stats()["backend"]["pending"] == 3
    release.set()
    await bus.aclose()


async def test_a_publish_waiting_for_room_when_the_bus_closes_raises() -> None:
    running = asyncio.Event()

    @listener("x")
    async def stuck(n: int) -> None:
        running.set()
        await asyncio.Event().wait()

    bus = Bus(listeners=[stuck], max_pending=1, concurrency=1)
    await bus.start()
    bus.emit("x", n=1)
    await running.wait()
    bus.emit("x", n=2)  # fills the queue
    waiting = asyncio.create_task(bus.publish("x", n=3))  # waits while aclose drains
    await bus.aclose(timeout=0.05)
    with pytest.raises(NotStartedError, match="closed while it waited for room"):
        await waiting


async def test_aclose_reports_delayed_and_retrying_events_as_undelivered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from tidings import Retry

    @listener("x", retry=Retry(attempts=2, backoff=60))
    async def fails() -> None:
        raise RuntimeError

    @listener("later")
    async def later() -> None:
        pass

    bus = Bus(listeners=[fails, later])
    await bus.start()
    bus.options(delay=60).emit("later")
    bus.emit("x")
    await asyncio.sleep(0)  # let the first attempt fail
    assert bus.stats()["backend"]["retrying"] == 1
    assert bus.stats()["backend"]["scheduled"] == 1
    await bus.aclose(timeout=0.01)
    assert "2 undelivered" in caplog.text


async def test_publish_from_many_tasks_with_a_tiny_queue_loses_nothing() -> None:
    done = Counter()

    @listener("x")
    async def slow(n: int) -> None:
        await asyncio.sleep(0)
        done.add(n)

    async with Bus(listeners=[slow], max_pending=4) as bus:

        async def producer(base: int) -> None:
            for n in range(50):
                await bus.publish("x", n=base + n)

        await asyncio.gather(*(producer(b * 1000) for b in range(5)))
        await bus.drain()
    assert len(done.calls) == 250


async def test_a_context_change_by_one_listener_reaches_no_later_event() -> None:
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="-")
    seen: list[tuple[int, str]] = []

    @listener("x")
    async def sets(n: int) -> None:
        if n == 1:
            var.set("set by a listener")

    @listener("x")
    async def reads(n: int) -> None:
        seen.append((n, var.get()))

    async with Bus(listeners=[sets, reads]) as bus:
        var.set("emitter")
        for n in range(4):
            bus.emit("x", n=n)
        await bus.drain()
    assert seen == [(n, "emitter") for n in range(4)]


async def test_events_from_different_contexts_each_see_their_own() -> None:
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="-")
    seen: list[tuple[int, str]] = []

    @listener("x")
    async def reads(n: int) -> None:
        seen.append((n, var.get()))

    async with Bus(listeners=[reads]) as bus:
        for n in range(6):
            var.set(f"request {n // 2}")
            bus.emit("x", n=n)
        await bus.drain()
    assert seen == [(n, f"request {n // 2}") for n in range(6)]


async def test_equal_but_distinct_context_values_are_never_swapped() -> None:
    # Two requests each keep a dict of their own in a context variable; the dicts are
    # equal when the events are emitted, and each listener must see its own.
    import contextvars

    state: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("state")
    states: dict[int, dict[str, str]] = {}
    seen: dict[int, bool] = {}

    @listener("x")
    async def reads(n: int) -> None:
        seen[n] = state.get() is states[n]

    async def request(bus: Bus, n: int) -> None:
        states[n] = {}
        state.set(states[n])
        bus.emit("x", n=n)
        bus.emit("x", n=n + 10)
        states[n + 10] = states[n]

    async with Bus(listeners=[reads]) as bus:
        await asyncio.gather(*(request(bus, n) for n in range(3)))
        await bus.drain()
    assert seen == dict.fromkeys((0, 1, 2, 10, 11, 12), True)


@pytest.mark.parametrize("strict", [False, True])
async def test_no_emitters_context_is_kept_alive_once_its_events_ran(strict: bool) -> None:
    import contextvars
    import gc
    import weakref

    class Session:
        pass

    var: contextvars.ContextVar[Session] = contextvars.ContextVar("session")
    seen: list[bool] = []

    @listener("x")
    async def uses(n: int) -> None:
        seen.append(isinstance(var.get(), Session))

    async with Bus(listeners=[uses], strict=strict) as bus:

        def request() -> weakref.ref[Session]:
            session = Session()
            var.set(session)
            bus.emit("x", n=1)
            return weakref.ref(session)

        ref = contextvars.Context().run(request)  # a context only tidings could keep
        await bus.drain()
        gc.collect()
        assert seen == [True]
        assert ref() is None


async def test_a_listener_that_emits_sees_and_passes_on_its_context() -> None:
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="-")
    seen: list[tuple[str, str]] = []

    @listener("a")
    async def first(event: Event) -> None:
        seen.append(("a", var.get()))
        emitter.emit("b")

    @listener("b")
    async def second() -> None:
        seen.append(("b", var.get()))

    async with Bus(listeners=[first, second]) as emitter:
        for n in range(3):
            var.set(f"request {n}")
            emitter.emit("a")
        await emitter.drain()
    assert sorted(seen) == sorted([(kind, f"request {n}") for n in range(3) for kind in ("a", "b")])


async def test_every_event_once_and_in_order_however_the_deliveries_go() -> None:
    # Contexts that change every few events, listeners that suspend or set a context
    # variable now and then, a listener that runs in a thread: each takes a different
    # way out of the run of deliveries in progress, and nothing may be lost, repeated
    # or reordered for a listener that never suspends.
    import contextvars

    var: contextvars.ContextVar[int] = contextvars.ContextVar("var", default=-1)
    plain: list[tuple[int, int]] = []
    waited: list[int] = []
    threaded: list[int] = []

    @listener("x")
    async def records(n: int) -> None:
        plain.append((n, var.get()))

    @listener("x")
    async def sometimes_waits(n: int) -> None:
        if n % 7 == 0:
            await asyncio.sleep(0)
        waited.append(n)

    @listener("x")
    async def sometimes_sets(n: int) -> None:
        if n % 5 == 0:
            var.set(10_000 + n)

    @listener("x")
    def in_a_thread(n: int) -> None:
        threaded.append(n)

    async with Bus(
        listeners=[sometimes_sets, records, sometimes_waits, in_a_thread], concurrency=3
    ) as bus:
        for n in range(300):
            if n % 4 == 0:
                var.set(n // 4)
            bus.emit("x", n=n)
        await bus.drain()
        counts = bus.stats()["listeners"]
    assert plain == [(n, n // 4) for n in range(300)]
    assert list(counts.values()) == [{"delivered": 300, "failed": 0}] * 4
    assert sorted(waited) == list(range(300))
    assert sorted(threaded) == list(range(300))


async def test_a_listener_resumed_in_a_task_emits_to_listeners_that_suspend_too() -> None:
    # A suspended delivery goes on in a task of its own; what it emits from there is
    # delivered in its context, by a pump that may be handed to a task in turn: each
    # delivery still happens once.
    calls: list[str] = []

    @listener("x")
    async def waits_then_emits(n: int) -> None:
        await asyncio.sleep(0)
        calls.append(f"x {n}")
        if n < 3:
            bus.emit("x", n=n + 1)

    @listener("x")
    async def after(n: int) -> None:
        await asyncio.sleep(0)
        calls.append(f"after {n}")

    async with Bus(listeners=[waits_then_emits, after]) as bus:
        bus.emit("x", n=0)
        await bus.drain()
    assert sorted(calls) == sorted(f"{kind} {n}" for n in range(4) for kind in ("x", "after"))


async def test_a_suspended_listener_holds_back_neither_the_others_nor_later_events() -> None:
    release = asyncio.Event()
    order: list[str] = []
    done = Counter()

    @listener("x")
    async def waits(n: int) -> None:
        if n == 0:
            await release.wait()
        order.append(f"waits {n}")
        done.add()

    @listener("x")
    async def quick(n: int) -> None:
        order.append(f"quick {n}")
        done.add()

    async with Bus(listeners=[waits, quick]) as bus:
        for n in range(3):
            bus.emit("x", n=n)
        await done.wait_for(5)
        assert order == ["quick 0", "waits 1", "quick 1", "waits 2", "quick 2"]
        release.set()
        await bus.drain()
    assert order[-1] == "waits 0"


async def test_listeners_taking_part_of_the_payload_or_raising_type_errors() -> None:
    got: list[object] = []

    @listener("user.created")
    async def mail(email: str) -> None:
        got.append(email)

    @listener("user.created")
    async def broken(name: str, email: str) -> None:
        raise TypeError("raised inside the listener")

    async with Bus(listeners=[mail, broken]) as bus:
        for i in range(3):
            bus.emit("user.created", name=f"u{i}", email=f"u{i}@example.com")
        await bus.drain()
        dead = bus.dead_letters()
    assert got == [f"u{i}@example.com" for i in range(3)]
    assert [d.listener.rsplit(".", 1)[-1] for d in dead] == ["broken"] * 3
    assert all("raised inside the listener" in d.error for d in dead)


async def test_a_timeout_applies_once_a_listener_suspends() -> None:
    @listener("x", timeout=0.01)
    async def hangs() -> None:
        await asyncio.Event().wait()

    @listener("x")
    async def fine() -> None:
        pass

    async with Bus(listeners=[hangs, fine]) as bus:
        bus.emit("x")
        await bus.drain()
        dead = bus.dead_letters()
        assert bus.stats()["listeners"][fine.qualname]["delivered"] == 1
    assert len(dead) == 1
    assert "timed out after 0.01s" in dead[0].error


async def test_max_pending_counts_events_however_many_listeners() -> None:
    from tidings import QueueFull

    @listener("x")
    async def one() -> None:
        pass

    @listener("x")
    async def two() -> None:
        pass

    async with Bus(listeners=[one, two], max_pending=3) as bus:
        for _ in range(3):
            bus.emit("x")
        assert bus.stats()["backend"]["pending"] == 6
        with pytest.raises(QueueFull, match="max_pending=3"):
            bus.emit("x")
        await bus.drain()
        bus.emit("x")


async def test_payload_keywords_in_any_order_and_more_than_a_listener_names() -> None:
    got: list[tuple[Any, ...]] = []

    @listener("x")
    async def none() -> None:
        got.append(())

    @listener("x")
    async def one(c: int) -> None:
        got.append((c,))

    @listener("x")
    async def two(b: int, a: int) -> None:
        got.append((b, a))

    @listener("x")
    async def four(a: int, b: int, c: int, d: int) -> None:
        got.append((a, b, c, d))

    @listener("x")
    async def defaults(a: int, z: int = 26) -> None:
        got.append((a, z))

    @listener("x")
    async def keyword_only(*, d: int) -> None:
        got.append((d,))

    @listener("x")
    async def missing(a: int, y: int) -> None:
        got.append((a, y))

    @listener("x")
    async def missing_one(y: int) -> None:
        got.append((y,))

    listeners: list[Listener[..., Any]] = [
        none,
        one,
        two,
        four,
        defaults,
        keyword_only,
        missing,
        missing_one,
    ]
    async with Bus(listeners=listeners) as bus:
        for _ in range(2):
            bus.emit("x", d=4, c=3, b=2, a=1)
        await bus.drain()
        dead = bus.dead_letters()
    assert got == [(), (3,), (2, 1), (1, 2, 3, 4), (1, 26), (4,)] * 2
    assert [d.listener.rsplit(".", 1)[-1] for d in dead] == ["missing", "missing_one"] * 2
    assert all("parameter 'y' is required" in d.error for d in dead)


async def test_wrapped_listeners_taking_part_of_the_payload_are_planned() -> None:
    import functools

    got: list[str] = []

    def logged(fn: Any) -> Any:
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            return await fn(*args, **kwargs)

        return wrapper

    @listener("user.created")
    @logged
    async def mail(email: str) -> None:
        got.append(email)

    async with Bus(listeners=[mail]) as bus:
        bus.emit("user.created", name="Ada", email="ada@example.com")
        await bus.drain()
        assert bus.dead_letters() == []
    assert got == ["ada@example.com"]


async def test_what_a_delivery_sets_after_it_suspended_reaches_no_later_event() -> None:
    # A worker goes on with the next events once its suspended delivery ends: in a
    # fresh copy of the emitter's context if that delivery set a variable.
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="-")
    seen: list[tuple[int, str, str]] = []

    @listener("x")
    async def sets_after_waiting(n: int) -> None:
        before = var.get()
        await asyncio.sleep(0)
        seen.append((n, before, var.get()))
        var.set(f"set by {n}")

    async with Bus(listeners=[sets_after_waiting], concurrency=1) as bus:
        var.set("emitter")
        for n in range(5):
            bus.emit("x", n=n)
        await bus.drain()
    assert seen == [(n, "emitter", "emitter") for n in range(5)]


async def test_a_timed_out_delivery_frees_its_worker_for_the_next() -> None:
    started: list[int] = []

    @listener("x", timeout=0.01)
    async def hangs_once(n: int) -> None:
        started.append(n)
        if n == 0:
            await asyncio.Event().wait()
        await asyncio.sleep(0)

    async with Bus(listeners=[hangs_once], concurrency=1) as bus:
        for n in range(3):
            bus.emit("x", n=n)
        await bus.drain()
        dead = bus.dead_letters()
        assert bus.stats()["listeners"][hangs_once.qualname] == {"delivered": 2, "failed": 1}
    assert started == [0, 1, 2]
    assert [d.event.kwargs["n"] for d in dead] == [0]
    assert "timed out after 0.01s" in dead[0].error


async def test_a_listener_that_swallows_its_timeout_succeeds_and_its_worker_goes_on() -> None:
    # As with asyncio.timeout: a cancellation the listener catches ends nothing, and
    # the worker is not left being cancelled.
    cancelling: list[int] = []

    @listener("x", timeout=0.01)
    async def stubborn(n: int) -> None:
        if n == 0:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()
        await asyncio.sleep(0)
        task = asyncio.current_task()
        assert task is not None
        if n > 0:
            cancelling.append(task.cancelling())

    async with Bus(listeners=[stubborn], concurrency=1) as bus:
        for n in range(3):
            bus.emit("x", n=n)
        await bus.drain()
        assert bus.stats()["listeners"][stubborn.qualname] == {"delivered": 3, "failed": 0}
    assert cancelling == [0, 0]


async def test_a_listeners_own_timeout_works_where_it_is_driven() -> None:
    outcomes: list[str] = []

    @listener("x")
    async def bounded(n: int) -> None:
        try:
            async with asyncio.timeout(0.001):
                await asyncio.Event().wait()
        except TimeoutError:
            outcomes.append(f"timed out {n}")

    async with Bus(listeners=[bounded], concurrency=1) as bus:
        for n in range(3):
            bus.emit("x", n=n)
        await bus.drain()
    assert outcomes == [f"timed out {n}" for n in range(3)]


async def test_suspended_deliveries_are_bounded_by_the_workers_and_all_run() -> None:
    # More deliveries suspended than the bus lets run at once: the rest wait in line
    # and start, in order, as places free up.
    running = 0
    most = 0
    order: list[int] = []

    @listener("x")
    async def waits(n: int) -> None:
        nonlocal running, most
        order.append(n)
        running += 1
        most = max(most, running)
        for _ in range(n % 4):
            await asyncio.sleep(0)
        running -= 1

    async with Bus(listeners=[waits], concurrency=7) as bus:
        for n in range(500):
            bus.emit("x", n=n)
        await bus.drain()
        assert bus.stats()["backend"]["running"] == 0
    assert order == list(range(500))
    assert most == 7


async def test_a_listener_runs_in_a_task_from_its_first_step() -> None:
    # asyncio.timeout, anyio's cancel scopes and sniffio look for the running task
    # before a listener ever suspends.
    seen: list[str] = []

    @listener("x")
    async def bounded(n: int) -> None:
        async with asyncio.timeout(5):
            seen.append(f"{n} in a task: {asyncio.current_task() is not None}")
            await asyncio.sleep(0)

    async with Bus(listeners=[bounded]) as bus:
        for n in range(2):
            bus.emit("x", n=n)
        await bus.drain()
        assert bus.dead_letters() == []
    assert seen == ["0 in a task: True", "1 in a task: True"]


async def test_closing_runs_the_delayed_events_due_within_its_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    got: list[int] = []

    @listener("a.b")
    async def note(x: int) -> None:
        got.append(x)

    bus = Bus(listeners=[note], shutdown_timeout=30)
    async with bus:
        bus.options(delay=0.01).emit("a.b", x=1)
        bus.options(delay=3600).emit("a.b", x=2)
        began = time.monotonic()
    assert got == [1]
    # The one due in an hour is reported at once, with the time really waited.
    assert time.monotonic() - began < 10
    assert "1 undelivered event(s) after 0.0" in caplog.text
