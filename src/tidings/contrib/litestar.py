"""Litestar: tidings behind Litestar's own ``@listener`` and ``app.emit``.

As an event emitter backend, keeping Litestar's listeners and semantics::

    app = Litestar(route_handlers=[...], listeners=[...],
                   event_emitter_backend=TidingsEmitterBackend)

    # retries, dead letters and a durable store, with the same listeners:
    app = Litestar(..., event_emitter_backend=TidingsEmitterBackend.using("sqlite:///events.db"))

Or as a plugin, which also holds a request's events until its response is sent (see
:mod:`tidings.asgi`) and provides the bus to handlers as the dependency ``bus``::

    bus = Bus("redis://localhost:6379/0", retry=3)
    app = Litestar(route_handlers=[...], listeners=[...], plugins=[TidingsPlugin(bus)])

Litestar's semantics are kept: ``app.emit`` before startup raises ``RuntimeError``, an
event nobody listens to raises ``ImproperlyConfiguredException``, and shutdown waits for
the deliveries under way. Each listener receives only the arguments its signature names
(Litestar passes every argument to every listener); one that raises is logged with its
traceback and retried as the bus's policy says, and never disturbs the others.

Needs ``pip install 'tidings[litestar]'``.
"""

from __future__ import annotations

import inspect
import threading
import weakref
from collections.abc import Hashable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar

try:
    from litestar.config.app import AppConfig
    from litestar.di import Provide
    from litestar.events.emitter import BaseEventEmitterBackend
    from litestar.exceptions import ImproperlyConfiguredException
    from litestar.middleware import DefineMiddleware
    from litestar.plugins import InitPluginProtocol
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "tidings.contrib.litestar needs Litestar: pip install 'tidings[litestar]'"
    ) from exc

from tidings.asgi import EventsMiddleware
from tidings.bus import Bus
from tidings.listeners import Listener

if TYPE_CHECKING:
    from litestar.events.listener import EventListener

    from tidings.listeners import Subscription

__all__ = ["TidingsEmitterBackend", "TidingsPlugin"]


class _Shared:
    """The subscription of one listener on one bus, and how many emitters hold it."""

    __slots__ = ("holders", "subscription")

    def __init__(self, subscription: Subscription) -> None:
        self.subscription = subscription
        self.holders = 0


# Per bus, the listeners emitters subscribed there. Every app built on one bus (a
# module-level app and a test's own, say) makes an emitter with the same listeners: they
# share one subscription, so each event reaches a listener once and a durable store, which
# tells listeners apart by name, does not refuse the second. The last emitter to let go of
# it unsubscribes it.
_shared: weakref.WeakKeyDictionary[Bus, dict[Hashable, _Shared]] = weakref.WeakKeyDictionary()
_shared_lock = threading.Lock()


class TidingsEmitterBackend(BaseEventEmitterBackend):
    """A Litestar event emitter backend that delivers through a tidings :class:`Bus`.

    Used as is, each app gets an in-process bus of its own. :meth:`using` makes one
    that delivers through a given bus or backend URL.
    """

    __slots__ = ("_held", "_listeners", "_started_here", "bus")

    #: Where deliveries go: a bus, a backend URL, or ``None`` (in process).
    source: ClassVar[Bus | str | None] = None
    #: Whether an event with no listener is an error, as with Litestar's own backend.
    strict: ClassVar[bool] = True

    def __init__(self, listeners: Sequence[EventListener]) -> None:
        # Litestar's own bookkeeping reads event_ids, which tidings listeners lack.
        super().__init__([item for item in listeners if not isinstance(item, Listener)])
        source = type(self).source
        self.bus = source if isinstance(source, Bus) else Bus(source)
        self._started_here = False
        self._listeners = list(listeners)
        self._held: list[Hashable] = []
        # Subscribed now, not at startup: a worker that imports the app's module runs
        # them without ever starting the app.
        self._hold()

    @classmethod
    def using(cls, bus_or_url: Bus | str, *, strict: bool = True) -> type[TidingsEmitterBackend]:
        """A backend class that delivers through ``bus_or_url``, for
        ``Litestar(event_emitter_backend=...)``."""
        return type(cls.__name__, (cls,), {"source": bus_or_url, "strict": strict})

    def _hold(self) -> None:
        with _shared_lock:
            held = _shared.setdefault(self.bus, {})
            current = set(self.bus.registry.subscriptions())
            try:
                for item in self._listeners:
                    if isinstance(item, Listener):  # tidings' own, with its names and options
                        key: Hashable = item
                        fn: Any = item
                        names: tuple[str, ...] = ()
                    else:
                        fn = _original(item.fn)
                        names = tuple(sorted(item.event_ids))
                        key = (fn, names)
                    shared = held.get(key)
                    if shared is None or shared.subscription not in current:
                        # Not on this bus yet, or unsubscribed there since.
                        shared = held[key] = _Shared(self.bus.registry.subscribe(fn, *names))
                        current.add(shared.subscription)
                    shared.holders += 1
                    self._held.append(key)
            except BaseException:
                self._release(held)
                raise

    def _let_go(self) -> None:
        with _shared_lock:
            self._release(_shared.get(self.bus, {}))

    def _release(self, held: dict[Hashable, _Shared]) -> None:
        for key in self._held:
            shared = held.get(key)
            if shared is not None:
                shared.holders -= 1
                if shared.holders <= 0:
                    shared.subscription.unsubscribe()
                    del held[key]
        self._held.clear()

    async def __aenter__(self) -> TidingsEmitterBackend:
        if not self._held:  # started again after a shutdown let go of the listeners
            self._hold()
        if not self.bus.started:
            await self.bus.start()
            self._started_here = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        try:
            if self._started_here:
                await self.bus.aclose()
                self._started_here = False
            else:
                await self.bus.drain()
        finally:
            self._let_go()

    def emit(self, event_id: str, *args: Any, **kwargs: Any) -> None:
        """Emit ``event_id`` to its listeners; returns at once. Every keyword argument
        is payload (``key=``, ``delay=``... included).

        Raises:
            RuntimeError: the app has not started (the emitter is not initialized).
            ImproperlyConfiguredException: no listener listens to ``event_id``.
        """
        if not self.bus.started:
            raise RuntimeError("Emitter not initialized: app.emit works once the app has started")
        if self.strict and not self.bus.registry.resolve(event_id):
            raise ImproperlyConfiguredException(
                f"no event listeners are registered for event ID: {event_id}"
            )
        self.bus.emit(event_id, *args, **kwargs)


def _original(fn: Any) -> Any:
    """The function a Litestar listener decorated, under the error handler Litestar
    wraps it in (tidings handles errors itself) and the thread wrapper of a sync one."""
    code = getattr(fn, "__code__", None)
    closure = getattr(fn, "__closure__", None)
    if code is not None and closure and "fn" in code.co_freevars:
        fn = closure[code.co_freevars.index("fn")].cell_contents
    fn = getattr(fn, "func", fn)  # litestar.utils.sync.AsyncCallable
    return inspect.unwrap(fn)


class TidingsPlugin(InitPluginProtocol):
    """Run Litestar's events through ``bus``: ``app.emit`` and ``@listener`` deliver
    through it, the app's lifespan starts and drains it, a request's events wait for its
    response (``on_error`` as in :class:`~tidings.asgi.EventsMiddleware`), and handlers
    may ask for it as the dependency ``bus``. ``Litestar(listeners=[...])`` may hold
    tidings listeners (``tidings.listener``) beside Litestar's: they join the bus."""

    __slots__ = ("bus", "on_error")

    def __init__(self, bus: Bus, *, on_error: str = "drop") -> None:
        self.bus = bus
        self.on_error = on_error

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        # tidings' own @listener functions may sit beside Litestar's in listeners=[...]:
        # they go to the bus (once, however many apps share it), not to Litestar.
        ours = [item for item in app_config.listeners if isinstance(item, Listener)]
        if ours:
            app_config.listeners = [
                item for item in app_config.listeners if not isinstance(item, Listener)
            ]
            known = {sub.listener for sub in self.bus.registry.subscriptions()}
            for item in ours:
                if item not in known:
                    self.bus.registry.add(item)
        app_config.event_emitter_backend = TidingsEmitterBackend.using(self.bus)
        app_config.middleware.append(
            # Litestar's scope types are TypedDicts; the middleware takes any mapping.
            DefineMiddleware(EventsMiddleware, bus=self.bus, on_error=self.on_error)  # type: ignore[arg-type]
        )
        bus = self.bus

        def provide_bus() -> Bus:
            return bus

        app_config.dependencies["bus"] = Provide(provide_bus, sync_to_thread=False)
        return app_config
