"""Shared test helpers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator

import pytest


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    # Commands set the library's log level, as a program does; tests share a process.
    logger = logging.getLogger("tidings")
    level = logger.level
    yield
    logger.setLevel(level)


class Counter:
    """Counts calls and wakes waiters when a count is reached."""

    def __init__(self) -> None:
        self.calls: list[object] = []
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def add(self, item: object = None) -> None:
        self.calls.append(item)
        for n, fut in self._waiters:
            if len(self.calls) >= n and not fut.done():
                fut.get_loop().call_soon_threadsafe(_set, fut)

    async def wait_for(self, n: int) -> None:
        if len(self.calls) >= n:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((n, fut))
        if len(self.calls) >= n:
            return
        await fut


def _set(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def noop(*args: object, **kwargs: object) -> None:
    """A listener body that does nothing."""


Factory = Callable[[], Counter]
