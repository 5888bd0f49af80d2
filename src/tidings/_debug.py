"""Debug mode: one readable line per emit, per delivery start and end (with how long it
took) and per retry, at DEBUG on the ``tidings.debug`` logger.

``Bus(debug=True)``, or ``TIDINGS_DEBUG=1`` in the environment when the bus is made.
Off, nothing is installed: the bus runs exactly the code it runs without this module.
On, the bus observes each emit and each delivery (as tracing does), which takes it off
its fastest paths.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from contextvars import Context
from typing import TYPE_CHECKING, Any

from tidings.errors import ConfigurationError
from tidings.events import Event

if TYPE_CHECKING:
    from tidings.bus import Bus
    from tidings.listeners import Subscription

__all__ = ["enabled", "install"]

logger = logging.getLogger("tidings.debug")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")
# A payload is shown up to this many characters.
_SHOWN = 200


def enabled(debug: bool | None) -> bool:
    """Whether debug mode is on: ``debug`` if given, else ``TIDINGS_DEBUG``.

    Raises:
        ConfigurationError: ``TIDINGS_DEBUG`` is set to something that is no boolean.
    """
    if debug is not None:
        return debug
    value = os.environ.get("TIDINGS_DEBUG", "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigurationError(
        f"TIDINGS_DEBUG must be a boolean (1, true, yes, on / 0, false, no, off), "
        f"not {os.environ['TIDINGS_DEBUG']!r}"
    )


def install(bus: Bus) -> None:
    """Log ``bus``'s emits and deliveries on ``tidings.debug``, and make sure they show:
    the logger is set to DEBUG unless a level was set on it, and writes to stderr while
    logging is not configured."""
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.DEBUG)
    if not any(isinstance(h, _Fallback) for h in logger.handlers):
        handler = _Fallback()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
        logger.addHandler(handler)
    bus.router.add_emit_hook(_Emits(bus))
    bus.observers.append(_observe)


class _Fallback(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to stderr while logging is not configured, and stays quiet once it is
    (the line then reaches the app's own handlers, and is not shown twice)."""

    def emit(self, record: logging.LogRecord) -> None:
        parent = logger.parent
        while parent is not None:
            if parent.handlers:
                return
            if not parent.propagate:
                break
            parent = parent.parent
        super().emit(record)


class _Emits:
    """Logs each event as the bus accepts it."""

    __slots__ = ("bus",)

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    def __call__(self, event: Event) -> None:
        count = len(self.bus.registry.resolve(event.name))
        logger.debug(
            "emit      %s  id=%s  listeners=%d  payload=%s",
            event.name,
            event.id,
            count,
            _payload(event),
        )


def _observe(
    event: Event, sub: Subscription, ctx: Context
) -> Callable[[str, BaseException | None], None]:
    listener = sub.listener.qualname
    logger.debug(
        "start     %s  id=%s  listener=%s  attempt=%d",
        event.name,
        event.id,
        listener,
        event.attempt,
    )
    began = time.perf_counter()

    def finish(outcome: str, exc: BaseException | None) -> None:
        took = _duration(time.perf_counter() - began)
        if exc is None:
            logger.debug(
                "%-9s %s  id=%s  listener=%s  attempt=%d  took=%s",
                outcome,
                event.name,
                event.id,
                listener,
                event.attempt,
                took,
            )
        else:
            logger.debug(
                "%-9s %s  id=%s  listener=%s  attempt=%d  took=%s  error=%s: %s",
                outcome,
                event.name,
                event.id,
                listener,
                event.attempt,
                took,
                type(exc).__qualname__,
                exc,
            )

    return finish


def _duration(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f}us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f}ms"
    return f"{seconds:.3f}s"


def _payload(event: Event) -> str:
    parts: list[Any] = []
    if event.obj is not None:
        parts.append(repr(event.obj))
    parts.extend(repr(a) for a in event.args)
    parts.extend(f"{k}={v!r}" for k, v in event.kwargs.items())
    text = "(" + ", ".join(parts) + ")"
    return text if len(text) <= _SHOWN else f"{text[: _SHOWN - 4]}...)"
