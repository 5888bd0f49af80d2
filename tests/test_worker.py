"""``tidings worker`` as a user runs it: a subprocess killed or stopped mid-stream."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import cast

import pytest

from tidings import Bus, ConfigurationError, listener
from tidings.backends.durable import Claimed, DurableBackend
from tidings.worker import run_worker

from . import crash_app, stuck_app
from .services import (
    POSTGRES_URL,
    REDIS_URL,
    drop_prefix,
    drop_schema,
    require_postgres,
    require_redis,
    unique_prefix,
    unique_schema,
)

EVENTS = 5000
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["sqlite", "redis", "postgres"])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The store the worker runs on: a fresh SQLite file, a key prefix or a schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'events.db'}?lease=1&poll_interval=0.01"
        return
    if request.param == "postgres":
        require_postgres()
        schema = unique_schema()
        try:
            yield f"{POSTGRES_URL}?schema={schema}&lease=1&poll_interval=0.01"
        finally:
            await drop_schema(schema)
        return
    require_redis()
    prefix = unique_prefix()
    try:
        yield f"{REDIS_URL}?prefix={prefix}&lease=1&poll_interval=0.01"
    finally:
        await drop_prefix(prefix)


def _env(tmp_path: Path, url: str) -> dict[str, str]:
    env = dict(os.environ)
    env["TIDINGS_TEST_URL"] = url
    env["TIDINGS_TEST_OUT"] = str(tmp_path / "deliveries.txt")
    env["PYTHONPATH"] = str(ROOT)
    return env


_started: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _reap() -> Iterator[None]:
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _start_worker(
    env: dict[str, str], app: str = "tests.crash_app:bus", *options: str
) -> subprocess.Popen[bytes]:
    log = Path(env["TIDINGS_TEST_OUT"]).with_suffix(".log")
    with log.open("ab") as stderr:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tidings.cli",
                "worker",
                app,
                "--concurrency",
                "50",
                *options,
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    _started.append(proc)
    return proc


def _deliveries(tmp_path: Path) -> collections.Counter[str]:
    path = tmp_path / "deliveries.txt"
    if not path.exists():
        return collections.Counter()
    return collections.Counter(path.read_text().splitlines())


async def _publish(tmp_path: Path, env: dict[str, str]) -> None:
    bus = Bus(env["TIDINGS_TEST_URL"], listeners=[crash_app.first, crash_app.second], consume=False)
    async with bus:
        for n in range(EVENTS):
            bus.emit("job", n=n)


async def _wait_for(tmp_path: Path, at_least: int, proc: subprocess.Popen[bytes]) -> None:
    """Wait until ``at_least`` distinct deliveries were made."""
    for _ in range(6000):
        if len(_deliveries(tmp_path)) >= at_least:
            return
        assert proc.poll() is None, (tmp_path / "deliveries.log").read_text()
        await asyncio.sleep(0.01)
    raise AssertionError(f"fewer than {at_least} deliveries after 60s")


def _lost_and_duplicates(tmp_path: Path) -> tuple[int, int]:
    seen = _deliveries(tmp_path)
    expected = {f"{tag} {n}" for tag in ("first", "second") for n in range(EVENTS)}
    lost = len(expected - set(seen))
    duplicates = sum(count - 1 for count in seen.values())
    return lost, duplicates


@pytest.mark.timeout(120)
async def test_sigkill_mid_stream_loses_nothing(tmp_path: Path, store_url: str) -> None:
    env = _env(tmp_path, store_url)
    await _publish(tmp_path, env)
    victim = _start_worker(env)
    await _wait_for(tmp_path, EVENTS // 2, victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = sum(_deliveries(tmp_path).values())
    assert killed_at < 2 * EVENTS, "the worker finished before it was killed"
    survivor = _start_worker(env)
    try:
        await _wait_for(tmp_path, 2 * EVENTS, survivor)
        lost, duplicates = _lost_and_duplicates(tmp_path)
        assert lost == 0
        # At most what was running or not yet acknowledged when it died: 50 per listener
        # running, plus one batch of acks on their way.
        assert duplicates <= 2 * 50 + 2 * 500
        print(f"\nSIGKILL after {killed_at} deliveries: lost {lost}, duplicates {duplicates}")
    finally:
        survivor.send_signal(signal.SIGTERM)
        assert survivor.wait(30) == 0


@pytest.mark.timeout(120)
async def test_sigterm_loses_nothing_and_repeats_nothing(tmp_path: Path, store_url: str) -> None:
    env = _env(tmp_path, store_url)
    await _publish(tmp_path, env)
    first = _start_worker(env)
    await _wait_for(tmp_path, EVENTS // 2, first)
    first.send_signal(signal.SIGTERM)
    assert first.wait(30) == 0
    stopped_at = sum(_deliveries(tmp_path).values())
    assert stopped_at < 2 * EVENTS, "the worker finished before it was stopped"
    second = _start_worker(env)
    try:
        await _wait_for(tmp_path, 2 * EVENTS, second)
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
    assert _lost_and_duplicates(tmp_path) == (0, 0)


async def test_a_worker_needs_a_durable_backend() -> None:
    with pytest.raises(ConfigurationError, match="durable backend"):
        await run_worker(Bus())


async def test_a_worker_with_no_matching_listener_says_so(tmp_path: Path) -> None:
    bus = Bus(f"sqlite:///{tmp_path / 'x.db'}", listeners=[crash_app.first], consume=False)
    with pytest.raises(
        ConfigurationError,
        match=r"none matches nothing\.here; the bus's listeners are tests\.crash_app\.first$",
    ):
        await run_worker(bus, listeners=["nothing.here"])


async def test_run_worker_stops_on_its_event(tmp_path: Path) -> None:
    bus = Bus(f"sqlite:///{tmp_path / 'x.db'}", listeners=[crash_app.first], consume=False)
    stop = asyncio.Event()
    ready: list[int] = []

    def on_ready(count: int) -> None:
        ready.append(count)
        stop.set()

    await run_worker(bus, concurrency=5, on_ready=on_ready, stop=stop, shutdown_timeout=1)
    assert ready == [1]
    assert not bus.started


async def test_a_worker_holds_a_delivery_whose_thread_outlives_its_stop(tmp_path: Path) -> None:
    gate = threading.Event()
    started = asyncio.Event()
    loop = asyncio.get_running_loop()

    @listener("x")
    def blocked() -> None:
        loop.call_soon_threadsafe(started.set)
        gate.wait(30)

    url = f"sqlite:///{tmp_path / 'events.db'}?poll_interval=0.01&lease=0.3"
    async with Bus(url, listeners=[blocked], consume=False) as producer:
        await producer.publish("x")
    bus = Bus(url, listeners=[blocked])
    backend = cast(DurableBackend, bus.backend)
    aclose, renew = bus.aclose, backend.renew
    closed = asyncio.Event()
    renewed_after_close = asyncio.Event()

    async def watched_aclose(*, timeout: float | None = None) -> None:
        await aclose(timeout=timeout)
        closed.set()

    async def watched_renew(claimed: Sequence[Claimed], lease_s: float) -> list[Claimed] | None:
        out = await renew(claimed, lease_s)
        if closed.is_set():
            renewed_after_close.set()
        return out

    bus.aclose = watched_aclose  # type: ignore[method-assign,assignment]
    backend.renew = watched_renew  # type: ignore[method-assign]
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(bus, stop=stop, shutdown_timeout=0))
    try:
        await started.wait()
        stop.set()
        await renewed_after_close.wait()  # closed, and still holding the delivery
        assert not worker.done()
    finally:
        gate.set()
    await worker  # once the thread returned
    async with Bus(url, consume=False) as bus:
        stats = (await bus.listener_stats())[blocked.qualname]
    assert (stats.pending, stats.in_flight, stats.dead) == (0, 0, 0)


async def _wait_until(done: Callable[[], bool], proc: subprocess.Popen[bytes]) -> None:
    """Wait until ``done()`` holds, while the worker runs."""
    for _ in range(3000):
        if done():
            return
        assert proc.poll() is None, "the worker exited"
        await asyncio.sleep(0.01)
    raise AssertionError("not done after 30s")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_a_second_signal_ends_a_worker_waiting_for_a_thread(
    tmp_path: Path, sig: signal.Signals
) -> None:
    url = f"sqlite:///{tmp_path / 'events.db'}?poll_interval=0.01"
    env = _env(tmp_path, url)
    async with Bus(url, listeners=[stuck_app.stuck], consume=False) as producer:
        await producer.publish("stuck")
    proc = _start_worker(env, "tests.stuck_app:bus", "--shutdown-timeout", "0.1")
    log = tmp_path / "deliveries.log"
    await _wait_until(lambda: _deliveries(tmp_path)["started"] == 1, proc)
    proc.send_signal(sig)
    # Past the shutdown timeout, waiting for the thread, which still holds the delivery.
    await _wait_until(lambda: "its thread still runs" in log.read_text(), proc)
    assert "a second SIGTERM or SIGINT stops waiting" in log.read_text()
    proc.send_signal(sig)
    assert proc.wait(30) == 128 + sig
    said = log.read_text()
    assert f"worker stopped at a second {sig.name} without waiting" in said
    assert "Traceback" not in said
    assert "Exception ignored" not in said
    async with Bus(url, consume=False) as viewer:
        stats = (await viewer.listener_stats())[stuck_app.stuck.qualname]
    # Neither acknowledged nor dead: its lease is left to expire.
    assert (stats.pending + stats.in_flight, stats.dead) == (1, 0)
