"""What every backend shares: URLs as they are shown, the backend a URL names, and the
protocol's defaults a backend of one method relies on."""

from __future__ import annotations

import pytest

from tidings import BackendError, Bus, ConfigurationError, Event, Retry, listener
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
    assert f"1 undelivered event(s) after 0s: {event_id}" in caplog.text
    assert backend.stats()["pending"] == 0
