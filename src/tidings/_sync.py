"""Running a bus from sync code: scripts, WSGI apps, Django and Flask views.

``with Bus(...) as bus:`` starts the bus on an event loop of its own, run by a
background thread; ``emit`` is thread-safe already, so it works from the calling thread
and from any other. Leaving the block drains the bus (bounded by its
``shutdown_timeout``) and stops the thread. Awaitables of the bus (``publish``,
``drain``...) are run on that loop by :meth:`SyncFront.run_sync`, which waits for
their result.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Awaitable, Coroutine
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

from tidings.errors import ConfigurationError, NotStartedError

if TYPE_CHECKING:
    from tidings._inbox import Inbox

__all__ = ["LoopThread", "SyncFront"]

# The background thread running each bus's loop while in ``with bus:``.
_threads: weakref.WeakKeyDictionary[SyncFront, LoopThread] = weakref.WeakKeyDictionary()

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


class SyncFront:
    """The ways into a bus from sync code (:class:`~tidings.Bus` inherits them):
    ``with bus:``, :meth:`publish_sync` and :meth:`run_sync`."""

    # What the bus holds, set by its __init__.
    inbox: Inbox

    if TYPE_CHECKING:  # the bus's own methods these call, declared for the type checker

        @property
        def started(self) -> bool: ...
        @property
        def loop(self) -> asyncio.AbstractEventLoop | None: ...
        async def start(self) -> None: ...
        async def aclose(self) -> None: ...
        async def publish(self, name_or_event: str | Any, /, *args: Any, **kwargs: Any) -> None: ...

    def __enter__(self) -> Self:
        """Start the bus on an event loop of its own, in a background thread, for
        scripts and sync frameworks: ``emit`` then works from any thread, and
        :meth:`publish_sync` / :meth:`run_sync` wait on the bus from sync code.

        Raises:
            ConfigurationError: the bus is started already.
            What :meth:`start` raises (a store that cannot be opened, say).
        """
        if self.started or self in _threads:
            raise ConfigurationError(
                "this bus is started already: 'with bus:' starts it on an event loop of its "
                "own, in a background thread, and cannot share the one it runs on"
            )
        thread = LoopThread("tidings-bus")
        thread.start()
        try:
            thread.run(self.start())
        except BaseException:
            thread.stop()
            raise
        _threads[self] = thread
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Drain (for at most ``shutdown_timeout`` seconds), close, stop the thread."""
        thread = _threads.pop(self, None)
        if thread is None:
            return
        try:
            thread.run(self.aclose())
        finally:
            thread.stop()

    def publish_sync(self, name_or_event: str | Any, /, *args: Any, **kwargs: Any) -> None:
        """Like :meth:`publish`, from sync code: return once the backend accepted the
        event (stored, on a durable backend). Not on the bus's own loop's thread.

        Raises:
            NotStartedError: the bus is not started, or closed.
            ConfigurationError: called on the bus's own event loop's thread.
            What :meth:`publish` raises.
        """
        self.run_sync(self.publish(name_or_event, *args, **kwargs))

    def run_sync(self, awaitable: Awaitable[T], /) -> T:
        """Run an awaitable of this bus (``bus.drain()``, ``bus.list_dead_letters()``...)
        on its event loop from sync code, in a copy of the caller's context, and return
        its result. The bus runs in another thread (``with bus:``, or an app's loop).

        Raises:
            NotStartedError: the bus is not started, or closed.
            ConfigurationError: called on the bus's own event loop's thread.
        """
        loop = self.loop
        try:
            if loop is None or not self.started:
                state = "is closed" if self.loop is not None else "is not started"
                raise NotStartedError(
                    f"the bus {state}: start it with 'with bus:' (or 'async with bus:' on a "
                    "running event loop) before waiting on it from sync code"
                )
            if not loop.is_running():
                raise NotStartedError(
                    "the bus's event loop is not running (was it stopped without closing "
                    "the bus?): nothing would ever run what is waited for"
                )
            if threading.get_ident() == self.inbox.thread:
                raise ConfigurationError(
                    "a sync wait on the bus was called on the bus's own event loop, where "
                    "it would wait forever: await it there (await bus.publish(...))"
                )
        except BaseException:
            if isinstance(awaitable, Coroutine):
                awaitable.close()  # never run: no 'never awaited' warning for the caller's
            raise
        future: Any = asyncio.run_coroutine_threadsafe(_wrap(awaitable), loop)
        result: T = future.result()
        return result
