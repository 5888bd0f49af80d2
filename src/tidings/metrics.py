"""Prometheus metrics of a bus: what it emits, how its deliveries end, and what waits in
its store.

``metrics = instrument(bus)`` before the bus starts; ``metrics.render()`` (or
``await metrics.scrape()``, which reads the store first) gives the text exposition, and
``serve(metrics, port=9191)`` answers ``GET /metrics`` (``tidings worker
--metrics-port 9191`` does this). The names follow the conventions of FastStream and
Dramatiq, in base units:

- ``tidings_events_emitted_total{event}``: events emitted by this process;
- ``tidings_deliveries_total{listener,outcome}``: finished attempts, ``outcome`` one of
  ``ok`` (returned), ``retried`` (raised, tried again later), ``dead`` (raised on its
  last attempt: a dead letter), ``timeout`` (ran past its timeout, retried or not);
- ``tidings_delivery_duration_seconds{listener}``: a histogram of attempts' durations;
- ``tidings_deliveries_in_progress{listener}``: attempts running in this process;
- ``tidings_listener_pending{listener}``, ``tidings_listener_oldest_age_seconds{listener}``
  and ``tidings_dead_letters{listener}``: read from the store, the same for every worker;
- ``tidings_listener_delivered_total{listener}`` and ``tidings_listener_failed_total
  {listener}``: attempts that returned and that failed, as the store counts them for
  every worker together (in process: the bus's own); the same for every worker, so
  take the ``max``, not the ``sum``, across them.

Cost: the ``ok`` count is the bus's own counter, read when scraped, and failures are
counted by error hooks, which run only when a delivery fails. In process, the backend
counts emits and times deliveries itself, in plain numbers read when scraped (a
:class:`tidings.delivery.Tally`), so the bus keeps its fast path: a delivery that
finishes without suspending is not timed on its own but counted under the first
bucket's bound (5 ms), which the backend checks per run of such deliveries (a run that
took longer has the next deliveries timed one by one); their time is not in the
histogram's sum. A delivery that suspends is timed from when it suspends. An event is
counted when the backend takes it to deliver; events with no listener are not counted
in process. On a durable backend, and with
``instrument(bus, detailed=True)``, emit hooks and delivery observers count every emit
and time every delivery from its start; in process that takes the bus off its fast
path (several times fewer deliveries/s).

Cardinality: the ``event`` label is the name or pattern a listener subscribes with that
matches the event (``user.*``), or ``other``; listeners are as many as the code has.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import Context
from typing import TYPE_CHECKING, Any

try:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.registry import Collector
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
    if exc.name != "prometheus_client":
        raise
    raise ImportError(
        "tidings.metrics needs prometheus_client: pip install 'tidings[prometheus]'"
    ) from exc

from tidings._patterns import matches
from tidings.backends.base import ListenerStats
from tidings.errors import ConfigurationError
from tidings.events import Event

if TYPE_CHECKING:
    from tidings.bus import Bus
    from tidings.listeners import Listener, Subscription

__all__ = ["BUCKETS_S", "CONTENT_TYPE", "Metrics", "instrument", "metrics_of", "serve"]

#: The content type of the text exposition.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: The upper bounds of the duration histogram's buckets, in seconds (Prometheus' defaults).
BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
OUTCOMES = ("ok", "retried", "dead", "timeout")
# Event names remembered with their label, at most (past it each is matched again).
_LABELS_CACHED = 10_000
# How long a scrape from another thread waits for the store's figures.
_STORE_WAIT_S = 5.0


class _Durations:
    """One listener's histogram, kept as plain counts (no lock: written on the loop)."""

    __slots__ = ("buckets", "count", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * (len(BUCKETS_S) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect.bisect_left(BUCKETS_S, seconds)] += 1
        self.count += 1
        self.sum += seconds


class _Tally:
    """What the in-process backend counts for these metrics as it goes (a
    :class:`tidings.delivery.Tally`): read when scraped, never a call per delivery."""

    __slots__ = ("durations", "emitted", "exact_below_s", "metrics", "seconds")

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.durations = metrics._durations
        self.emitted: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        # An untimed delivery is known to be shorter than the first bucket's bound.
        self.exact_below_s = BUCKETS_S[0]

    def first_emit(self, name: str) -> None:
        emitted = self.emitted
        if len(emitted) >= _LABELS_CACHED:
            # Endless distinct names: what was counted by name is kept by label.
            self.metrics._fold(emitted)
            emitted.clear()
        emitted[name] = 1

    def slow(self, listener: str, seconds: float) -> None:
        hist = self.durations.get(listener)
        if hist is None:
            hist = self.durations[listener] = _Durations()
        hist.observe(seconds)


class Metrics(Collector):
    """The metrics of one bus, as a Prometheus collector.

    Args:
        bus: the bus to measure (not started yet).
        registry: where to register (default: a registry of its own, so several buses
            in one process never clash; pass ``prometheus_client.REGISTRY`` to serve
            them with the rest of the process's metrics).
        detailed: count emits and time each delivery through the bus's emit hooks and
            delivery observers (default: only on a durable backend; in process the
            backend counts and times them itself, and this takes it off its fast path).

    Raises:
        ConfigurationError: the bus already started, or is already instrumented.
    """

    def __init__(
        self,
        bus: Bus,
        *,
        registry: CollectorRegistry | None = None,
        detailed: bool | None = None,
    ) -> None:
        if bus.started:
            raise ConfigurationError("instrument(bus) before the bus starts")
        if getattr(bus, "_metrics", None) is not None:
            raise ConfigurationError("this bus is already instrumented")
        self.bus = bus
        self.detailed = bus.backend.durable if detailed is None else detailed
        self.registry = CollectorRegistry(auto_describe=True) if registry is None else registry
        # Failed attempts that were not timeouts, and those of them that were the last.
        self._failed: dict[str, int] = {}
        self._dead: dict[str, int] = {}
        self._timeouts: dict[str, int] = {}
        self._emitted: dict[str, int] = {}
        self._labels: dict[str, str] = {}
        self._durations: dict[str, _Durations] = {}
        self._running: dict[str, int] = {}
        # Set when the backend counts and times for these metrics itself.
        self._tally: _Tally | None = None
        # The store's figures as of the last read: listener -> its stats.
        self._store: dict[str, ListenerStats] = {}
        self._read_at = 0.0
        bus.on_error = (*bus.on_error, self._on_error)
        bus.on_dead = (*bus.on_dead, self._on_dead)
        count_into = getattr(bus.backend, "count_into", None)
        if self.detailed:
            bus.router.add_emit_hook(self._on_emit)
            bus.observers.append(self._observe)
        elif count_into is not None:
            self._tally = _Tally(self)
            count_into(self._tally)
        bus._metrics = self  # type: ignore[attr-defined]
        self.registry.register(self)

    # -- what the bus tells -----------------------------------------------------------

    def _on_error(self, event: Event, listener: Listener[..., Any], exc: BaseException) -> None:
        name = listener.qualname
        if isinstance(exc, TimeoutError):
            self._timeouts[name] = self._timeouts.get(name, 0) + 1
        else:
            self._failed[name] = self._failed.get(name, 0) + 1

    def _on_dead(self, event: Event, listener: Listener[..., Any], exc: BaseException) -> None:
        if not isinstance(exc, TimeoutError):
            name = listener.qualname
            self._dead[name] = self._dead.get(name, 0) + 1

    def _on_emit(self, event: Event) -> None:
        label = self._labels.get(event.name)
        if label is None:
            label = self._label(event.name)
        self._emitted[label] = self._emitted.get(label, 0) + 1

    def _fold(self, by_name: dict[str, int]) -> None:
        """Add emits counted by event name to the counts by label."""
        for name, count in list(by_name.items()):
            label = self._labels.get(name)
            if label is None:
                label = self._label(name)
            self._emitted[label] = self._emitted.get(label, 0) + count

    def _label(self, name: str) -> str:
        """The first subscribed name or pattern that matches ``name``, else ``other``."""
        label = "other"
        for sub in self.bus.registry.subscriptions():
            found = next((p for p in sub.listener.names if matches(p, name)), None)
            if found is not None:
                label = found
                break
        if len(self._labels) < _LABELS_CACHED:
            self._labels[name] = label
        return label

    def _observe(
        self, event: Event, sub: Subscription, ctx: Context
    ) -> Callable[[str, BaseException | None], None]:
        name = sub.listener.qualname
        running = self._running
        running[name] = running.get(name, 0) + 1
        started = time.perf_counter()

        def finish(outcome: str, exc: BaseException | None) -> None:
            running[name] -= 1
            durations = self._durations.get(name)
            if durations is None:
                durations = self._durations[name] = _Durations()
            durations.observe(time.perf_counter() - started)

        return finish

    # -- the store ----------------------------------------------------------------------

    async def read_store(self) -> None:
        """Read pending deliveries, oldest ages and dead letters from the store (on the
        bus's loop, whichever loop awaits this)."""
        bus = self.bus
        loop = bus.loop
        if loop is None or not bus.started:
            return
        if asyncio.get_running_loop() is loop:
            figures = await bus.listener_stats()
        else:
            future = asyncio.run_coroutine_threadsafe(bus.listener_stats(), loop)
            figures = await asyncio.wrap_future(future)
        self._store = dict(figures)
        self._read_at = time.monotonic()

    async def scrape(self) -> bytes:
        """Read the store, then render every metric in the text exposition format."""
        await self.read_store()
        return self.render()

    def render(self) -> bytes:
        """Every metric of this collector's registry in the text exposition format (the
        store's figures as last read)."""
        return generate_latest(self.registry)

    def _read_from_thread(self) -> None:
        # A scrape served by a thread of its own (prometheus_client's server) reads the
        # store through the bus's loop; one on the loop uses the last figures read.
        loop = self.bus.loop
        if loop is None or not loop.is_running() or threading.get_ident() == self.bus._thread:
            return
        future = asyncio.run_coroutine_threadsafe(self.read_store(), loop)
        with contextlib.suppress(Exception):
            future.result(_STORE_WAIT_S)

    # -- the collector ------------------------------------------------------------------

    def describe(self) -> list[Metric]:
        """Nothing up front: the metrics are listed when collected."""
        return []

    def collect(self) -> Iterator[Metric]:
        """The metrics as of now."""
        self._read_from_thread()
        listeners = self._listener_names()

        emitted = CounterMetricFamily(
            "tidings_events_emitted", "Events emitted by this process.", labels=["event"]
        )
        for label, count in sorted(self._emitted_counts().items()):
            emitted.add_metric([label], count)
        yield emitted

        deliveries = CounterMetricFamily(
            "tidings_deliveries",
            "Finished delivery attempts, by how they ended.",
            labels=["listener", "outcome"],
        )
        ok, failed = self._attempts()
        for name in listeners:
            dead = self._dead.get(name, 0)
            counts = (
                ok.get(name, 0),
                self._failed.get(name, 0) - dead,
                dead,
                self._timeouts.get(name, 0),
            )
            for outcome, count in zip(OUTCOMES, counts, strict=True):
                deliveries.add_metric([name, outcome], count)
        yield deliveries

        durations = HistogramMetricFamily(
            "tidings_delivery_duration_seconds",
            "How long delivery attempts ran.",
            labels=["listener"],
        )
        for name, hist in sorted(self._histograms(ok, failed).items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*BUCKETS_S, float("inf")), hist.buckets, strict=True):
                cumulative += count
                buckets.append((_bound(bound), cumulative))
            durations.add_metric([name], buckets, hist.sum)
        yield durations

        in_progress = GaugeMetricFamily(
            "tidings_deliveries_in_progress",
            "Delivery attempts running in this process.",
            labels=["listener"],
        )
        running = self._in_progress()
        for name in listeners:
            in_progress.add_metric([name], running.get(name, 0))
        yield in_progress

        pending = GaugeMetricFamily(
            "tidings_listener_pending",
            "Deliveries due and waiting in the store for a worker.",
            labels=["listener"],
        )
        oldest = GaugeMetricFamily(
            "tidings_listener_oldest_age_seconds",
            "Age of the oldest delivery due and waiting in the store, since it came due.",
            labels=["listener"],
        )
        dead_letters = GaugeMetricFamily(
            "tidings_dead_letters", "Dead letters kept in the store.", labels=["listener"]
        )
        delivered = CounterMetricFamily(
            "tidings_listener_delivered",
            "Attempts that returned, as the store counts them for every worker.",
            labels=["listener"],
        )
        failed_total = CounterMetricFamily(
            "tidings_listener_failed",
            "Attempts that raised or timed out, as the store counts them for every worker.",
            labels=["listener"],
        )
        for name, s in sorted(self._store.items()):
            pending.add_metric([name], s.pending)
            oldest.add_metric([name], s.oldest_age_s or 0.0)
            dead_letters.add_metric([name], s.dead)
            if s.delivered is not None and s.failed is not None:
                delivered.add_metric([name], s.delivered)
                failed_total.add_metric([name], s.failed)
        yield pending
        yield oldest
        yield dead_letters
        yield delivered
        yield failed_total

    def _listener_names(self) -> list[str]:
        names = {sub.listener.qualname for sub in self.bus.registry.subscriptions()}
        names.update(self._store)
        return sorted(names)

    def _attempts(self) -> tuple[dict[str, int], dict[str, int]]:
        # The bus's own counters: ``delivered`` counts attempts that returned, ``failed``
        # those that raised or timed out.
        ok: dict[str, int] = {}
        failed: dict[str, int] = {}
        for sub in self.bus.registry.subscriptions():
            name = sub.listener.qualname
            ok[name] = ok.get(name, 0) + sub.delivered
            failed[name] = failed.get(name, 0) + sub.failed
        return ok, failed

    def _emitted_counts(self) -> dict[str, int]:
        """Emits by label: those counted by label, and those the backend counted by name."""
        counts = dict(self._emitted)
        if self._tally is not None:
            for name, count in list(self._tally.emitted.items()):
                label = self._labels.get(name)
                if label is None:
                    label = self._label(name)
                counts[label] = counts.get(label, 0) + count
        return counts

    def _histograms(self, ok: dict[str, int], failed: dict[str, int]) -> dict[str, _Durations]:
        """The duration histograms; with the backend's tally, the attempts it did not
        time one by one are in the first bucket (it times every one that might not
        be)."""
        if self._tally is None:
            return self._durations
        out: dict[str, _Durations] = {}
        for name in ok.keys() | self._durations.keys():
            timed = self._durations.get(name)
            hist = _Durations()
            if timed is not None:
                hist.buckets = list(timed.buckets)
                hist.count = timed.count
                hist.sum = timed.sum
            # The rest were shorter than the first bucket's bound (see _Tally).
            short = ok.get(name, 0) + failed.get(name, 0) - hist.count
            if short > 0:
                hist.buckets[0] += short
                hist.count += short
            hist.sum += self._tally.seconds.get(name, 0.0)
            out[name] = hist
        return out

    def _in_progress(self) -> dict[str, int]:
        if self._tally is None:
            return self._running
        counts: dict[str, int] = {}
        for sub in self.bus.backend.in_progress():  # type: ignore[attr-defined]
            name = sub.listener.qualname
            counts[name] = counts.get(name, 0) + 1
        return counts


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


def instrument(
    bus: Bus, *, registry: CollectorRegistry | None = None, detailed: bool | None = None
) -> Metrics:
    """Export ``bus``'s metrics to Prometheus (see :class:`Metrics` for the arguments).

    Raises:
        ConfigurationError: the bus already started, or is already instrumented.
    """
    return Metrics(bus, registry=registry, detailed=detailed)


def metrics_of(bus: Bus) -> Metrics | None:
    """The metrics ``instrument`` attached to ``bus``, if any."""
    return getattr(bus, "_metrics", None)


async def serve(metrics: Metrics, *, host: str = "0.0.0.0", port: int = 9191) -> asyncio.Server:
    """Answer ``GET /metrics`` over HTTP on the running loop (``aclose`` the server, or
    ``server.close()``, to stop).

    Raises:
        OSError: the port cannot be bound.
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.readline()
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass  # the headers: nothing in them matters here
            parts = request.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
            if parts[:1] != ["GET"] or path not in ("/metrics", "/"):
                _respond(writer, b"404 Not Found", b"text/plain", b"not found: GET /metrics\n")
            else:
                body = await metrics.scrape()
                _respond(writer, b"200 OK", CONTENT_TYPE.encode(), body)
            await writer.drain()
        except (ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    return await asyncio.start_server(handle, host, port)


def _respond(writer: asyncio.StreamWriter, status: bytes, content_type: bytes, body: bytes) -> None:
    writer.write(
        b"HTTP/1.1 "
        + status
        + b"\r\ncontent-type: "
        + content_type
        + b"\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\nconnection: close\r\n\r\n"
        + body
    )
