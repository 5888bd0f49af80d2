"""Running a bus from sync code: scripts, WSGI apps, Django and Flask views.

``with Bus(...) as bus:`` starts the bus on an event loop of its own, run by a
background thread; ``emit`` is thread-safe already, so it works from the calling thread
and from any other. Leaving the block drains the bus (bounded by its
``shutdown_timeout``) and stops the thread. Awaitables of the bus (``publish``,
``drain``...) are run on that loop by :func:`run`, which waits for their result.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Awaitable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from tidings.errors import ConfigurationError, NotStartedError

if TYPE_CHECKING:
    from tidings.bus import Bus

__all__ = ["LoopThread", "enter", "leave", "run"]

# The background thread running each bus's loop while in ``with bus:``.
_threads: weakref.WeakKeyDictionary[Bus, LoopThread] = weakref.WeakKeyDictionary()

T = TypeVar("T")


class LoopThread:
    """An event loop running in a daemon thread of its own until :meth:`stop`.

    Daemon, so a script that never leaves its ``with`` block (it was killed, or it
    called ``sys.exit`` in a thread) is not kept alive by the loop.
    """

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """Start the thread and its loop."""
        self._thread.start()

    def _run(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            # What asyncio.run does on its way out: nothing is left pending on a
            # closed loop.
            try:
                tasks = asyncio.all_tasks(loop)
                for task in tasks:
                    task.cancel()
                if tasks:
                    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                asyncio.set_event_loop(None)
                loop.close()

    def run(self, awaitable: Awaitable[T]) -> T:
        """Run ``awaitable`` on the loop, in a copy of the caller's context; its result.

        Raises:
            What the awaitable raises.
        """
        return asyncio.run_coroutine_threadsafe(_wrap(awaitable), self.loop).result()

    def stop(self) -> None:
        """Stop the loop (cancelling what still runs on it) and wait for the thread."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
        elif not self.loop.is_closed():
            self.loop.close()


async def _wrap(awaitable: Awaitable[T]) -> T:
    return await awaitable


def enter(bus: Bus) -> Bus:
    """Start ``bus`` on a loop in a background thread; errors at start raise here.

    Raises:
        ConfigurationError: the bus is started already.
        What :meth:`Bus.start` raises (the thread is stopped first).
    """
    if bus.started or bus in _threads:
        raise ConfigurationError(
            "this bus is started already: 'with bus:' starts it on an event loop of its "
            "own, in a background thread, and cannot share the one it runs on"
        )
    thread = LoopThread("tidings-bus")
    thread.start()
    try:
        thread.run(bus.start())
    except BaseException:
        thread.stop()
        raise
    _threads[bus] = thread
    return bus


def leave(bus: Bus) -> None:
    """Drain ``bus`` (bounded by its ``shutdown_timeout``), close it and stop its thread."""
    thread = _threads.pop(bus, None)
    if thread is None:
        return
    try:
        thread.run(bus.aclose())
    finally:
        thread.stop()


def run(bus: Bus, awaitable: Awaitable[T]) -> T:
    """Run ``awaitable`` on the loop of the started ``bus`` and wait for its result.

    Raises:
        NotStartedError: the bus is not started, or closed.
        ConfigurationError: called on the bus's own loop, where it would wait forever.
    """
    loop = bus.loop
    try:
        if loop is None or not bus.started:
            state = "is closed" if bus.loop is not None else "is not started"
            raise NotStartedError(
                f"the bus {state}: start it with 'with bus:' (or 'async with bus:' on a "
                "running event loop) before waiting on it from sync code"
            )
        if not loop.is_running():
            raise NotStartedError(
                "the bus's event loop is not running (was it stopped without closing the "
                "bus?): nothing would ever run what is waited for"
            )
        if threading.get_ident() == bus.inbox.thread:
            raise ConfigurationError(
                "a sync wait on the bus was called on the bus's own event loop, where it "
                "would wait forever: await it there (await bus.publish(...))"
            )
    except BaseException:
        if isinstance(awaitable, Coroutine):
            awaitable.close()  # never run: no 'never awaited' warning for the caller's
        raise
    future: Any = asyncio.run_coroutine_threadsafe(_wrap(awaitable), loop)
    result: T = future.result()
    return result
