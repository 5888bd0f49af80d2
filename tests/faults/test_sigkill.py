"""A worker SIGKILLed three times mid-stream: nothing is lost, and what runs twice is
bounded by what was in flight when it died."""

from __future__ import annotations

from pathlib import Path

import pytest

from .stores import DurableStore
from .workers import kill_run

EVENTS = 3000
KILLS = 3
CONCURRENCY = 20  # each worker's, per listener
BATCH = 100
# Slow enough that a kill lands mid-stream on a loaded machine.
JOB_S = 0.01


@pytest.mark.timeout(240)
async def test_three_sigkills_lose_nothing(tmp_path: Path, store: DurableStore) -> None:
    url = store.url(lease=1, poll_interval=0.01, batch=BATCH)
    figures = await kill_run(
        tmp_path, url, events=EVENTS, kills=KILLS, concurrency=CONCURRENCY, job_s=JOB_S
    )
    print(f"\n{store.kind}: {figures}")
    assert figures.killed_at[-1] < 2 * EVENTS, "the workers finished before the last kill"
    assert figures.lost == 0
    # Per kill, per listener: what was running, one claimed batch not yet started, and
    # one batch of outcomes on its way to the store.
    assert figures.duplicates <= KILLS * 2 * (CONCURRENCY + 2 * BATCH)
