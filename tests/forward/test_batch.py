"""The batcher behind the SQS forwarder: batches of at most ``size``, outcomes per item."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from tidings import ForwardError
from tidings.forward._batch import Batcher


async def test_a_burst_goes_in_full_batches_and_each_item_gets_its_own_outcome() -> None:
    batches: list[list[int]] = []

    async def send(items: list[int]) -> Sequence[BaseException | None]:
        batches.append(items)
        return [ForwardError(f"odd {i}") if i % 2 else None for i in items]

    batcher: Batcher[int] = Batcher(send, size=10, wait_s=0)
    outcomes = await asyncio.gather(*(batcher.send(i) for i in range(23)), return_exceptions=True)
    assert [len(b) for b in batches] == [10, 10, 3]
    assert [o is None for o in outcomes] == [i % 2 == 0 for i in range(23)]
    assert str(outcomes[3]) == "odd 3"


async def test_a_batch_that_fails_whole_fails_each_of_its_items() -> None:
    async def send(items: list[int]) -> Sequence[BaseException | None]:
        raise ForwardError("queue gone")

    batcher: Batcher[int] = Batcher(send, size=10, wait_s=0)
    outcomes = await asyncio.gather(*(batcher.send(i) for i in range(3)), return_exceptions=True)
    assert [str(o) for o in outcomes] == ["queue gone"] * 3
    assert outcomes[0] is not outcomes[1]  # one error each, tracebacks apart


async def test_a_batch_waits_for_more_items_up_to_its_wait() -> None:
    batches: list[list[int]] = []

    async def send(items: list[int]) -> Sequence[BaseException | None]:
        batches.append(items)
        return [None] * len(items)

    batcher: Batcher[int] = Batcher(send, size=10, wait_s=30)
    first = asyncio.ensure_future(batcher.send(1))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(batcher.send(2))
    await asyncio.sleep(0)
    assert batches == []  # within the wait, nothing is sent yet
    await batcher.aclose()  # sends what waits
    await asyncio.gather(first, second)
    assert batches == [[1, 2]]


async def test_a_cancelled_sender_leaves_the_others_their_outcome() -> None:
    release = asyncio.Event()

    async def send(items: list[int]) -> Sequence[BaseException | None]:
        await release.wait()
        return [None] * len(items)

    batcher: Batcher[int] = Batcher(send, size=10, wait_s=0)
    first = asyncio.ensure_future(batcher.send(1))
    second = asyncio.ensure_future(batcher.send(2))
    await asyncio.sleep(0)
    first.cancel()
    release.set()
    await second
    with pytest.raises(asyncio.CancelledError):
        await first
    await batcher.aclose()
