"""Tracing: producer spans at emit, consumer spans per delivery, context in headers."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tidings import Bus, ConfigurationError, Event, Listener, Retry, listener
from tidings.contrib.otel import instrument


class Tracing:
    """A tracer provider that keeps its finished spans in memory."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("tests")

    def spans(self, kind: SpanKind | None = None) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if kind is None or s.kind == kind]

    def one(self, name: str) -> ReadableSpan:
        (span,) = [s for s in self.exporter.get_finished_spans() if s.name == name]
        return span


def _parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_an_emit_and_its_deliveries_make_one_trace() -> None:
    tracing = Tracing()
    payloads: list[dict[str, object]] = []
    inner: list[int] = []

    @listener("user.created")
    async def welcome(email: str, event: Event) -> None:
        payloads.append(dict(event.kwargs))
        # The delivery's span is current: the listener's own spans nest under it.
        with tracing.tracer.start_as_current_span("send mail") as span:
            inner.append(span.get_span_context().span_id)

    @listener("user.*")
    def audit(event: Event) -> None:  # in a thread
        assert trace.get_current_span().get_span_context().is_valid

    bus = Bus(listeners=[welcome, audit])
    instrument(bus, tracer_provider=tracing.provider)
    async with bus:
        with tracing.tracer.start_as_current_span("POST /users") as request:
            bus.emit("user.created", email="ada@example.com")
        await bus.drain()

    producer = tracing.one("send user.created")
    consumers = tracing.spans(SpanKind.CONSUMER)
    assert producer.kind == SpanKind.PRODUCER
    assert _parent_id(producer) == request.get_span_context().span_id
    assert producer.attributes is not None
    assert producer.attributes["messaging.system"] == "tidings"
    assert producer.attributes["messaging.destination.name"] == "user.created"
    event_id = producer.attributes["messaging.message.id"]

    listeners = sorted(str((s.attributes or {})["tidings.listener"]) for s in consumers)
    assert listeners == sorted([audit.qualname, welcome.qualname])
    for span in consumers:
        attrs = span.attributes or {}
        assert span.name == "process user.created"
        assert _parent_id(span) == producer.context.span_id
        assert span.context.trace_id == producer.context.trace_id
        assert attrs["messaging.message.id"] == event_id
        assert attrs["messaging.operation.type"] == "process"
        assert attrs["tidings.attempt"] == 1
        assert attrs["tidings.outcome"] == "success"
    welcome_span = next(
        s for s in consumers if (s.attributes or {})["tidings.listener"] == welcome.qualname
    )
    assert _parent_id(tracing.one("send mail")) == welcome_span.context.span_id
    # The trace context travels in the headers, never in the payload.
    assert payloads == [{"email": "ada@example.com"}]


async def test_each_attempt_has_its_span_with_its_outcome() -> None:
    tracing = Tracing()
    calls: list[int] = []

    @listener("job", retry=Retry(attempts=2, backoff=0))
    async def flaky(n: int) -> None:
        calls.append(n)
        if len(calls) == 1:
            raise RuntimeError("flake")

    @listener("job", retry=Retry(attempts=1))
    async def broken(n: int) -> None:
        raise ValueError("broken for good")

    bus = Bus(listeners=[flaky, broken])
    instrument(bus, tracer_provider=tracing.provider)
    async with bus:
        bus.emit("job", n=1)
        await bus.drain()

    outcomes = sorted(
        (
            str((s.attributes or {})["tidings.listener"]).rsplit(".", 1)[-1],
            (s.attributes or {})["tidings.attempt"],
            (s.attributes or {})["tidings.outcome"],
            s.status.status_code,
        )
        for s in tracing.spans(SpanKind.CONSUMER)
    )
    assert outcomes == [
        ("broken", 1, "dead", StatusCode.ERROR),
        ("flaky", 1, "retry", StatusCode.ERROR),
        ("flaky", 2, "success", StatusCode.UNSET),
    ]
    dead = next(s for s in tracing.spans(SpanKind.CONSUMER) if s.status.is_ok is False)
    assert dead.events[0].name == "exception"
    producer = tracing.one("send job")
    assert all(_parent_id(s) == producer.context.span_id for s in tracing.spans(SpanKind.CONSUMER))


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no words")


async def test_a_span_ends_for_an_error_whose_str_raises() -> None:
    tracing = Tracing()

    @listener("job")
    async def unprintable(n: int) -> None:
        raise _Unprintable

    bus = Bus(listeners=[unprintable])
    instrument(bus, tracer_provider=tracing.provider)
    async with bus:
        bus.emit("job", n=1)
        await bus.drain()

    [span] = tracing.spans(SpanKind.CONSUMER)
    assert span.status.description == "_Unprintable: <exception str() failed>"


async def test_a_trace_continues_from_a_producer_into_a_worker_through_sqlite(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'events.db'}"
    seen: list[dict[str, str]] = []

    @listener("user.created")
    async def welcome(email: str, event: Event) -> None:
        seen.append(dict(event.kwargs))

    # Two providers, as two processes would have: only the stored headers link them.
    web_tracing, worker_tracing = Tracing(), Tracing()
    web = Bus(url, listeners=[welcome], consume=False)
    instrument(web, tracer_provider=web_tracing.provider)
    async with web:
        with web_tracing.tracer.start_as_current_span("POST /users"):
            web.emit("user.created", email="ada@example.com")
    worker = Bus(url, listeners=[welcome])
    worker.backend.poll_s = 0.01  # type: ignore[attr-defined]
    instrument(worker, tracer_provider=worker_tracing.provider)
    async with worker:
        await worker.drain()

    request = web_tracing.one("POST /users")
    producer = web_tracing.one("send user.created")
    (consumer,) = worker_tracing.spans(SpanKind.CONSUMER)
    assert _parent_id(producer) == request.context.span_id
    assert _parent_id(consumer) == producer.context.span_id
    assert consumer.context.trace_id == request.context.trace_id
    assert consumer.parent is not None
    assert consumer.parent.is_remote
    assert worker_tracing.spans(SpanKind.PRODUCER) == []
    assert seen == [{"email": "ada@example.com"}]


async def test_an_uninstrumented_bus_adds_no_headers_and_no_hooks() -> None:
    headers: list[dict[str, str]] = []

    @listener("x")
    async def on_x(event: Event) -> None:
        headers.append(dict(event.headers))

    async with Bus(listeners=[on_x]) as bus:
        assert bus._hot
        assert bus._runner is not None
        assert "run" not in vars(bus._runner)
        bus.emit("x")
        await bus.drain()
    assert headers == [{}]


async def test_instrument_once_and_before_the_bus_starts() -> None:
    tracing = Tracing()
    bus = Bus()
    instrument(bus, tracer_provider=tracing.provider)
    with pytest.raises(ConfigurationError, match="already instrumented"):
        instrument(bus, tracer_provider=tracing.provider)
    async with Bus() as started:
        with pytest.raises(ConfigurationError, match="before the bus starts"):
            instrument(started)


async def test_traced_deliveries_keep_to_the_concurrency_limit() -> None:
    tracing = Tracing()
    active = 0
    peak = 0
    done: list[int] = []

    def make() -> Listener[..., Any]:
        async def suspends(n: int) -> None:
            nonlocal active, peak
            active += 1
            peak = max(peak, active)
            await asyncio.sleep(0)
            active -= 1
            done.append(n)

        return listener("x")(suspends)

    bus = Bus(listeners=[make() for _ in range(3)], concurrency=2)
    instrument(bus, tracer_provider=tracing.provider)
    async with bus:
        for n in range(5):
            bus.emit("x", n=n)
        await bus.drain()
    assert peak == 2
    assert sorted(done) == sorted(list(range(5)) * 3)
