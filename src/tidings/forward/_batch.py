"""Sending items in batches while each sender waits for its own item's outcome."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from tidings.errors import ForwardError

__all__ = ["Batcher"]

T = TypeVar("T")

#: Sends a batch; returns one outcome per item, ``None`` for sent, else the error.
SendBatch = Callable[[list[T]], Awaitable[Sequence[BaseException | None]]]


class Batcher(Generic[T]):
    """Groups the items handed to :meth:`send` into batches of at most ``size``.

    A batch goes out once it is full, or ``wait_s`` after its first item (0: at the
    loop's next turn, which gathers what a burst of deliveries handed over). Each
    caller waits for its own item, so retries and dead letters stay per delivery.
    """

    def __init__(self, send_batch: SendBatch[T], *, size: int, wait_s: float) -> None:
        self._send_batch = send_batch
        self.size = size
        self.wait_s = wait_s
        self._items: list[tuple[T, asyncio.Future[None]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()

    async def send(self, item: T) -> None:
        """Queue ``item`` for the next batch and wait until that batch has gone.

        Raises:
            ForwardError: the destination refused this item, or the whole batch.
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._items.append((item, done))
        if len(self._items) >= self.size:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.wait_s, self._flush)
        await done

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._items:
            batch, self._items = self._items[: self.size], self._items[self.size :]
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[T, asyncio.Future[None]]]) -> None:
        try:
            outcomes = await self._send_batch([item for item, _ in batch])
        except Exception as exc:
            for _, done in batch:
                if not done.done():
                    error = ForwardError(str(exc))
                    error.__cause__ = exc
                    done.set_exception(error)
            return
        for (_, done), outcome in zip(batch, outcomes, strict=True):
            if done.done():  # its delivery was cancelled meanwhile (a timeout)
                continue
            if outcome is None:
                done.set_result(None)
            else:
                done.set_exception(outcome)

    async def aclose(self) -> None:
        """Send what waits and wait for the batches under way."""
        self._flush()
        while self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)
