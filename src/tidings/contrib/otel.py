"""OpenTelemetry tracing: a PRODUCER span per emit, a CONSUMER span per delivery.

``instrument(bus)`` before the bus starts. Each emitted event gets a ``send <name>``
span, a child of whatever span is current where ``emit`` was called, and that span's
trace context is written into the event's headers (W3C ``traceparent`` with the global
propagator), never into its payload. Each delivery, in this process or in a worker
reading a durable store, gets a ``process <name>`` span whose parent is taken from
those headers, so a trace continues from the web process into the worker. The span is
current while the listener runs, so its own spans nest under it.

Attributes follow OpenTelemetry's messaging conventions where they fit
(``messaging.system`` = ``tidings``, ``messaging.destination.name`` = the event name,
``messaging.message.id``, ``messaging.operation.type``, ``messaging.consumer.group.name``
= the listener), plus ``tidings.listener``, ``tidings.attempt`` and ``tidings.outcome``
(``success``, ``retry``, ``dead`` or ``cancelled``). A failed attempt records its
exception and an error status.

A bus that is not instrumented runs no tracing code at all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextvars import Context
from typing import TYPE_CHECKING

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer, TracerProvider
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "tidings.contrib.otel needs opentelemetry-api: pip install 'tidings[otel]'"
    ) from exc

from tidings.delivery import error_text
from tidings.errors import ConfigurationError
from tidings.events import Event

if TYPE_CHECKING:
    from tidings.bus import Bus
    from tidings.listeners import Subscription

__all__ = ["instrument"]

_SYSTEM = "tidings"


def instrument(bus: Bus, *, tracer_provider: TracerProvider | None = None) -> None:
    """Trace every emit and every delivery of ``bus``.

    Args:
        bus: a bus that has not started yet.
        tracer_provider: where spans go (default: the global provider).

    Raises:
        ConfigurationError: the bus already started, or is already instrumented.
    """
    if bus.started:
        raise ConfigurationError("instrument(bus) before the bus starts")
    if any(isinstance(o, _Observer) for o in bus.observers):
        raise ConfigurationError("this bus is already instrumented")
    tracer = trace.get_tracer("tidings", tracer_provider=tracer_provider)
    bus.router.add_emit_hook(_Producer(tracer))
    bus.observers.append(_Observer(tracer))


class _Producer:
    """Opens and closes the PRODUCER span of an emit, and puts its context in headers."""

    __slots__ = ("tracer",)

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer

    def __call__(self, event: Event) -> None:
        span = self.tracer.start_span(
            f"send {event.name}",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": _SYSTEM,
                "messaging.operation.type": "send",
                "messaging.operation.name": "send",
                "messaging.destination.name": event.name,
                "messaging.message.id": event.id,
            },
        )
        try:
            headers = dict(event.headers)
            propagate.inject(headers, context=trace.set_span_in_context(span))
            event.headers = headers
        finally:
            span.end()


class _Observer:
    """Opens the CONSUMER span of a delivery, current in the delivery's context."""

    __slots__ = ("tracer",)

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer

    def __call__(
        self, event: Event, sub: Subscription, ctx: Context
    ) -> Callable[[str, BaseException | None], None]:
        parent = propagate.extract(event.headers)
        listener = sub.listener.qualname
        span = self.tracer.start_span(
            f"process {event.name}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": _SYSTEM,
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": event.name,
                "messaging.message.id": event.id,
                "messaging.consumer.group.name": listener,
                "tidings.listener": listener,
                "tidings.attempt": event.attempt,
            },
        )
        # The context is this delivery's own copy: what is attached here is seen by the
        # listener only, and needs no detaching.
        ctx.run(otel_context.attach, trace.set_span_in_context(span, parent))

        def finish(outcome: str, exc: BaseException | None) -> None:
            span.set_attribute("tidings.outcome", outcome)
            if exc is not None:
                with contextlib.suppress(Exception):  # an error whose str() raises
                    span.record_exception(exc)
                span.set_attribute("error.type", type(exc).__qualname__)
                span.set_status(Status(StatusCode.ERROR, error_text(exc)))
            span.end()

        return finish
