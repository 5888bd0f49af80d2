"""Helpers for testing code that emits events.

``capture(bus)`` records what is emitted; the ``tidings_bus`` pytest fixture gives a
started in-process bus that rejects what a durable backend would (this module is also a
pytest plugin, loaded automatically when tidings is installed). ``TIDINGS_DISABLE=1``
in the environment makes every emit a logged no-op.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

from tidings.bus import Bus
from tidings.events import Event

__all__ = ["Captured", "capture", "tidings_bus"]


class Captured:
    """The events emitted on a bus while :func:`capture` was active, in order."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def _record(self, event: Event) -> None:
        self.events.append(event)

    @property
    def names(self) -> list[str]:
        """The emitted names, in order."""
        return [e.name for e in self.events]

    def named(self, name: str) -> list[Event]:
        """The emitted events called ``name``."""
        return [e for e in self.events if e.name == name]

    def assert_emitted(
        self, name: str, *args: Any, times: int | None = None, **kwargs: Any
    ) -> Event:
        """Assert ``name`` was emitted (with these arguments, if given); return the last match.

        For a typed event, the keywords are compared with its fields.

        Raises:
            AssertionError: no such event, or not ``times`` of them.
        """
        found = [
            e
            for e in self.named(name)
            if (not args or e.args == args) and all(_has(e, k, v) for k, v in kwargs.items())
        ]
        wanted = f"{name!r}" + (f" with {args or ''}{kwargs or ''}" if args or kwargs else "")
        if not found:
            raise AssertionError(f"event {wanted} was not emitted; emitted: {self.names}")
        if times is not None and len(found) != times:
            raise AssertionError(f"event {wanted} was emitted {len(found)} times, not {times}")
        return found[-1]

    def assert_not_emitted(self, name: str) -> None:
        """Assert nothing called ``name`` was emitted."""
        if self.named(name):
            raise AssertionError(f"event {name!r} was emitted {len(self.named(name))} times")

    def __len__(self) -> int:
        return len(self.events)


@contextmanager
def capture(bus: Bus) -> Iterator[Captured]:
    """Record every event emitted on ``bus`` inside the ``with`` block.

    Events are recorded at emit, whether or not a listener subscribes to them; they are
    still delivered as usual.
    """
    captured = Captured()
    bus._add_emit_hook(captured._record)
    try:
        yield captured
    finally:
        bus._remove_emit_hook(captured._record)


try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - the fixture needs pytest-asyncio
    pass
else:

    @pytest_asyncio.fixture
    async def tidings_bus() -> AsyncIterator[Bus]:
        """A started in-process bus with ``check_serializable=True``; closed after."""
        async with Bus(check_serializable=True) as bus:
            yield bus


def _has(event: Event, key: str, value: Any) -> bool:
    if event.obj is not None:
        return hasattr(event.obj, key) and getattr(event.obj, key) == value
    return key in event.kwargs and event.kwargs[key] == value
