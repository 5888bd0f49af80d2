"""Entries no reader can decode, written straight into the store (by another process, a
newer version of tidings, a broken disk): each is a dead letter after its first failure,
and the events around it are delivered."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from tidings import Bus, listener
from tidings.backends.durable import STORED_VERSION

from .stores import DurableStore

# Deeper than any decoder recurses: a payload another process wrote, never one emit takes.
DEPTH = 5000


def _deep_payload(depth: int) -> bytes:
    return b'{"args":[],"kwargs":{"n":' + b"[" * depth + b"]" * depth + b'},"obj":null}'


@asynccontextmanager
async def running(bus: Bus) -> AsyncIterator[Bus]:
    """``async with bus``, closed with a bound: a stuck store must fail the test, not
    hang it."""
    await bus.start()
    try:
        yield bus
    finally:
        await bus.aclose(timeout=2)


async def _write(store: DurableStore, kind: str) -> None:
    if kind == "undecodable payload":
        await store.write_payload("order.paid", b"\xc1\x00 not json nor msgpack")
    elif kind == "payload of another shape":
        await store.write_payload("order.paid", b'{"no": "args"}')
    elif kind == "too deep payload":
        await store.write_payload("order.paid", _deep_payload(DEPTH))
    elif kind == "newer stored format":
        payload = b'{"args":[],"kwargs":{"n":99},"obj":null}'
        await store.write_payload("order.paid", payload, version=STORED_VERSION + 1)
    else:
        await store.write_unreadable("order.paid")


@pytest.mark.parametrize(
    "kind",
    [
        "undecodable payload",
        "payload of another shape",
        "too deep payload",
        "newer stored format",
        "unreadable entry",
    ],
)
async def test_an_entry_that_cannot_be_decoded_is_a_dead_letter_and_the_rest_run(
    store: DurableStore, kind: str
) -> None:
    seen: list[int] = []

    @listener("order.paid")
    async def charge(n: int) -> None:
        seen.append(n)

    url = store.url(poll_interval=0.01, lease=2)
    async with running(Bus(url, listeners=[charge], consume=False)) as producer:
        for n in range(5):
            await producer.publish("order.paid", n=n)
        await _write(store, kind)
        for n in range(5, 10):
            await producer.publish("order.paid", n=n)
    async with running(Bus(url, listeners=[charge])) as worker:
        await asyncio.wait_for(worker.drain(), 10)
        stats = (await worker.listener_stats())[charge.qualname]
        dead = await worker.list_dead_letters()
    print(f"\n{store.kind}, {kind}: delivered {len(seen)} of 10, dead letters {len(dead)}")
    assert sorted(seen) == list(range(10))
    assert (stats.pending, stats.in_flight, stats.retrying, stats.dead) == (0, 0, 0, 1)
    (letter,) = dead
    assert letter.listener == charge.qualname
    assert letter.attempts == 1  # dead at its first failure: decoding again cannot help
    assert letter.error
    if kind == "unreadable entry":
        assert "cannot be read" in letter.error
