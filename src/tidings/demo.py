"""The scenario ``tidings demo`` runs: a burst of sign-ups and the listeners a real app
would hang on them, one of them flaky and one failing for good.

It only uses the public API, so it doubles as an example of it.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tidings.bus import Bus
from tidings.delivery import Retry
from tidings.events import Event
from tidings.listeners import Listener, listener

__all__ = ["DemoResult", "ListenerFigures", "run_demo"]


@dataclass
class ListenerFigures:
    """What happened to one listener's deliveries."""

    name: str
    delivered: int = 0
    retried: int = 0
    dead: int = 0
    latencies_s: list[float] = field(default_factory=list)

    def percentile(self, q: float) -> float | None:
        """The ``q`` quantile (0..1) of the emit-to-done latency, in seconds."""
        if not self.latencies_s:
            return None
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class DemoResult:
    """The figures of one demo run."""

    users: int
    backend: str
    elapsed_s: float
    listeners: dict[str, ListenerFigures]

    @property
    def deliveries(self) -> int:
        """Deliveries finished: delivered or dead."""
        return sum(f.delivered + f.dead for f in self.listeners.values())


def _listeners(rng: random.Random, audit_log: list[str]) -> list[Listener[..., Any]]:
    flaky_once: set[int] = set()
    lock = threading.Lock()

    @listener("user.created", timeout=2)
    async def send_welcome_mail(email: str) -> None:
        await asyncio.sleep(rng.uniform(0.0005, 0.003))  # talking to the mail server

    @listener("user.*")
    def audit(event: Event) -> None:
        # Sync: runs in the bus's thread pool, never blocking the loop.
        with lock:
            audit_log.append(f"{event.timestamp:.6f} {event.name} {event.kwargs.get('user_id')}")

    @listener("user.created", retry=Retry(attempts=4, backoff=0.02, factor=2, jitter=0.5))
    async def sync_to_crm(user_id: int, event: Event) -> None:
        # One user in five meets a CRM hiccup on the first try, and succeeds on a retry.
        if user_id % 5 == 0 and user_id not in flaky_once:
            flaky_once.add(user_id)
            raise ConnectionError(f"CRM refused user {user_id} (attempt {event.attempt})")
        await asyncio.sleep(0)

    @listener("user.created", retry=Retry(attempts=2, backoff=0.01))
    async def grant_trial(user_id: int, plan: str) -> None:
        # Users on the retired plan cannot get a trial: these become dead letters.
        if plan == "legacy":
            raise ValueError(f"no trial for plan {plan!r} (user {user_id})")

    return [send_welcome_mail, audit, sync_to_crm, grant_trial]


async def run_demo(
    *,
    users: int = 2000,
    batch: int = 100,
    pause_s: float = 0.02,
    seed: int = 7,
    url: str = "memory://",
    on_progress: Callable[[int, int], None] | None = None,
) -> DemoResult:
    """Emit ``users`` sign-ups in batches to the bus at ``url`` and wait until every
    delivery is finished.

    ``on_progress(done, expected)`` is called as deliveries finish.
    """
    rng = random.Random(seed)
    audit_log: list[str] = []
    listeners = _listeners(rng, audit_log)
    figures = {lst.qualname: ListenerFigures(lst.qualname.rsplit(".", 1)[-1]) for lst in listeners}
    expected = users * len(listeners)
    done = 0

    def finished(event: Event, lst: Listener[..., Any]) -> None:
        nonlocal done
        done += 1
        if on_progress is not None:
            on_progress(done, expected)

    def on_success(event: Event, lst: Listener[..., Any]) -> None:
        f = figures[lst.qualname]
        f.delivered += 1
        f.latencies_s.append(time.time() - event.timestamp)
        finished(event, lst)

    def on_error(event: Event, lst: Listener[..., Any], exc: BaseException) -> None:
        figures[lst.qualname].retried += 1

    def on_dead(event: Event, lst: Listener[..., Any], exc: BaseException) -> None:
        f = figures[lst.qualname]
        f.retried -= 1  # on_error ran for the last attempt too; that one was not retried
        f.dead += 1
        finished(event, lst)

    plans = ("free", "pro", "team")
    started = time.perf_counter()
    async with Bus(
        url, listeners=listeners, on_success=on_success, on_error=on_error, on_dead=on_dead
    ) as bus:
        for user_id in range(1, users + 1):
            bus.emit(
                "user.created",
                user_id=user_id,
                email=f"user{user_id}@example.com",
                plan="legacy" if user_id % 50 == 0 else plans[user_id % len(plans)],
            )
            if user_id % batch == 0:
                await asyncio.sleep(pause_s)  # sign-ups arrive in bursts
        await bus.drain()
    elapsed = time.perf_counter() - started
    if on_progress is not None:
        on_progress(done, expected)
    return DemoResult(
        users=users,
        backend=url.split("://", 1)[0],
        elapsed_s=elapsed,
        listeners=dict(figures.items()),
    )
