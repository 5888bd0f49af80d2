"""Sending items in batches while each sender waits for its own item's outcome."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from tidings import _batching
from tidings.errors import ForwardError

__all__ = ["Batcher"]

T = TypeVar("T")


def _forward_error(exc: Exception) -> BaseException:
    error = ForwardError(str(exc))
    error.__cause__ = exc
    return error


class Batcher(_batching.Batcher[T]):
    """The batcher of batch listeners, where a batch that fails whole fails each of its
    items with a ``ForwardError`` of its own (so their tracebacks stay apart)."""

    def __init__(
        self,
        send_batch: _batching.SendBatch[T],
        *,
        size: int,
        wait_s: float,
        failure: Callable[[Exception], BaseException] = _forward_error,
    ) -> None:
        super().__init__(send_batch, size=size, wait_s=wait_s, failure=failure)
