"""A stale owner: a worker frozen (SIGSTOP) past its lease while it runs deliveries.

Another worker takes them over when the lease expires, as it must. When the frozen one
runs again (SIGCONT), its first attempts end in an error: it must neither renew what it
no longer owns nor write that retry over the new owner's lease, which would let a third
run start while the new owner's still runs. Nothing is lost either.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tidings import Bus

from . import app
from .stores import DurableStore
from .workers import Workers

EVENTS = 3
LEASE_S = 1.0


@dataclass(slots=True)
class Run:
    """One run of a delivery, from the listener's own lines."""

    n: int
    attempt: int
    pid: int
    start: float
    end: float | None = None


def _runs(lines: list[list[str]]) -> list[Run]:
    runs: dict[tuple[int, int, int], Run] = {}
    for what, n, attempt, pid, at in lines:
        key = (int(n), int(attempt), int(pid))
        if what == "start":
            runs[key] = Run(int(n), int(attempt), int(pid), float(at))
        elif key in runs:
            runs[key].end = float(at)
    return list(runs.values())


def _overlap(a: Run, b: Run) -> bool:
    a_end = a.end if a.end is not None else float("inf")
    b_end = b.end if b.end is not None else float("inf")
    return a.start < b_end and b.start < a_end


@pytest.mark.timeout(240)
async def test_a_frozen_worker_neither_retakes_nor_settles_what_another_now_owns(
    tmp_path: Path, store: DurableStore
) -> None:
    url = store.url(lease=LEASE_S, poll_interval=0.01)
    async with Bus(url, listeners=[app.slow], consume=False) as producer:
        for n in range(EVENTS):
            await producer.publish("slow", n=n)
    workers = Workers(tmp_path, url, "tests.faults.app:stale")
    try:
        frozen = workers.start()

        def started(attempt: int, count: int) -> Callable[[list[list[str]]], bool]:
            def check(lines: list[list[str]]) -> bool:
                return sum(1 for r in _runs(lines) if r.attempt == attempt) >= count

            return check

        await workers.wait_until(
            started(1, EVENTS), "every first attempt started", timeout_s=90, alive=frozen
        )
        frozen.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        taker = workers.start()
        # The lease expires, and the other worker takes the deliveries over: one at a
        # time, since each was lost with its worker. Once it runs one, the frozen worker
        # runs again: that delivery is no longer its own.
        await workers.wait_until(started(2, 1), "a delivery taken over", timeout_s=90, alive=taker)
        frozen.send_signal(signal.SIGCONT)
        resumed_at = time.monotonic()

        def finished(lines: list[list[str]]) -> bool:
            runs = _runs(lines)
            done = {r.n for r in runs if r.attempt >= 2 and r.end is not None}
            return len(done) == EVENTS and all(r.end is not None for r in runs)

        await workers.wait_until(finished, "every delivery made", timeout_s=90, alive=taker)
        # Room for a late (wrong) retry to start, before the processes stop.
        await workers.wait_until(
            lambda _lines: time.monotonic() > resumed_at + 3 * LEASE_S, "a few leases later"
        )
        assert Workers.stop(taker) == 0, workers.logs()[-3000:]
        assert Workers.stop(frozen) == 0, workers.logs()[-3000:]
    finally:
        workers.reap()
    runs = _runs(workers.lines())
    # The frozen worker's runs started before it was frozen: their lease allowed the next
    # owner to start beside them. Any other two runs of a delivery at once are two owners.
    stale = [r for r in runs if r.start < stopped_at]
    fresh = [r for r in runs if r.start >= stopped_at]
    both = [
        (a, b) for i, a in enumerate(fresh) for b in fresh[i + 1 :] if a.n == b.n and _overlap(a, b)
    ]
    print(
        f"\n{store.kind}: {len(stale)} runs frozen past their lease, {len(fresh)} runs after; "
        f"runs of one delivery at once by two live owners: {len(both)} "
        f"(attempts {sorted({(r.attempt) for r in fresh})})"
    )
    assert {r.n for r in fresh if r.end is not None} == set(range(EVENTS))  # nothing lost
    assert not both, both
    # The frozen worker's failed attempts were not written over the new owner's lease:
    # each delivery ran once after the takeover.
    assert sorted(r.n for r in fresh) == list(range(EVENTS))
