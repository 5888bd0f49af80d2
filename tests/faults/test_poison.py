"""Poison: a listener that kills its worker process on one event. Its batch-mates are
delivered, the other listener of the poisoned event gets it, and the poison itself is a
dead letter (``DeliveryLost``) once it was started ``max_lost_runs`` times too often."""

from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path

import pytest

from tidings import Bus

from . import app
from .stores import DurableStore
from .workers import Workers

EVENTS = 20
MAX_LOST_RUNS = 2


@pytest.mark.timeout(180)
async def test_a_listener_that_kills_its_process_is_isolated_and_buried(
    tmp_path: Path, store: DurableStore
) -> None:
    url = store.url(lease=1, poll_interval=0.01, max_lost_runs=MAX_LOST_RUNS)
    async with Bus(url, listeners=[app.poisoned, app.calm], consume=False) as producer:
        for n in range(EVENTS):
            producer.emit("dose", n=n)
    workers = Workers(tmp_path, url, "tests.faults.app:poison")
    wanted = {("poisoned", str(n)) for n in range(EVENTS) if n != app.POISON}
    wanted |= {("calm", str(n)) for n in range(EVENTS)}

    def done(lines: list[list[str]]) -> bool:
        return wanted <= {(tag, n) for tag, n, *_ in lines}

    # Each start of the poison kills a worker: start another, until every delivery is
    # settled, made or buried (or a bound is passed).
    crashes = 0
    deadline = time.monotonic() + 120
    try:
        async with Bus(url, listeners=[app.poisoned, app.calm], consume=False) as observer:
            worker = workers.start()
            while time.monotonic() < deadline and crashes <= 2 * (1 + MAX_LOST_RUNS):
                if worker.poll() is not None:
                    crashes += 1
                    worker = workers.start()
                    continue
                stats = await observer.listener_stats()
                if all(s.pending + s.in_flight + s.retrying == 0 for s in stats.values()):
                    break  # every delivery settled: made, or buried
                # A file and a subprocess to watch: nothing to await.
                await asyncio.sleep(0.2)
            dead = await observer.list_dead_letters()
            stats = await observer.listener_stats()
        assert Workers.stop(worker) == 0, workers.logs()[-3000:]
    finally:
        workers.reap()
    lines = workers.lines()
    poison_runs = sum(1 for tag, *_ in lines if tag == "poison")
    others = [(tag, n) for tag, n, *_ in lines if tag != "poison"]
    buried = collections.Counter(d.listener.rsplit(".", 1)[-1] for d in dead)
    print(
        f"\n{store.kind}: {crashes} workers killed by the poison ({poison_runs} runs); "
        f"{len(set(others))} of {len(wanted)} other deliveries made ({len(others)} runs); "
        f"dead letters: {dict(buried)}"
    )
    assert done(lines)
    assert poison_runs == 1 + MAX_LOST_RUNS
    (letter,) = dead
    assert letter.listener == app.poisoned.qualname
    assert letter.event.kwargs == {"n": app.POISON}
    assert "DeliveryLost" in letter.error
    assert stats[app.poisoned.qualname].dead == 1
    assert stats[app.calm.qualname].dead == 0
