"""What every backend shares: URLs as they are shown, the backend a URL names, and the
protocol's defaults a backend of one method relies on."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from tidings import BackendError, Bus, ConfigurationError, Event, QueueFull, Retry, listener
from tidings.backends import Backend, Delivery
from tidings.backends._options import redact


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:hunter2@localhost:1/0", "redis://user:***@localhost:1/0"),
        ("redis://:hunter2@localhost/0", "redis://:***@localhost/0"),
        (
            "redis://h/0?password=hunter2&prefix=app&api_key=k1&token=t1",
            "redis://h/0?password=***&prefix=app&api_key=***&token=***",
        ),
        (
            "postgresql://app@db/app?sslpassword=hunter2&secret=s&pass=p&schema=events",
            "postgresql://app@db/app?sslpassword=***&secret=***&pass=***&schema=events",
        ),
        ("sqlite:///events.db?key=hunter2", "sqlite:///events.db?key=***"),
        ("sqlite:///events.db?poll_interval=0.1", "sqlite:///events.db?poll_interval=0.1"),
        ("memory://", "memory://"),
    ],
)
def test_credentials_are_never_shown(url: str, shown: str) -> None:
    assert redact(url) == shown


async def test_a_memory_url_sets_its_options_and_refuses_others() -> None:
    bus = Bus("memory://?concurrency=1&max_pending=1")
    seen: list[int] = []

    @bus.listener("e")
    async def slow(n: int) -> None:
        seen.append(n)
        await asyncio.sleep(0)

    async with bus:
        bus.emit("e", n=1)
        with pytest.raises(QueueFull):
            bus.emit("e", n=2)
        await bus.drain()
    assert seen == [1]
    with pytest.raises(ConfigurationError, match=r"unknown option 'bogus'.*max_pending"):
        Bus("memory://?bogus=1")


async def test_a_bus_shows_no_credential_in_its_url_repr_or_connection_error() -> None:
    url = "redis://user:hunter2@127.0.0.1:1/0?password=s3cret&socket_timeout=1"
    with pytest.raises(ConfigurationError, match="unknown option 'token'") as refused:
        Bus(f"{url}&token=t0ken")
    assert "t0ken" not in str(refused.value)
    bus = Bus(url)
    for text in (bus.url, repr(bus.backend), repr(bus)):
        assert "hunter2" not in text
        assert "s3cret" not in text
    with pytest.raises(BackendError) as raised:
        await bus.start()
    message = str(raised.value)
    assert "127.0.0.1:1" in message
    for secret in ("hunter2", "s3cret", "t0ken"):
        assert secret not in message


def test_the_tests_keep_off_the_redis_database_apps_use(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from .. import services

    monkeypatch.delenv("TIDINGS_TEST_REDIS", raising=False)
    fresh = importlib.reload(services)
    try:
        assert fresh.REDIS_URL == "redis://127.0.0.1:6379/15"
    finally:
        monkeypatch.undo()
        importlib.reload(services)


# -- the protocol's defaults: a backend of one method ----------------------------------


class _Now(Backend):
    """Runs each delivery at once."""

    def deliver(self, delivery: Delivery) -> None:
        delivery.start()


class _Kept(Backend):
    """Keeps each delivery for the test to run (or not)."""

    def __init__(self) -> None:
        super().__init__()
        self.kept: list[Delivery] = []

    def deliver(self, delivery: Delivery) -> None:
        self.kept.append(delivery)


def test_a_one_method_backend_delivers_from_other_threads_retries_and_keeps_dead_letters() -> None:
    calls: list[tuple[int, int]] = []

    @listener("job.due", retry=Retry(attempts=2, backoff=0))
    def work(n: int, event: Event) -> None:
        calls.append((n, event.attempt))
        if n == 2:
            raise ValueError("bad job")

    with Bus(_Now(), listeners=[work]) as bus:
        bus.emit("job.due", n=1)  # from this thread, not the bus's
        bus.emit("job.due", n=2)
        bus.run_sync(bus.drain())
        (letter,) = bus.run_sync(bus.list_dead_letters())
        assert (letter.listener, letter.attempts) == (work.qualname, 2)
        assert bus.run_sync(bus.listener_stats())[work.qualname].dead == 1
        assert bus.backend.stats() == {"pending": 0, "dead": 1}
        assert bus.run_sync(bus.replay_dead_letters()) == 1
        bus.run_sync(bus.drain())
        assert bus.run_sync(bus.purge_dead_letters()) == 1
    assert sorted(calls) == [(1, 1), (2, 1), (2, 1), (2, 2), (2, 2)]


async def test_a_delivery_runs_when_awaited_even_on_another_loop_and_drain_waits_for_it() -> None:
    ran: list[int] = []

    @listener("job.due")
    async def work(n: int) -> None:
        ran.append(n)

    backend = _Kept()
    bus = Bus(backend, listeners=[work])
    with bus:
        bus.emit("job.due", n=1)
        bus.run_sync(bus.inbox.empty())
        (delivery,) = backend.kept
        assert delivery.listener == work.qualname
        assert bus.backend.stats()["pending"] == 1
        await delivery()  # this test's loop; the bus runs on its own thread's
        bus.run_sync(bus.drain())
    assert ran == [1]


async def test_closing_reports_and_forgets_deliveries_that_never_ran(
    caplog: pytest.LogCaptureFixture,
) -> None:
    @listener("job.due")
    async def work(n: int) -> None:
        raise AssertionError("never runs")

    backend = _Kept()
    async with Bus(backend, listeners=[work], shutdown_timeout=0) as bus:
        bus.emit("job.due", n=1)
        event_id = backend.kept[0].event.id
    assert f"1 undelivered event(s) after 0.00s: {event_id}" in caplog.text
    assert backend.stats()["pending"] == 0


async def test_closing_runs_the_delayed_events_due_within_its_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    got: list[int] = []

    @listener("job.due")
    async def work(n: int) -> None:
        got.append(n)

    async with Bus(_Now(), listeners=[work], shutdown_timeout=30) as bus:
        bus.options(delay=0.01).emit("job.due", n=1)
        bus.options(delay=3600).emit("job.due", n=2)
        began = time.monotonic()
    assert got == [1]
    # The one due in an hour is reported at once, not waited for.
    assert time.monotonic() - began < 10
    assert "1 undelivered event(s) after 0.0" in caplog.text


class _Refusing(Backend):
    """Raises on the deliveries ``refuses`` picks, and runs the others at once."""

    def __init__(self, refuses: str) -> None:
        super().__init__()
        self.refuses = refuses

    def deliver(self, delivery: Delivery) -> None:
        if (self.refuses == "first" and delivery.event.kwargs["n"] == 1) or (
            self.refuses == "retries" and delivery.event.attempt > 1
        ):
            raise RuntimeError("the pool is full")
        delivery.start()


async def test_an_emit_that_deliver_raises_on_leaves_nothing_pending() -> None:
    ran: list[int] = []

    @listener("job.due")
    async def work(n: int) -> None:
        ran.append(n)

    backend = _Refusing("first")
    async with Bus(backend, listeners=[work]) as bus:
        with pytest.raises(RuntimeError, match="the pool is full"):
            bus.emit("job.due", n=1)
        assert backend.stats()["pending"] == 0
        bus.emit("job.due", n=2)
        await asyncio.wait_for(bus.drain(), 10)
    assert ran == [2]


def test_an_emit_from_another_thread_that_deliver_raises_on_leaves_nothing_pending(
    caplog: pytest.LogCaptureFixture,
) -> None:
    @listener("job.due")
    def work(n: int) -> None:
        pass

    backend = _Refusing("first")
    with Bus(backend, listeners=[work]) as bus:
        bus.emit("job.due", n=1)  # from this thread: queued on the bus's
        bus.run_sync(bus.inbox.empty())
        assert backend.stats()["pending"] == 0
        bus.run_sync(asyncio.wait_for(bus.drain(), 10))
    assert "could not be queued" in caplog.text


async def test_a_retry_that_deliver_raises_on_is_kept_as_a_dead_letter() -> None:
    @listener("job.due", retry=Retry(attempts=3, backoff=0))
    async def work(n: int) -> None:
        raise ValueError("bad job")

    backend = _Refusing("retries")
    async with Bus(backend, listeners=[work]) as bus:
        bus.emit("job.due", n=2)
        await asyncio.wait_for(bus.drain(), 10)
        assert backend.stats()["pending"] == 0
        (letter,) = await bus.list_dead_letters()
        assert (letter.listener, letter.attempts) == (work.qualname, 2)
        assert letter.error == "RuntimeError: the pool is full"


async def test_a_delivery_cancelled_as_the_bus_closed_never_runs_later(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ran: list[int] = []

    @listener("job.due")
    async def work(n: int) -> None:
        ran.append(n)

    backend = _Kept()
    async with Bus(backend, listeners=[work], shutdown_timeout=0) as bus:
        bus.emit("job.due", n=1)
    (delivery,) = backend.kept
    assert delivery.cancelled
    with caplog.at_level(logging.WARNING, logger="tidings.delivery"):
        await delivery()  # a framework's background task, run after the bus closed
        assert delivery.start() is None
    assert ran == []
    assert "was cancelled" in caplog.text


async def test_a_delivery_started_twice_runs_once(caplog: pytest.LogCaptureFixture) -> None:
    ran: list[int] = []
    release = asyncio.Event()

    @listener("job.due")
    async def work(n: int) -> None:
        ran.append(n)
        await release.wait()

    backend = _Kept()
    async with Bus(backend, listeners=[work]) as bus:
        bus.emit("job.due", n=1)
        await bus.inbox.empty()
        (delivery,) = backend.kept
        first = delivery.start()
        with caplog.at_level(logging.WARNING, logger="tidings.delivery"):
            assert delivery.start() is first
        release.set()
        await delivery()
        assert delivery.start() is None
    assert ran == [1]
    assert "started already" in caplog.text


async def test_a_listeners_concurrency_holds_on_a_one_method_backend() -> None:
    running: list[int] = []
    finished: list[int] = []
    peak = 0
    started, release = asyncio.Event(), asyncio.Event()

    @listener("job.due", concurrency=1)
    async def work(n: int) -> None:
        nonlocal peak
        running.append(n)
        peak = max(peak, len(running))
        started.set()
        await release.wait()
        running.remove(n)
        finished.append(n)

    backend = _Now()
    async with Bus(backend, listeners=[work]) as bus:
        for n in range(3):
            bus.emit("job.due", n=n)
        await started.wait()  # any other started by now would have run as far
        assert running == [0]
        assert backend.stats()["pending"] == 3  # those held back count as pending
        release.set()
        await asyncio.wait_for(bus.drain(), 10)
    assert (peak, finished) == (1, [0, 1, 2])


async def test_drain_does_not_wait_for_a_delayed_event_and_closing_reports_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    @listener("job.due")
    async def work(n: int) -> None:
        raise AssertionError("due in an hour")

    backend = _Now()
    async with Bus(backend, listeners=[work], shutdown_timeout=0) as bus:
        bus.options(delay=3600).emit("job.due", n=1)
        await asyncio.wait_for(bus.drain(), 10)
        assert backend.stats()["pending"] == 0
    assert "1 undelivered event(s) after 0.00s: " in caplog.text


async def test_a_backend_that_skips_super_init_is_told_at_start() -> None:
    class Forgetful(Backend):
        def __init__(self) -> None:
            pass

        def deliver(self, delivery: Delivery) -> None:
            delivery.start()

    with pytest.raises(ConfigurationError, match=r"must call super\(\)\.__init__\(\)"):
        async with Bus(Forgetful()):
            pass


async def test_a_timeout_of_the_work_run_in_place_of_the_listener_names_the_delivery() -> None:
    never = asyncio.Event()

    class Forwarding(Backend):
        def deliver(self, delivery: Delivery) -> None:
            async def forward(event: Event) -> None:
                await never.wait()

            delivery.start(work=forward)

    @listener("job.due", timeout=0.01)
    async def work(n: int) -> None:
        pass

    async with Bus(Forwarding(), listeners=[work]) as bus:
        bus.emit("job.due", n=1)
        await asyncio.wait_for(bus.drain(), 10)
        (letter,) = await bus.list_dead_letters()
    assert f"delivery to {work.qualname} timed out after 0.01s" in letter.error


@pytest.mark.parametrize(
    ("url", "old", "new"),
    [
        ("sqlite:///events.db?lease_s=5", "lease_s", "lease"),
        ("redis://127.0.0.1:6379/15?poll_s=0.1", "poll_s", "poll_interval"),
        ("redis://127.0.0.1:6379/15?timeout_s=2", "timeout_s", "timeout"),
        ("postgresql://postgres@127.0.0.1/test?retention_s=60", "retention_s", "retention"),
        (
            "postgresql://postgres@127.0.0.1/test?stale_listener_s=60",
            "stale_listener_s",
            "stale_after",
        ),
    ],
)
def test_an_option_of_an_earlier_release_is_named_with_its_new_name(
    url: str, old: str, new: str
) -> None:
    with pytest.raises(ConfigurationError, match=f"option '{old}' .* is now '{new}'"):
        Bus(url)
