"""The broker killed (SIGKILL) mid-stream and started again, on a private server.

With persistence (PostgreSQL; Redis with an fsynced append-only file) every event whose
``publish`` returned is delivered. Without it (Redis keeping nothing across a restart)
what was stored before the crash is gone with the server's memory, but every event
``publish`` acknowledged after the restart is delivered: producers and workers make
again what the server forgot.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tidings import Bus, listener
from tidings.errors import BackendError

from .stores import DurableStore

EVENTS = 2000
KILL_AT = 1000


@pytest.mark.timeout(180)
@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "volatile"])
async def test_what_publish_acknowledged_survives_a_broker_restart(
    tmp_path: Path, store: DurableStore, persistent: bool
) -> None:
    private = store.private_server(tmp_path, persistent=persistent)
    if private is None:
        pytest.skip(f"{store.kind} has no {'persistent' if persistent else 'volatile'} server")
    delivered: set[int] = set()
    under_way = asyncio.Event()

    @listener("job", concurrency=1)
    async def job(n: int) -> None:
        await asyncio.sleep(0.001)  # slower than the producer: a backlog builds up
        delivered.add(n)
        if len(delivered) >= 100:
            under_way.set()

    published: list[int] = []
    refused = 0
    backlog = 0
    with private as server:
        url = store.server_url(server, poll_interval=0.01, lease=2)
        # A producer-only bus and a worker, as a web process and a worker are.
        async with Bus(url, listeners=[job], consume=False) as producer:
            worker = Bus(url, listeners=[job])
            await worker.start()
            try:
                for n in range(EVENTS):
                    if n == KILL_AT:
                        await asyncio.wait_for(under_way.wait(), 30)
                        backlog = n - len(delivered)
                        server.kill()
                        began = time.monotonic()
                        with pytest.raises(BackendError):
                            await producer.publish("job", n=-1)
                        assert time.monotonic() - began < 60  # an error, not a hang
                        server.start()
                    while True:
                        try:
                            await producer.publish("job", n=n)
                            break
                        except BackendError:
                            refused += 1
                            await asyncio.sleep(0.05)
                    published.append(n)
                # Every published event is stored: the worker has them all once idle.
                await asyncio.wait_for(worker.drain(), 60)
            finally:
                await worker.aclose(timeout=5)
    before = [n for n in published if n < KILL_AT]
    after = [n for n in published if n >= KILL_AT]
    print(
        f"\n{store.kind} ({'persistent' if persistent else 'volatile'}) killed after {KILL_AT} "
        f"of {EVENTS} publishes ({backlog} not yet delivered), {refused} refused while it was "
        f"down; lost: {len(set(before) - delivered)} published before the restart, "
        f"{len(set(after) - delivered)} after"
    )
    assert set(after) <= delivered
    if persistent:
        assert set(before) <= delivered
