"""Deliveries: isolation of failures, retries, timeouts, hooks and dead letters."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import threading
import time
from datetime import timedelta
from typing import Any

import pytest

from tidings import (
    BindingError,
    Bus,
    ConfigurationError,
    Event,
    Listener,
    Registry,
    Retry,
    listener,
)
from tidings.backends.memory import MemoryBackend

from .conftest import Counter

FAST = Retry(attempts=3, backoff=0.001, jitter=0)


async def test_raising_sync_and_async_listeners_never_disturb_a_healthy_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    healthy = Counter()

    @listener("user.created")
    async def broken_async(email: str) -> None:
        raise RuntimeError(f"smtp down for {email}")

    @listener("user.created")
    def broken_sync(email: str) -> None:
        raise ValueError("audit table missing")

    @listener("user.created")
    async def healthy_listener(email: str) -> None:
        await asyncio.sleep(0)
        healthy.add(email)

    with caplog.at_level(logging.ERROR, logger="tidings"):
        async with Bus(listeners=[broken_async, broken_sync, healthy_listener]) as bus:
            for i in range(20):
                bus.emit("user.created", email=f"u{i}@example.com")
            await bus.drain()
            dead = bus.dead_letters()
    assert len(healthy.calls) == 20
    assert len(dead) == 40
    assert {d.listener for d in dead} == {broken_async.qualname, broken_sync.qualname}
    assert any("RuntimeError: smtp down" in d.error for d in dead)
    assert any("ValueError: audit table missing" in d.error for d in dead)
    assert "Traceback" in dead[0].traceback


async def test_a_failure_is_logged_with_id_name_listener_attempt_and_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    @listener("order.paid")
    async def charge(order_id: int) -> None:
        raise RuntimeError("card declined")

    with caplog.at_level(logging.WARNING, logger="tidings"):
        async with Bus(listeners=[charge]) as bus:
            from tidings.testing import capture

            with capture(bus) as captured:
                bus.emit("order.paid", order_id=7)
            await bus.drain()
    (record,) = [r for r in caplog.records if r.name.startswith("tidings")]
    message = record.getMessage()
    assert captured.events[0].id in message
    assert "order.paid" in message
    assert charge.qualname in message
    assert "attempt 1/1" in message
    assert record.exc_info is not None
    assert "card declined" in caplog.text


async def test_retry_counts_attempts_then_dead_letters() -> None:
    attempts: list[int] = []

    @listener("x", retry=FAST)
    async def always_fails(event: Event) -> None:
        attempts.append(event.attempt)
        raise ConnectionError("down")

    async with Bus(listeners=[always_fails]) as bus:
        bus.emit("x")
        await bus.drain()
        (dead,) = bus.dead_letters()
    assert attempts == [1, 2, 3]
    assert dead.attempts == 3
    assert dead.event.name == "x"
    assert dead.listener == always_fails.qualname


async def test_retry_keeps_the_event_id_and_succeeds_on_a_later_attempt() -> None:
    ids: list[tuple[str, int]] = []

    @listener("x", retry=FAST)
    def flaky(event: Event) -> None:  # sync: retried the same way
        ids.append((event.id, event.attempt))
        if event.attempt < 2:
            raise ConnectionError("hiccup")

    async with Bus(listeners=[flaky]) as bus:
        bus.emit("x")
        await bus.drain()
        assert bus.dead_letters() == []
        assert bus.stats()["listeners"][flaky.qualname] == {"delivered": 1, "failed": 1}
    assert [a for _, a in ids] == [1, 2]
    assert ids[0][0] == ids[1][0]


async def test_retry_on_only_retries_the_listed_exceptions() -> None:
    attempts: list[int] = []

    @listener("x", retry=Retry(attempts=5, backoff=0, on=(ConnectionError,)))
    async def picky(event: Event) -> None:
        attempts.append(event.attempt)
        raise ValueError("not worth retrying")

    async with Bus(listeners=[picky]) as bus:
        bus.emit("x")
        await bus.drain()
    assert attempts == [1]


async def test_bus_default_retry_and_listener_override() -> None:
    seen: dict[str, list[int]] = {"default": [], "own": []}

    @listener("x")
    async def uses_default(event: Event) -> None:
        seen["default"].append(event.attempt)
        raise RuntimeError

    @listener("x", retry=1)
    async def never_retries(event: Event) -> None:
        seen["own"].append(event.attempt)
        raise RuntimeError

    async with Bus(listeners=[uses_default, never_retries], retry=FAST) as bus:
        bus.emit("x")
        await bus.drain()
    assert seen == {"default": [1, 2, 3], "own": [1]}


async def test_no_retry_by_default() -> None:
    attempts: list[int] = []

    @listener("x")
    async def fails(event: Event) -> None:
        attempts.append(event.attempt)
        raise RuntimeError

    async with Bus(listeners=[fails]) as bus:
        bus.emit("x")
    assert attempts == [1]


def test_retry_backoff_grows_and_is_capped() -> None:
    retry = Retry(attempts=10, backoff=timedelta(seconds=1), factor=2, max_backoff=5, jitter=0)
    assert [retry.delay_for(n) for n in range(1, 6)] == [1, 2, 4, 5, 5]
    jittered = Retry(backoff=1, jitter=0.5)
    for _ in range(100):
        assert 0.5 <= jittered.delay_for(1) <= 1.5
    capped = Retry(attempts=10, backoff=1, max_backoff=4, jitter=0.5)
    waits = [capped.delay_for(5) for _ in range(200)]
    assert max(waits) <= 4
    assert min(waits) < 4  # still spread out below the cap


def test_retry_backoff_without_a_cap_keeps_growing() -> None:
    uncapped = Retry(attempts=20, backoff=1, max_backoff=math.inf, jitter=0)
    assert uncapped.delay_for(11) == 1024


@pytest.mark.parametrize("backoff", [-1, float("nan"), "1"])
def test_a_retry_backoff_that_is_no_duration_is_refused(backoff: Any) -> None:
    with pytest.raises(ConfigurationError, match="backoff"):
        Retry(backoff=backoff)


def test_retry_backoff_stays_capped_however_late_the_attempt() -> None:
    assert Retry(attempts=5000, backoff=1, max_backoff=60, jitter=0).delay_for(1100) == 60
    assert Retry(attempts=5000, backoff=0, max_backoff=60, jitter=0).delay_for(1100) == 0


@pytest.mark.parametrize("kind", ["in line", "concurrency 1", "thread", "inline"])
async def test_a_retry_starts_from_the_emitters_context_not_what_the_attempt_set(
    kind: str,
) -> None:
    mark: contextvars.ContextVar[str] = contextvars.ContextVar("mark", default="clean")
    seen: list[str] = []

    def attempt(event: Event) -> None:
        seen.append(mark.get())
        mark.set(f"set by attempt {event.attempt}")
        if event.attempt == 1:
            raise ValueError("once")

    async def attempt_async(event: Event) -> None:
        attempt(event)

    options: dict[str, Any] = {"retry": Retry(attempts=2, backoff=0, jitter=0)}
    if kind == "concurrency 1":
        options["concurrency"] = 1
    if kind == "inline":
        options["inline"] = True
    fn = attempt_async if kind in ("in line", "concurrency 1") else attempt
    async with Bus(listeners=[listener("x", **options)(fn)]) as bus:
        bus.emit("x")
        await bus.drain()
    assert seen == ["clean", "clean"]


def test_a_bus_timeout_must_be_positive() -> None:
    with pytest.raises(ConfigurationError, match="the bus's timeout must be more than 0 seconds"):
        Bus(timeout=0)


def test_retry_rejects_nonsense() -> None:
    with pytest.raises(ConfigurationError, match="attempts"):
        Retry(attempts=0)
    with pytest.raises(ConfigurationError, match="jitter"):
        Retry(jitter=2)


async def test_timeout_fails_the_attempt_and_counts_towards_retries() -> None:
    attempts: list[int] = []

    @listener("x", timeout=0.01, retry=Retry(attempts=2, backoff=0, jitter=0))
    async def hangs(event: Event) -> None:
        attempts.append(event.attempt)
        await asyncio.Event().wait()

    async with Bus(listeners=[hangs]) as bus:
        bus.emit("x")
        await bus.drain()
        (dead,) = bus.dead_letters()
    assert attempts == [1, 2]
    assert "TimeoutError" in dead.error
    assert "timed out after 0.01s" in dead.error


async def test_a_listener_that_suspends_again_and_again_can_time_out_or_fail() -> None:
    # Past its first suspension, a delivery's coroutine is driven by delegation: a
    # timeout must still reach it (and run its cleanup), and its error be recorded.
    cleaned: list[str] = []

    @listener("x", timeout=0.05)
    async def hangs_later() -> None:
        try:
            for _ in range(3):
                await asyncio.sleep(0)
            await asyncio.Event().wait()
        finally:
            cleaned.append("hangs_later")

    @listener("x")
    async def fails_later() -> None:
        for _ in range(3):
            await asyncio.sleep(0)
        raise ValueError("late")

    async with Bus(listeners=[hangs_later, fails_later]) as bus:
        bus.emit("x")
        await bus.drain()
        dead = {letter.listener.rsplit(".", 1)[-1]: letter.error for letter in bus.dead_letters()}
    assert cleaned == ["hangs_later"]
    assert "timed out after 0.05s" in dead["hangs_later"]
    assert "ValueError: late" in dead["fails_later"]


@pytest.mark.parametrize("suspends", [False, True])
async def test_a_listener_that_raises_cancelled_error_itself_fails_alone(suspends: bool) -> None:
    # Awaiting a future that was cancelled raises CancelledError in the listener: a
    # failure of that delivery, not a cancellation of the bus's work.
    ran: list[int] = []
    cancelled = asyncio.get_running_loop().create_future()
    cancelled.cancel()

    @listener("x")
    async def awaits_a_cancelled_future(n: int) -> None:
        if suspends:
            await asyncio.sleep(0)
        if n == 0:
            await cancelled

    @listener("x", concurrency=1)
    async def eager_too(n: int) -> None:
        if n == 1:
            await cancelled

    @listener("x")
    async def other(n: int) -> None:
        ran.append(n)

    async with Bus(listeners=[awaits_a_cancelled_future, eager_too, other]) as bus:
        for n in range(3):
            bus.emit("x", n=n)
        await asyncio.wait_for(bus.drain(), 5)
        dead = sorted(
            (d.event.kwargs["n"], d.listener.rsplit(".", 1)[-1]) for d in bus.dead_letters()
        )
    assert ran == [0, 1, 2]
    assert dead == [(0, "awaits_a_cancelled_future"), (1, "eager_too")]


async def test_a_listeners_own_timeout_error_is_its_own_not_a_delivery_timeout() -> None:
    @listener("sync.remote")
    async def pull() -> None:
        await asyncio.wait_for(asyncio.Event().wait(), 0.001)  # its own TimeoutError

    @listener("sync.remote", timeout=10)
    async def pull_in_time() -> None:
        await asyncio.wait_for(asyncio.Event().wait(), 0.001)

    async with Bus(listeners=[pull, pull_in_time]) as bus:
        bus.emit("sync.remote")
        await bus.drain()
        dead = bus.dead_letters()
    assert len(dead) == 2
    for letter in dead:
        assert "timed out after" not in letter.error
        assert "wait_for" in letter.traceback


async def test_a_sync_listeners_timeout_counts_from_when_a_thread_runs_it() -> None:
    # One thread for four deliveries: the last waits for three others, which is no
    # part of its own time.
    runs: list[int] = []

    @listener("job", timeout=0.3)
    def work(n: int) -> None:
        time.sleep(0.1)
        runs.append(n)

    async with Bus(listeners=[work], sync_workers=1) as bus:
        for n in range(4):
            bus.emit("job", n=n)
        await bus.drain()
        assert bus.dead_letters() == []
    assert runs == [0, 1, 2, 3]


async def test_bus_default_timeout_applies_to_sync_listeners_too() -> None:
    release = threading.Event()

    @listener("x")
    def blocks() -> None:
        release.wait(5)

    async with Bus(listeners=[blocks], timeout=0.01) as bus:
        bus.emit("x")
        await bus.drain()
        dead = bus.dead_letters()
        release.set()
    assert len(dead) == 1
    assert "timed out" in dead[0].error


async def test_hooks_at_bus_registry_and_listener_level() -> None:
    calls: list[str] = []

    def record(level: str, kind: str) -> Any:
        def hook(event: Event, lst: Listener[..., Any], *exc: BaseException) -> None:
            calls.append(f"{level}.{kind}:{lst.qualname.rsplit('.', 1)[-1]}:{event.attempt}")

        return hook

    async def async_hook(event: Event, lst: Listener[..., Any]) -> None:
        await asyncio.sleep(0)
        calls.append("bus.async_success")

    registry = Registry(
        on_error=record("registry", "error"),
        on_success=record("registry", "success"),
        on_dead=record("registry", "dead"),
    )

    @registry.listener(
        "x",
        retry=Retry(attempts=2, backoff=0, jitter=0),
        on_error=record("listener", "error"),
        on_dead=record("listener", "dead"),
    )
    async def fails() -> None:
        raise RuntimeError

    @registry.listener("x", on_success=record("listener", "success"))
    async def works() -> None:
        pass

    bus = Bus(
        on_error=record("bus", "error"),
        on_success=[record("bus", "success"), async_hook],
        on_dead=record("bus", "dead"),
    )
    bus.include(registry)
    async with bus:
        bus.emit("x")
        await bus.drain()
        assert "bus.async_success" in calls  # drain waits for async hooks
    assert [c for c in calls if ":fails:" in c] == [
        "listener.error:fails:1",
        "registry.error:fails:1",
        "bus.error:fails:1",
        "listener.error:fails:2",
        "registry.error:fails:2",
        "bus.error:fails:2",
        "listener.dead:fails:2",
        "registry.dead:fails:2",
        "bus.dead:fails:2",
    ]
    assert [c for c in calls if ":works:" in c] == [
        "listener.success:works:1",
        "registry.success:works:1",
        "bus.success:works:1",
    ]


async def test_drain_waits_for_what_async_hooks_emit() -> None:
    alerts: list[str] = []

    async def on_dead(event: Event, lst: Listener[..., Any], exc: BaseException) -> None:
        await asyncio.sleep(0)
        bus.emit("alert", what=event.name)

    @listener("x")
    async def fails() -> None:
        raise RuntimeError("boom")

    @listener("alert")
    async def alert(what: str) -> None:
        await asyncio.sleep(0)
        alerts.append(what)

    bus = Bus(listeners=[fails, alert], on_dead=on_dead)
    async with bus:
        bus.emit("x")
        await bus.drain()
        assert alerts == ["x"]


async def test_a_raising_hook_is_logged_and_harmless(caplog: pytest.LogCaptureFixture) -> None:
    counter = Counter()

    def bad_hook(event: Event, lst: Listener[..., Any]) -> None:
        raise RuntimeError("hook bug")

    @listener("x", on_success=bad_hook)
    async def works() -> None:
        counter.add()

    with caplog.at_level(logging.ERROR, logger="tidings"):
        async with Bus(listeners=[works]) as bus:
            bus.emit("x")
            bus.emit("x")
    assert len(counter.calls) == 2
    assert "hook bug" in caplog.text


async def test_binding_errors_are_failures_never_retried_and_never_a_bare_type_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    attempts = Counter()

    @listener("user.created", retry=FAST)
    async def needs_phone(phone: str) -> None:
        attempts.add()

    with caplog.at_level(logging.ERROR, logger="tidings"):
        async with Bus(listeners=[needs_phone]) as bus:
            bus.emit("user.created", email="a@example.com")
            await bus.drain()
            (dead,) = bus.dead_letters()
    assert attempts.calls == []
    assert dead.attempts == 1
    assert dead.error.startswith("BindingError")
    for part in (needs_phone.qualname, "user.created", "phone"):
        assert part in dead.error


async def test_strict_bus_raises_binding_errors_at_emit() -> None:
    @listener("user.created")
    async def needs_phone(phone: str) -> None:
        pass

    async with Bus(listeners=[needs_phone], strict=True) as bus:
        with pytest.raises(BindingError, match="phone") as info:
            bus.emit("user.created", email="a@example.com")
        assert isinstance(info.value, TypeError)
        bus.emit("user.created", phone="+1")


@pytest.mark.parametrize("inline", [False, True])
async def test_a_plain_function_that_returns_a_coroutine_has_it_awaited(inline: bool) -> None:
    # A sync wrapper of an async function (a decorator that does not mark its wrapper
    # as async, a lambda): what it returns is the listener's work.
    done: list[int] = []

    async def handle(n: int) -> None:
        await asyncio.sleep(0)
        if n == 2:
            raise ValueError("two")
        done.append(n)

    on_x = listener("x", inline=inline)(lambda n: handle(n))
    async with Bus(listeners=[on_x]) as bus:
        for n in range(3):
            bus.emit("x", n=n)
        await bus.drain()
        (dead,) = bus.dead_letters()
    assert sorted(done) == [0, 1]
    assert "ValueError: two" in dead.error


@pytest.mark.parametrize("concurrency", [None, 1])
async def test_the_coroutine_a_plain_function_returns_runs_in_its_emitters_context(
    concurrency: int | None,
) -> None:
    mark: contextvars.ContextVar[str] = contextvars.ContextVar("mark", default="unset")
    seen: list[tuple[int, str]] = []

    async def work(n: int) -> None:
        await asyncio.sleep(0)
        seen.append((n, mark.get()))

    on_x = listener("x", concurrency=concurrency)(lambda n: work(n))
    async with Bus(listeners=[on_x]) as bus:

        async def emit(n: int) -> None:
            mark.set(f"emitter {n}")
            bus.emit("x", n=n)

        for n in range(3):
            await asyncio.create_task(emit(n))
        await bus.drain()
    assert sorted(seen) == [(n, f"emitter {n}") for n in range(3)]


async def test_sync_listeners_run_in_threads_unless_inline() -> None:
    threads: dict[str, int] = {}

    @listener("x")
    def in_pool() -> None:
        threads["pool"] = threading.get_ident()

    @listener("x", inline=True)
    def on_loop() -> None:
        threads["inline"] = threading.get_ident()

    async with Bus(listeners=[in_pool, on_loop], sync_workers=2) as bus:
        bus.emit("x")
    assert threads["inline"] == threading.get_ident()
    assert threads["pool"] != threading.get_ident()


async def test_async_callable_objects_are_listeners() -> None:
    class Mailer:
        def __init__(self) -> None:
            self.sent: list[str] = []

        async def __call__(self, email: str) -> None:
            await asyncio.sleep(0)
            self.sent.append(email)

    mailer = Mailer()
    async with Bus(listeners=[listener("user.created")(mailer)]) as bus:
        bus.emit("user.created", email="a@example.com", name="Ada")
    assert mailer.sent == ["a@example.com"]


async def test_many_failures_at_once_keep_the_bus_healthy() -> None:
    ok = Counter()

    @listener("x")
    async def sometimes(n: int) -> None:
        if n % 2:
            await asyncio.sleep(0)
            raise RuntimeError(n)
        ok.add(n)

    async with Bus(listeners=[sometimes]) as bus:
        for n in range(1000):
            bus.emit("x", n=n)
        await bus.drain()
        assert len(bus.dead_letters()) == 500
        bus.emit("x", n=2000)
        await bus.drain()
    assert len(ok.calls) == 501


async def test_a_retried_attempt_is_one_line_and_the_traceback_comes_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    @listener("order.paid", retry=FAST)
    async def charge(order_id: int) -> None:
        raise RuntimeError(f"card declined for {order_id}")

    with caplog.at_level(logging.INFO, logger="tidings"):
        async with Bus(listeners=[charge]) as bus:
            bus.emit("order.paid", order_id=7)
            await bus.drain()
    records = [r for r in caplog.records if r.name == "tidings.delivery"]
    assert [(r.levelno, r.exc_info is not None) for r in records] == [
        (logging.WARNING, False),
        (logging.WARNING, False),
        (logging.ERROR, True),
    ]
    assert "attempt 1/3: RuntimeError: card declined for 7; retrying" in records[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="tidings"):
        async with Bus(listeners=[charge]) as bus:
            bus.emit("order.paid", order_id=8)
            await bus.drain()
    retried = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(retried) == 2
    assert all(r.exc_info is not None for r in retried)


class _BrokenBackend(MemoryBackend):
    """A custom backend whose ``retry`` / ``dead`` has a bug."""

    def __init__(self, broken: str) -> None:
        super().__init__()
        self.broken = broken

    def retry(self, event: Event, sub: Any, ctx: contextvars.Context, delay_s: float) -> None:
        if self.broken == "retry":
            self.no_such_attribute.append(event)  # type: ignore[attr-defined]
        super().retry(event, sub, ctx, delay_s)

    def dead(self, event: Event, sub: Any, exc: BaseException) -> None:
        if self.broken == "dead":
            self.no_such_attribute.append(event)  # type: ignore[attr-defined]
        super().dead(event, sub, exc)


@pytest.mark.parametrize("broken", ["retry", "dead"])
async def test_a_backend_raising_on_a_retry_or_dead_letter_loses_nothing(
    broken: str, caplog: pytest.LogCaptureFixture
) -> None:
    @listener("order.paid", retry=Retry(attempts=2, backoff=0))
    async def charge(order_id: int) -> None:
        raise RuntimeError(f"card declined for {order_id}")

    with caplog.at_level(logging.ERROR, logger="tidings"):
        async with Bus(_BrokenBackend(broken), listeners=[charge]) as bus:
            bus.emit("order.paid", order_id=7)
            await bus.drain()
            (letter,) = bus.dead_letters()
            assert await bus.list_dead_letters() == [letter]
            assert letter.listener == charge.qualname
            assert letter.event.kwargs == {"order_id": 7}
            assert letter.error == "RuntimeError: card declined for 7"
            assert f"_BrokenBackend.{broken}() raised" in letter.traceback
            assert "AttributeError" in letter.traceback
            (logged,) = [
                r for r in caplog.records if f"_BrokenBackend.{broken}() raised" in r.getMessage()
            ]
            assert letter.event.id in logged.getMessage()
            assert charge.qualname in logged.getMessage()
            assert "AttributeError" in logged.getMessage()
            assert await bus.replay_dead_letters() == 1
            await bus.drain()
            assert len(bus.dead_letters()) == 1  # failed again, and kept again
            assert await bus.purge_dead_letters(ids=[letter.event.id]) == 1
            assert bus.dead_letters() == []


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no words")


async def test_an_error_whose_str_raises_is_a_dead_letter_and_the_others_still_run() -> None:
    ran: list[str] = []

    @listener("x.y")
    async def unprintable() -> None:
        ran.append("unprintable")
        raise _Unprintable

    @listener("x.y")
    async def after() -> None:
        ran.append("after")

    async with Bus(listeners=[unprintable, after]) as bus:
        bus.emit("x.y")
    assert ran == ["unprintable", "after"]
    [dead] = await bus.list_dead_letters()
    assert dead.error == "_Unprintable: <exception str() failed>"
