"""Dead-letter admin for a bus: its backend's dead letters (the
:class:`~tidings.backends.base.DeadLetters` protocol) and those its runner kept when the
backend raised on being handed one."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextvars import copy_context
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tidings.backends.base import Backend
    from tidings.delivery import DeadLetter, Runner
    from tidings.listeners import Registry

__all__ = ["list_dead", "purge_dead", "replay_dead"]

logger = logging.getLogger("tidings.bus")


async def list_dead(
    backend: Backend, runner: Runner | None, listener: str | None, limit: int
) -> list[DeadLetter]:
    """Dead letters, oldest first: of one listener (qualified name) or of all."""
    dead = await backend.list_dead(listener, limit)
    kept = [d for d in (runner.kept if runner else []) if listener in (None, d.listener)]
    if not kept:
        return dead
    return sorted([*dead, *kept], key=lambda d: d.failed_at)[:limit]


async def replay_dead(
    backend: Backend,
    runner: Runner | None,
    registry: Registry,
    ids: Sequence[str] | None,
    listener: str | None,
) -> int:
    """Deliver dead letters again with fresh attempts; how many."""
    count = await backend.replay_dead(ids, listener)
    kept = runner.take_kept(ids, listener) if runner is not None else []
    subs = {sub.listener.qualname: sub for sub in registry.subscriptions()}
    for letter in kept:
        sub = subs.get(letter.listener)
        if sub is None:
            logger.warning(
                "dead letter of event %s for %s not replayed: no such listener here",
                letter.event.id,
                letter.listener,
            )
            continue
        await backend.put_wait(letter.event.for_attempt(1), (sub,), copy_context())
        count += 1
    return count


async def purge_dead(
    backend: Backend, runner: Runner | None, ids: Sequence[str] | None, listener: str | None
) -> int:
    """Forget dead letters; how many."""
    kept = runner.take_kept(ids, listener) if runner is not None else []
    return await backend.purge_dead(ids, listener) + len(kept)
