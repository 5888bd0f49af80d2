"""What a bus tells of itself, and the admin of what it holds: its listeners, their
counts and backlog, and its dead letters (read, replayed and purged through
:mod:`tidings._dead`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tidings import _dead
from tidings.backends.base import ListenerStats

if TYPE_CHECKING:
    from tidings._running import Running
    from tidings.backends.base import Backend, DeadLetter
    from tidings.delivery import Runner
    from tidings.listeners import Listener, Registry

__all__ = ["Inspecting"]


class Inspecting:
    """A bus's inspecting and admin methods (:class:`~tidings.Bus` inherits them)."""

    # What the bus holds, set by its __init__.
    backend: Backend
    registry: Registry
    _running: Running | None

    @property
    def _runner(self) -> Runner | None:
        return None if self._running is None else self._running.runner

    def listeners(self) -> list[Listener[..., Any]]:
        """Every subscribed listener, in subscription order."""
        return [sub.listener for sub in self.registry.subscriptions()]

    def dead_letters(self) -> list[DeadLetter]:
        """Recent dead letters (deliveries that failed their last attempt), oldest first.

        Those the backend raised on when handed them are kept by the bus, and listed too.
        """
        kept = self._runner.kept if self._runner is not None else []
        if not kept:
            return self.backend.dead_letters()
        return sorted([*self.backend.dead_letters(), *kept], key=lambda d: d.failed_at)

    async def list_dead_letters(
        self, *, listener: str | None = None, limit: int = 100
    ) -> list[DeadLetter]:
        """Dead letters, oldest first: of one listener (qualified name) or of all.

        Those the backend raised on when handed them are kept by the bus, and listed too.
        """
        return await _dead.list_dead(self.backend, self._runner, listener, limit)

    async def replay_dead_letters(
        self, *, ids: Sequence[str] | None = None, listener: str | None = None
    ) -> int:
        """Deliver dead letters again with fresh attempts (by event id, listener, or all).

        Returns how many deliveries were replayed.
        """
        return await _dead.replay_dead(self.backend, self._runner, self.registry, ids, listener)

    async def purge_dead_letters(
        self, *, ids: Sequence[str] | None = None, listener: str | None = None
    ) -> int:
        """Forget dead letters (by event id, listener, or all); how many."""
        return await _dead.purge_dead(self.backend, self._runner, ids, listener)

    async def listener_stats(self) -> dict[str, ListenerStats]:
        """What waits per listener: in the store for a durable backend, else here.
        Before the bus starts, every listener is listed (with what the store says, if
        it can say yet)."""
        stats = await self.backend.listener_stats()
        if self._runner is None:
            for sub in self.registry.subscriptions():
                stats.setdefault(sub.listener.qualname, ListenerStats())
        return stats

    async def forget_listener(self, name: str) -> bool:
        """Remove a listener (by qualified name) from the durable store: its deliveries
        are deleted and it keeps no event stored; whether it was joined. A bus that
        runs it joins it again when it starts.

        Raises:
            ConfigurationError: the bus is not on a durable store.
            BackendError: the store failed.
        """
        return await self.backend.forget(name)

    def stats(self) -> dict[str, Any]:
        """Delivered and failed counts per listener, and the backend's counters."""
        per_listener = {
            sub.listener.qualname: {"delivered": sub.delivered, "failed": sub.failed}
            for sub in self.registry.subscriptions()
        }
        return {"listeners": per_listener, "backend": self.backend.stats()}
