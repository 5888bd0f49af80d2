"""Forwarding events to another tidings bus: a bridge between backends."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tidings.backends._options import redact
from tidings.errors import ConfigurationError
from tidings.events import Event
from tidings.forward._base import Forwarder, listener_name
from tidings.listeners import Listener

if TYPE_CHECKING:
    from tidings.bus import Bus

__all__ = ["bridge"]


class Bridge(Forwarder["Bus"]):
    """Publishes each event on another bus, made from a URL or given."""

    def __init__(self, target: str | Bus) -> None:
        super().__init__()
        self.target = target

    async def _open(self) -> Bus:
        if not isinstance(self.target, str):
            return self.target  # the caller's bus, started and closed by the caller
        from tidings.bus import Bus

        bus = Bus(self.target, consume=False)
        await bus.start()
        return bus

    async def _close(self, connection: Bus) -> None:
        if isinstance(self.target, str):
            await connection.aclose()

    async def send(self, event: Event) -> None:
        bus = await self.connection()
        if event.obj is not None and not event.args and not event.kwargs:
            args: tuple[Any, ...] = (event.obj,)
            kwargs: dict[str, Any] = {}
        else:
            args, kwargs = (event.name, *event.args), event.kwargs
        if event.headers:
            await bus.options(headers=dict(event.headers)).publish(*args, **kwargs)
        else:
            await bus.publish(*args, **kwargs)


def bridge(
    target: str | Bus, *names: str | type[Any], name: str | None = None, **options: Any
) -> Listener[..., Any]:
    """A listener that publishes each event of ``names`` on another bus, with its payload
    and headers: an in-process bus feeding a durable store, or one broker feeding another.

    A delivery succeeds once the other bus has accepted the event (``await publish``:
    stored, on a durable backend), so with a durable source nothing is lost between the
    two. Events reach the listeners joined to the other bus's store, as any published
    event does; its workers run them.

    Args:
        target: the other bus's URL (a producer-only bus is opened on first use and
            closed with this bus), or a started :class:`~tidings.Bus` (left to its owner).
        names: the event names, patterns or typed-event classes to forward.
        name: the listener's name (default ``bridge(<url>)``); keep it stable, a durable
            store tracks deliveries by it.
        options: other listener options (``retry``, ``concurrency``, ``on_dead``...).

    Raises:
        ConfigurationError: no names, or a ``memory://`` URL (pass that bus instead).
    """
    if isinstance(target, str):
        where = listener_name("bridge", redact(target))
        if target.split("://", 1)[0].lower() == "memory":
            raise ConfigurationError(
                f"{where} would publish into a new in-process bus that nothing listens "
                "to: pass the started Bus itself, forward.bridge(other_bus, ...)"
            )
    else:
        where = f"bridge({target.url})"
    if not names:
        raise ConfigurationError(f"{where} forwards no event name: give names or patterns")
    return Bridge(target).listener(names, name or where, **options)
