"""The bus from sync code: ``with Bus(...) as bus:``, ``publish_sync`` and ``run_sync``."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest

from tidings import BackendError, Bus, ConfigurationError, Event, NotStartedError, listener

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


@pytest.fixture(params=["memory", "sqlite"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    """Where the bus keeps its deliveries: in process, or in a SQLite file."""
    if request.param == "memory":
        return None
    return f"sqlite:///{tmp_path / 'events.db'}?poll_interval=0.01"


def bus_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "tidings-bus"]


SCRIPT = """
import sys
from tidings import Bus, listener

seen = []


@listener("tick")
def count(n: int) -> None:  # a sync listener, in the bus's thread pool
    seen.append(n)


@listener("tick")
async def count_async(n: int) -> None:  # an async one, on the bus's loop
    seen.append(-n)


url = sys.argv[1] if len(sys.argv) > 1 else None
with Bus(url, listeners=[count, count_async]) as bus:
    for n in range(1, 101):
        bus.emit("tick", n=n)
    bus.publish_sync("tick", n=1000)
# Leaving the block drained the bus: every delivery ran.
print(len(seen), sum(n for n in seen if n > 0), sum(n for n in seen if n < 0))
"""


def test_a_plain_script_emits_with_no_event_loop_and_exit_drains(
    url: str | None, tmp_path: Path
) -> None:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(SCRIPT))
    args = [sys.executable, str(script)] + ([url] if url else [])
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["202", "6050", "-6050"]


def make_wsgi_app(bus: Bus) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    """A sync WSGI app (what a Flask or Django view runs in) that emits per request."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        if path.startswith("/stored/"):
            bus.publish_sync("page.viewed", path=path)  # returns once accepted
        else:
            bus.emit("page.viewed", path=path)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    return app


def request(app: Callable[[dict[str, Any], StartResponse], Iterable[bytes]], path: str) -> bytes:
    environ: dict[str, Any] = {"PATH_INFO": path}
    setup_testing_defaults(environ)
    statuses: list[str] = []
    body = b"".join(app(environ, lambda status, headers: statuses.append(status)))
    assert statuses == ["200 OK"]
    return body


def test_a_wsgi_app_served_by_threads_emits_and_every_event_is_delivered(
    url: str | None,
) -> None:
    seen: list[str] = []
    lock = threading.Lock()

    @listener("page.viewed")
    def record(path: str) -> None:
        with lock:
            seen.append(path)

    paths = [f"/{kind}/{n}" for n in range(50) for kind in ("emitted", "stored")]
    with Bus(url, listeners=[record]) as bus:
        app = make_wsgi_app(bus)
        # As a threaded WSGI server calls it: requests at once, on threads of its own.
        with ThreadPoolExecutor(8) as server:
            bodies = list(server.map(lambda p: request(app, p), paths))
        assert bodies == [b"ok"] * len(paths)
    assert sorted(seen) == sorted(paths)
    assert bus_threads() == []


def test_a_listener_subscribed_from_the_calling_thread_gets_what_is_emitted_next(
    url: str | None,
) -> None:
    seen: list[int] = []

    def later(n: int) -> None:
        seen.append(n)

    with Bus(url) as bus:
        bus.subscribe(later, "tick")
        bus.emit("tick", n=1)
        bus.publish_sync("tick", n=2)
    assert sorted(seen) == [1, 2]


def test_errors_at_start_raise_in_the_calling_thread() -> None:
    # Nothing listens on port 1: the store cannot be reached.
    bus = Bus("postgresql://postgres@127.0.0.1:1/test")
    with pytest.raises(BackendError, match="cannot connect to PostgreSQL"), bus:
        pytest.fail("the block must not run")
    assert not bus.started
    assert bus_threads() == []


def test_exit_is_bounded_by_the_shutdown_timeout(caplog: pytest.LogCaptureFixture) -> None:
    @listener("stuck")
    async def never_returns() -> None:
        await asyncio.Event().wait()

    caplog.set_level(logging.ERROR, "tidings.bus")
    with Bus(listeners=[never_returns], shutdown_timeout=0.1) as bus:
        bus.emit("stuck")
        bus.run_sync(asyncio.sleep(0))  # it has started
    assert "bus closed with 1 undelivered event(s)" in caplog.text
    assert bus_threads() == []
    with pytest.raises(NotStartedError, match="closed"):
        bus.emit("stuck")


def test_events_are_emitted_from_any_thread_with_the_emitters_context(url: str | None) -> None:
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
    seen: list[tuple[int, str]] = []

    @listener("job.done")
    async def record(n: int) -> None:
        seen.append((n, request_id.get()))

    def worker(n: int) -> None:
        request_id.set(f"r{n}")
        bus.emit("job.done", n=n)
        bus.publish_sync("job.done", n=100 + n)

    with Bus(url, listeners=[record]) as bus:
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        bus.run_sync(bus.drain())
        assert len(seen) == 8
    assert sorted(n for n, _ in seen) == [0, 1, 2, 3, 100, 101, 102, 103]
    if url is None:
        # In process, each listener sees the context of the thread that emitted.
        assert sorted(seen) == sorted(
            [(n, f"r{n}") for n in range(4)] + [(100 + n, f"r{n}") for n in range(4)]
        )


def test_publish_sync_returns_once_the_event_is_stored(tmp_path: Path) -> None:
    @listener("order.paid")
    def ship(order_id: int) -> None: ...

    url = f"sqlite:///{tmp_path / 'events.db'}"
    with Bus(url, listeners=[ship], consume=False) as producer:
        producer.publish_sync("order.paid", order_id=7)
        stats = producer.run_sync(producer.listener_stats())
    assert stats[ship.qualname].pending == 1


def test_sync_waits_are_refused_where_they_would_wait_forever() -> None:
    errors: list[BaseException] = []

    def on_dead(event: Event, listener: object, error: BaseException) -> None:
        errors.append(error)

    bus = Bus(on_dead=on_dead)

    @bus.listener("inline", inline=True)
    def publishes_on_the_loop() -> None:  # runs on the bus's own loop
        bus.publish_sync("other")

    with pytest.raises(NotStartedError, match="not started"):
        bus.publish_sync("other")
    with bus:
        bus.emit("inline")
        bus.run_sync(bus.drain())
        with pytest.raises(ConfigurationError, match="started already"):
            bus.__enter__()
    assert len(errors) == 1
    assert isinstance(errors[0], ConfigurationError)
    assert "own event loop" in str(errors[0])
    with pytest.raises(NotStartedError, match="closed"):
        bus.run_sync(bus.drain())


async def test_a_bus_started_on_a_running_loop_cannot_also_run_in_a_thread() -> None:
    async with Bus() as bus:
        with pytest.raises(ConfigurationError, match="started already"), bus:
            pass


def test_a_sync_wait_on_a_bus_whose_loop_stopped_raises_instead_of_hanging() -> None:
    loop = asyncio.new_event_loop()
    try:
        bus = Bus()
        loop.run_until_complete(bus.start())  # the loop stops running here, bus open
        with pytest.raises(NotStartedError, match="event loop is not running"):
            bus.publish_sync("x")
        loop.run_until_complete(bus.aclose())
    finally:
        loop.close()
