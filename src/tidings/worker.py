"""Running a durable bus's listeners in a process of their own (``tidings worker``).

SIGTERM or SIGINT stops it gracefully: it claims nothing more, lets running deliveries
finish within the shutdown timeout, and hands the rest back to the store for the next
worker. A sync listener still running in its thread then (Python cannot stop a thread)
keeps its delivery: the worker returns once the thread has, with its outcome written. A
second signal stops waiting and ends the process at once: what still ran is left to the
store, as if the worker had been killed. A worker killed outright loses nothing either:
its leases expire and any other worker reclaims them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from contextvars import Context
from datetime import timedelta
from typing import TYPE_CHECKING

from tidings.backends.durable import DurableBackend
from tidings.bus import Bus
from tidings.errors import ConfigurationError
from tidings.events import Event

if TYPE_CHECKING:
    from tidings.listeners import Subscription

__all__ = ["run_worker"]

logger = logging.getLogger("tidings.worker")


async def run_worker(
    bus: Bus,
    *,
    concurrency: int | None = None,
    listeners: Sequence[str] | None = None,
    shutdown_timeout: float | timedelta | None = None,
    on_ready: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
    log_deliveries: bool = False,
) -> None:
    """Consume ``bus``'s listeners until a signal (or ``stop``) arrives.

    Args:
        concurrency: deliveries of one listener that may run at once.
        listeners: patterns of the listeners' qualified names to run (default all).
        shutdown_timeout: how long running deliveries may take to finish on stop.
        on_ready: called with the number of listeners consumed, once started.
        stop: an event that stops the worker like a signal does.
        log_deliveries: log one line per successful delivery at INFO (failures are
            always logged: a line per failed attempt, the traceback at the dead letter).

    Raises:
        ConfigurationError: the bus's backend is not durable, or no listener matches.
    """
    backend = bus.backend
    if not isinstance(backend, DurableBackend):
        raise ConfigurationError(
            f"a worker needs a durable backend, and this bus uses {bus.url}: "
            "create it with Bus('sqlite:///events.db', ...) or another broker URL"
        )
    backend.consume = True
    backend.drain_on_close = False
    if concurrency is not None:
        backend.concurrency = concurrency
    if listeners:
        backend.listener_patterns = tuple(listeners)
    if log_deliveries:
        bus.observers.append(_log_delivery)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - not the main thread
            pass
    try:
        await bus.start()
        consumed = backend.stats()["consumers"]
        if not consumed:
            await bus.aclose(timeout=0)
            names = [lst.qualname for lst in bus.listeners()]
            raise ConfigurationError(
                "no listener to run"
                + (f": none matches {', '.join(listeners)}" if listeners else "")
                + (f"; the bus's listeners are {', '.join(names)}" if names else "")
            )
        logger.info("worker started: %d listener(s) on %s", consumed, bus.url)
        if on_ready is not None:
            on_ready(consumed)
        await stop.wait()
        logger.info(
            "worker stopping: finishing running deliveries%s",
            "; a second SIGTERM or SIGINT stops waiting" if installed else "",
        )
        for sig in installed:
            loop.add_signal_handler(sig, _exit_at_once, sig)
        backend.stop_claiming()
        await bus.aclose(timeout=shutdown_timeout)
        # Sync listeners' threads that still run keep their deliveries this worker's
        # until they return, so that no other worker runs them beside these threads.
        await backend.wait_closed()
        logger.info("worker stopped")
    finally:
        _restore(loop, installed)


def _exit_at_once(sig: signal.Signals) -> None:
    """End the process on a second signal, without waiting for what still runs.

    Exiting normally would wait anyway: Python joins the threads of sync listeners as
    the interpreter exits, and a thread cannot be stopped. What still ran keeps its
    lease until now; left to expire, another worker runs it again, as after a kill.
    """
    logger.warning(
        "worker stopped at a second %s without waiting: deliveries still running are "
        "left in the store, and run again once their leases expire",
        sig.name,
    )
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # closed, or a broken pipe: nothing more to say
            pass
    os._exit(128 + sig)


def _restore(loop: asyncio.AbstractEventLoop, installed: list[signal.Signals]) -> None:
    """Give the signals handled while the worker ran back their default handling."""
    for sig in installed:
        loop.remove_signal_handler(sig)
    installed.clear()


def _log_delivery(
    event: Event, sub: Subscription, ctx: Context
) -> Callable[[str, BaseException | None], None]:
    """A delivery observer that logs each success with its duration."""
    began = time.perf_counter()

    def finish(outcome: str, error: BaseException | None) -> None:
        if outcome == "success":
            logger.info(
                "delivered event %s (%s) to %s on attempt %d in %.1f ms",
                event.id,
                event.name,
                sub.listener.qualname,
                event.attempt,
                (time.perf_counter() - began) * 1000,
            )

    return finish
