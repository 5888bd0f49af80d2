"""Prometheus metrics: names, labels and values as a scrape reads them."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO

import pytest
from prometheus_client import REGISTRY, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from tidings import Bus, Retry, listener
from tidings.errors import ConfigurationError
from tidings.metrics import CONTENT_TYPE, instrument, metrics_of, serve

ROOT = Path(__file__).resolve().parent.parent

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _samples(text: bytes | str) -> Samples:
    """Every sample of a text exposition, by name and sorted labels."""
    text = text.decode() if isinstance(text, bytes) else text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, tuple(sorted(labels.items()))]


@listener("order.paid")
async def charge(order_id: int) -> None:
    if order_id < 0:
        raise ValueError("refused")


@listener("order.*", retry=Retry(attempts=2, backoff=0))
async def flaky(order_id: int) -> None:
    raise RuntimeError("down")


@listener("report.due", timeout=0.01)
async def slow(report_id: str) -> None:
    await asyncio.Event().wait()


CHARGE = charge.qualname
FLAKY = flaky.qualname
SLOW = slow.qualname


async def test_in_process_counts_outcomes_without_leaving_the_fast_path() -> None:
    bus = Bus(listeners=[charge, flaky, slow])
    metrics = instrument(bus)
    assert not metrics.detailed
    async with bus:
        assert bus._hot  # emit keeps its flat path
        for n in (1, 2, -1):
            bus.emit("order.paid", order_id=n)
        bus.emit("report.due", report_id="r1")
        await bus.drain()
        samples = _samples(await metrics.scrape())
    deliveries = "tidings_deliveries_total"
    assert _value(samples, deliveries, listener=CHARGE, outcome="ok") == 2
    assert _value(samples, deliveries, listener=CHARGE, outcome="dead") == 1
    assert _value(samples, deliveries, listener=CHARGE, outcome="retried") == 0
    # Three events, two attempts each: the first retried, the second dead.
    assert _value(samples, deliveries, listener=FLAKY, outcome="retried") == 3
    assert _value(samples, deliveries, listener=FLAKY, outcome="dead") == 3
    assert _value(samples, deliveries, listener=SLOW, outcome="timeout") == 1
    assert _value(samples, deliveries, listener=SLOW, outcome="dead") == 0
    assert _value(samples, "tidings_dead_letters", listener=CHARGE) == 1
    assert _value(samples, "tidings_dead_letters", listener=FLAKY) == 3
    assert _value(samples, "tidings_deliveries_in_progress", listener=CHARGE) == 0
    # Emits and durations too, counted by the backend as it goes.
    emitted = "tidings_events_emitted_total"
    assert _value(samples, emitted, event="order.paid") == 3
    assert _value(samples, emitted, event="report.due") == 1
    duration = "tidings_delivery_duration_seconds"
    assert _value(samples, f"{duration}_count", listener=CHARGE) == 3
    assert _value(samples, f"{duration}_bucket", listener=CHARGE, le="0.005") == 3
    assert _value(samples, f"{duration}_count", listener=FLAKY) == 6
    # The one that waited until its timeout was timed: 10 ms at least.
    assert _value(samples, f"{duration}_count", listener=SLOW) == 1
    assert _value(samples, f"{duration}_bucket", listener=SLOW, le="0.005") == 0
    assert _value(samples, f"{duration}_sum", listener=SLOW) >= 0.01


async def test_in_process_deliveries_in_progress_and_their_durations() -> None:
    started = asyncio.Event()
    release = asyncio.Event()

    @listener("job.run")
    async def job(n: int) -> None:
        started.set()
        await release.wait()

    @listener("job.run")
    def sync_job(n: int) -> None:
        pass

    bus = Bus(listeners=[job, sync_job])
    metrics = instrument(bus)
    async with bus:
        began = time.perf_counter()
        bus.emit("job.run", n=1)
        await started.wait()
        samples = _samples(await metrics.scrape())
        assert _value(samples, "tidings_deliveries_in_progress", listener=job.qualname) == 1
        duration = "tidings_delivery_duration_seconds"
        assert _value(samples, f"{duration}_count", listener=job.qualname) == 0
        await asyncio.sleep(0.01)
        release.set()
        await bus.drain()
        took_s = time.perf_counter() - began
        samples = _samples(await metrics.scrape())
    assert _value(samples, "tidings_deliveries_in_progress", listener=job.qualname) == 0
    assert _value(samples, f"{duration}_count", listener=job.qualname) == 1
    assert 0.01 <= _value(samples, f"{duration}_sum", listener=job.qualname) <= took_s
    # Counted once, though the rest of its deliveries were put back when the first one
    # suspended.
    assert _value(samples, "tidings_events_emitted_total", event="job.run") == 1
    # A sync listener runs in a thread, as a task of the backend's: timed from its start.
    assert _value(samples, f"{duration}_count", listener=sync_job.qualname) == 1
    assert _value(samples, f"{duration}_sum", listener=sync_job.qualname) > 0


async def test_a_listener_that_blocks_the_loop_gets_its_deliveries_timed() -> None:
    # A delivery that never suspends is counted under 5 ms unless a run of them took
    # longer: then the next ones are timed one by one, and the slow ones found.
    @listener("busy")
    async def busy(n: int) -> None:
        until = time.perf_counter() + 0.006
        while time.perf_counter() < until:
            pass

    bus = Bus(listeners=[busy])
    metrics = instrument(bus)
    slow = 0.0
    async with bus:
        for n in range(20):  # the first is not timed; the next ones are
            bus.emit("busy", n=n)
            await bus.drain()
            samples = _samples(await metrics.scrape())
            bucket = "tidings_delivery_duration_seconds_bucket"
            slow = 20 - _value(samples, bucket, listener=busy.qualname, le="0.005")
            if slow >= 2:
                break
    assert slow >= 2


async def test_in_process_emits_are_counted_however_they_are_queued() -> None:
    bus = Bus(listeners=[charge, flaky])
    metrics = instrument(bus)
    async with bus:
        bus.emit("order.paid", order_id=1)  # the fast emit
        await bus.publish("order.paid", order_id=2)  # waits for room
        bus.options(delay=0).emit("order.paid", order_id=3)  # delayed
        await asyncio.to_thread(bus.emit, "order.paid", order_id=4)  # from a thread
        bus.emit("order.shipped", order_id=5)  # only flaky's pattern matches
        bus.emit("nobody.listens")
        await bus.drain()
        samples = _samples(await metrics.scrape())
    emitted = {k[1]: v for k, v in samples.items() if k[0] == "tidings_events_emitted_total"}
    # Retries are not emits; an event with no listener never reaches the backend.
    assert emitted == {(("event", "order.paid"),): 4, (("event", "order.*"),): 1}


async def test_detailed_counts_emits_by_pattern_and_times_deliveries() -> None:
    bus = Bus(listeners=[charge, slow])
    metrics = instrument(bus, detailed=True)
    async with bus:
        for n in range(5):
            bus.emit("order.paid", order_id=n)
        bus.emit("order.refunded", order_id=1)  # nobody listens: "other"
        bus.emit("order.refunded", order_id=2)
        await bus.drain()
        samples = _samples(await metrics.scrape())
    assert _value(samples, "tidings_events_emitted_total", event="order.paid") == 5
    assert _value(samples, "tidings_events_emitted_total", event="other") == 2
    assert _value(samples, "tidings_delivery_duration_seconds_count", listener=CHARGE) == 5
    assert _value(samples, "tidings_delivery_duration_seconds_bucket", listener=CHARGE, le="+Inf")
    assert _value(samples, "tidings_deliveries_in_progress", listener=CHARGE) == 0


@pytest.mark.parametrize("detailed", [False, True])
async def test_a_pattern_is_the_label_of_the_names_it_matches(detailed: bool) -> None:
    bus = Bus(listeners=[flaky])
    metrics = instrument(bus, detailed=detailed)
    async with bus:
        for n in range(300):
            bus.emit(f"order.n{n}", order_id=n)
        await bus.drain()
        samples = _samples(await metrics.scrape())
    emitted = {k: v for k, v in samples.items() if k[0] == "tidings_events_emitted_total"}
    assert emitted == {("tidings_events_emitted_total", (("event", "order.*"),)): 300}


async def test_a_durable_store_reports_pending_and_dead_letters(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/events.db?poll_interval=0.01"
    producer = Bus(url, listeners=[charge], consume=False)
    metrics = instrument(producer)
    assert metrics.detailed  # durable: emits and durations are counted by default
    async with producer:
        for n in range(3):
            await producer.publish("order.paid", order_id=n)
        samples = _samples(await metrics.scrape())
        assert _value(samples, "tidings_events_emitted_total", event="order.paid") == 3
        assert _value(samples, "tidings_listener_pending", listener=CHARGE) == 3
        assert _value(samples, "tidings_listener_oldest_age_seconds", listener=CHARGE) >= 0
        assert _value(samples, "tidings_dead_letters", listener=CHARGE) == 0
    consumer = Bus(url, listeners=[charge])
    worker_metrics = instrument(consumer)
    async with consumer:
        await consumer.publish("order.paid", order_id=-1)
        await consumer.drain()
        samples = _samples(await worker_metrics.scrape())
    assert _value(samples, "tidings_deliveries_total", listener=CHARGE, outcome="ok") == 3
    assert _value(samples, "tidings_deliveries_total", listener=CHARGE, outcome="dead") == 1
    assert _value(samples, "tidings_delivery_duration_seconds_count", listener=CHARGE) == 4
    assert _value(samples, "tidings_listener_pending", listener=CHARGE) == 0
    assert _value(samples, "tidings_dead_letters", listener=CHARGE) == 1


async def test_serve_answers_get_metrics_over_http() -> None:
    bus = Bus(listeners=[charge])
    metrics = instrument(bus)
    async with bus:
        bus.emit("order.paid", order_id=1)
        await bus.drain()
        server = await serve(metrics, host="127.0.0.1", port=0)
        port = server.sockets[0].getsockname()[1]
        try:
            status, headers, body = await _get(port, "/metrics")
            assert status == 200
            assert headers["content-type"] == CONTENT_TYPE
            assert _value(_samples(body), "tidings_deliveries_total", listener=CHARGE, outcome="ok")
            status, _, _ = await _get(port, "/nothing")
            assert status == 404
        finally:
            server.close()
            await server.wait_closed()


async def test_the_process_registry_serves_them_from_its_own_thread(tmp_path: Path) -> None:
    # prometheus_client's server scrapes on a thread: the store is read through the loop.
    bus = Bus(f"sqlite:///{tmp_path}/events.db", listeners=[charge], consume=False)
    metrics = instrument(bus, registry=REGISTRY)
    try:
        async with bus:
            await bus.publish("order.paid", order_id=1)
            server, thread = start_http_server(0, addr="127.0.0.1")
            try:
                port = server.server_address[1]
                body = await asyncio.to_thread(_fetch, f"http://127.0.0.1:{port}/metrics")
            finally:
                server.shutdown()
                server.server_close()
                thread.join()
        assert _value(_samples(body), "tidings_listener_pending", listener=CHARGE) == 1
        assert "python_gc_objects_collected_total" in body  # the process's own, beside
    finally:
        REGISTRY.unregister(metrics)


async def test_instrument_refuses_a_started_or_instrumented_bus() -> None:
    bus = Bus(listeners=[charge])
    metrics = instrument(bus)
    assert metrics_of(bus) is metrics
    with pytest.raises(ConfigurationError, match="already instrumented"):
        instrument(bus)
    started = Bus(listeners=[charge])
    async with started:
        with pytest.raises(ConfigurationError, match="before the bus starts"):
            instrument(started)


async def _get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
    return body.decode()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.timeout(60)
async def test_worker_serves_metrics_on_its_port(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/events.db?poll_interval=0.01"
    env = {**os.environ, "TIDINGS_TEST_URL": url, "PYTHONPATH": str(ROOT)}
    from . import cli_app

    async with Bus(url, listeners=[cli_app.charge], consume=False) as bus:
        await bus.publish("order.paid", order_id=-5)
    port = _free_port()
    proc = _start_worker(env, port)
    try:
        assert proc.stderr is not None
        ready = await asyncio.to_thread(_line_with, proc.stderr, b"metrics on")
        assert f":{port}/metrics".encode() in ready
        body = ""
        for _ in range(600):  # the worker runs in its own process: look until it is done
            body = await asyncio.to_thread(_fetch, f"http://127.0.0.1:{port}/metrics")
            samples = _samples(body)
            dead = samples.get(
                ("tidings_dead_letters", (("listener", cli_app.charge.qualname),)), 0
            )
            if dead == 1:
                break
            await asyncio.sleep(0.05)
        samples = _samples(body)
        assert _value(samples, "tidings_dead_letters", listener=cli_app.charge.qualname) == 1
        assert (
            _value(
                samples,
                "tidings_deliveries_total",
                listener=cli_app.charge.qualname,
                outcome="retried",
            )
            == 1
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 30)
        if proc.stderr is not None:
            proc.stderr.close()
    assert proc.returncode == 0


def _line_with(stream: IO[bytes], needle: bytes) -> bytes:
    seen = b""
    for line in iter(stream.readline, b""):
        seen += line
        if needle in line:
            return bytes(line)
    raise AssertionError(f"the worker ended without saying {needle!r}: {seen.decode()}")


def _start_worker(env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tidings.cli",
            "worker",
            "tests.cli_app:make_bus()",
            "--metrics-port",
            str(port),
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
