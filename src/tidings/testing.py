"""Helpers for testing code that emits events.

``capture(bus)`` records what is emitted; the ``tidings_bus`` pytest fixture gives a
started in-process bus that rejects what a durable backend would (this module is also a
pytest plugin, loaded automatically when tidings is installed). ``TIDINGS_DISABLE=1``
(or ``true``, ``yes``, ``on``) in the environment makes every emit a logged no-op; it is
read when a bus is made and each time it starts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

from tidings.bus import Bus
from tidings.events import Event

__all__ = ["Captured", "capture", "tidings_bus"]


class Captured:
    """The events emitted on a bus while :func:`capture` was active, in order.

    ``events`` leaves out what the ASGI middleware dropped (emitted by a request that
    failed, so never delivered); those are in ``dropped``.
    """

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.dropped: list[Event] = []

    def _record(self, event: Event) -> None:
        self.events.append(event)

    def _drop(self, event: Event) -> None:
        for i, recorded in enumerate(self.events):
            if recorded is event:
                del self.events[i]
                self.dropped.append(event)
                return

    @property
    def names(self) -> list[str]:
        """The emitted names, in order."""
        return [e.name for e in self.events]

    def named(self, name: str, /) -> list[Event]:
        """The emitted events called ``name``."""
        return [e for e in self.events if e.name == name]

    def assert_emitted(
        self, name: str, /, *args: Any, times: int | None = None, **kwargs: Any
    ) -> Event:
        """Assert ``name`` was emitted (with these arguments, if given); return the last match.

        Every keyword but ``times`` is payload (``name=`` included). For a typed event,
        the keywords are compared with its fields.

        Raises:
            AssertionError: no such event, or not ``times`` of them; the message lists
                what was emitted, with its arguments.
        """
        found = [
            e
            for e in self.named(name)
            if (not args or e.args == args) and all(_has(e, k, v) for k, v in kwargs.items())
        ]
        wanted = f"{name!r}" + (f" with {args or ''}{kwargs or ''}" if args or kwargs else "")
        if not found:
            raise AssertionError(f"event {wanted} was not emitted; emitted: {self._listing()}")
        if times is not None and len(found) != times:
            raise AssertionError(
                f"event {wanted} was emitted {len(found)} times, not {times}; "
                f"emitted: {self._listing()}"
            )
        return found[-1]

    def assert_not_emitted(self, name: str, /) -> None:
        """Assert nothing called ``name`` was emitted."""
        if self.named(name):
            raise AssertionError(
                f"event {name!r} was emitted {len(self.named(name))} times; "
                f"emitted: {self._listing()}"
            )

    def _listing(self) -> str:
        shown = [_describe(e) for e in self.events[:_SHOWN]]
        if len(self.events) > _SHOWN:
            shown.append(f"and {len(self.events) - _SHOWN} more")
        listing = "[" + ", ".join(shown) + "]"
        if self.dropped:
            listing += f" (and {len(self.dropped)} dropped with a failed request)"
        return listing

    def __len__(self) -> int:
        return len(self.events)


@contextmanager
def capture(bus: Bus) -> Iterator[Captured]:
    """Record every event emitted on ``bus`` inside the ``with`` block.

    Events are recorded at emit, whether or not a listener subscribes to them; they are
    still delivered as usual. Events a request emitted and the ASGI middleware then
    dropped (the request failed) move from ``events`` to ``dropped``.
    """
    captured = Captured()
    bus.router.add_emit_hook(captured._record)
    bus.router.drop_hooks.append(captured._drop)
    try:
        yield captured
    finally:
        bus.router.remove_emit_hook(captured._record)
        bus.router.drop_hooks.remove(captured._drop)


try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - the fixture needs pytest-asyncio
    pass
else:

    @pytest_asyncio.fixture
    async def tidings_bus() -> AsyncIterator[Bus]:
        """A started in-process bus with ``check_serializable=True`` (it refuses at emit
        what a durable backend could not store or deliver); closed after."""
        async with Bus(check_serializable=True) as bus:
            yield bus


# How many events a failed assertion lists.
_SHOWN = 20


def _describe(event: Event) -> str:
    if event.obj is not None:
        return f"{event.name}({event.obj!r})"
    parts = [repr(a) for a in event.args] + [f"{k}={v!r}" for k, v in event.kwargs.items()]
    return f"{event.name}({', '.join(parts)})"


def _has(event: Event, key: str, value: Any) -> bool:
    if event.obj is not None:
        return hasattr(event.obj, key) and getattr(event.obj, key) == value
    return key in event.kwargs and event.kwargs[key] == value
