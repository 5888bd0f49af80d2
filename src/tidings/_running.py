"""A started bus's machinery: the loop and thread it runs on, the threads of its sync
listeners and the runner; made when the bus starts, and stopped in order when it closes
(the report of what was not delivered, then the listeners' own resources)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from tidings.delivery import Runner

if TYPE_CHECKING:
    from tidings.bus import Bus
    from tidings.listeners import Registry

__all__ = ["Running", "close_listeners", "report_undelivered"]

logger = logging.getLogger("tidings.bus")

# An error naming undelivered events names at most this many.
_MAX_IDS_LOGGED = 100


class Running:
    """What a started bus runs on."""

    __slots__ = ("executor", "loop", "runner", "thread")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, executor: ThreadPoolExecutor, runner: Runner
    ) -> None:
        self.loop = loop
        #: The loop's thread.
        self.thread = threading.get_ident()
        #: The threads of the bus's sync listeners.
        self.executor = executor
        self.runner = runner

    @classmethod
    async def start(cls, bus: Bus) -> Running:
        """Start ``bus``'s backend on the running loop, with a runner of its policy.

        Raises:
            What the backend's ``start`` raises.
        """
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(bus.sync_workers, thread_name_prefix="tidings")
        runner = Runner(
            loop=loop,
            backend=bus.backend,
            executor=executor,
            retry=bus.retry,
            timeout=bus.timeout,
            on_error=bus.on_error,
            on_success=bus.on_success,
            on_dead=bus.on_dead,
            registry=bus.registry,
            observers=bus.observers,
            contexts=bus.contexts,
        )
        await bus.backend.start(runner)
        bus.inbox.open(bus.backend, loop)
        return cls(loop, executor, runner)

    async def drain(self, bus: Bus) -> None:
        """Wait until every queued, running and retrying delivery of ``bus`` finished,
        whichever loop awaits it."""
        loop = self.loop
        if asyncio.get_running_loop() is not loop:
            if not loop.is_running():
                raise RuntimeError("the bus's event loop is not running: nothing can drain")
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self.drain(bus), loop))
            return
        while True:
            await bus.inbox.empty()  # what other threads emitted is queued first
            await bus.backend.drain()
            if not self.runner.hooks_running:
                return
            # Async hooks may emit: their events are waited for too.
            await self.runner.drain_hooks()

    async def stop(self, bus: Bus, limit_s: float) -> list[str]:
        """Stop firing schedules, queue what other threads emitted and close the backend,
        within ``limit_s`` seconds in all; the ids of the events not delivered."""
        await bus.scheduler.stop()
        began = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(bus.inbox.empty(), limit_s)
        left = await bus.inbox.close()
        undelivered = await bus.backend.aclose(max(limit_s - (time.monotonic() - began), 0.0))
        undelivered.extend(left)
        return undelivered

    async def finish(self, bus: Bus, limit_s: float, undelivered: list[str]) -> None:
        """Once the bus is closed: report ``undelivered``, wait (``limit_s`` at most) for
        hooks still running, close what listeners hold open, let the threads go."""
        report_undelivered(undelivered, limit_s)
        try:
            await asyncio.wait_for(self.runner.drain_hooks(), limit_s)
        except TimeoutError:
            logger.error("bus closed before its hooks finished")
        await close_listeners(bus.registry)
        self.executor.shutdown(wait=False, cancel_futures=True)


def report_undelivered(ids: list[str], limit_s: float) -> None:
    """Log once, by event id, what a bus closed without delivering (after ``limit_s``
    seconds of draining)."""
    if not ids:
        return
    shown = ", ".join(ids[:_MAX_IDS_LOGGED])
    more = len(ids) - _MAX_IDS_LOGGED
    logger.error(
        "bus closed with %d undelivered event(s) after %.3gs: %s%s",
        len(ids),
        limit_s,
        shown,
        f" and {more} more (all ids at debug level)" if more > 0 else "",
    )
    if more > 0:
        logger.debug("undelivered event ids: %s", ", ".join(ids))


async def close_listeners(registry: Registry) -> None:
    """Close what listeners hold open once their deliveries are over: a listener
    function with an async ``aclose`` (a forwarder's connections) is closed here."""
    for sub in registry.subscriptions():
        close = getattr(sub.listener.fn, "aclose", None)
        if close is None:
            continue
        try:
            await close()
        except Exception:
            logger.exception("closing listener %s raised", sub.listener.qualname)
