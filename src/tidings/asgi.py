"""ASGI middleware: the events a request emits run after its response is sent.

::

    app = EventsMiddleware(app, bus=bus)          # Starlette, FastAPI, any ASGI app
    app.add_middleware(EventsMiddleware, bus=bus)  # the same, through Starlette

While an HTTP request is handled, ``bus.emit`` checks the event (payload, schema,
listeners) and holds it; once the response's last byte has been handed to the server,
the held events go to the bus, which queues them and returns at once: the response is
never delayed, and the server's request task never waits for a listener.

A request that ends in an unhandled error drops what it emitted (``on_error="send"``
keeps it), so listeners act only on requests that succeeded; a response the app itself
sends with a 5xx status is a success. WebSocket connections and lifespan events are
not held: their emits go to the bus at once, as do emits outside any request (startup
hooks, background tasks that run after the response, tasks spawned by the request that
emit after it ended). ``await bus.publish(...)`` is never held: it says the event is
stored. The middleware is pure ASGI, so context variables flow as usual.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any, Literal

from tidings._hold import Hold, enter, leave
from tidings.errors import ConfigurationError

if TYPE_CHECKING:
    from tidings.bus import Bus

__all__ = ["EventsMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class EventsMiddleware:
    """Hold the events each HTTP request emits to ``bus`` until its response is sent.

    Args:
        app: the ASGI app to wrap.
        bus: the bus whose events are held (other buses are not affected).
        on_error: ``"drop"`` (the default) forgets the events of a request that raised;
            ``"send"`` hands them over anyway.
    """

    def __init__(
        self, app: ASGIApp, *, bus: Bus, on_error: Literal["drop", "send"] = "drop"
    ) -> None:
        if on_error not in ("drop", "send"):
            raise ConfigurationError(f"on_error must be 'drop' or 'send', not {on_error!r}")
        self.app = app
        self.bus = bus
        self.on_error = on_error
        bus.hold_requests()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        hold = Hold(self.bus)

        async def sending(message: Message) -> None:
            await send(message)
            kind = message["type"]
            if kind == "http.response.body":
                if not message.get("more_body", False) and hold.open and hold.status < 500:
                    # The response is out: what it emitted may run now. (A 5xx response
                    # may come from an error handler: wait to see whether the app raised.)
                    await hold.release()
            elif kind == "http.response.start":
                hold.status = message["status"]

        token = enter(hold)
        try:
            await self.app(scope, receive, sending)
        except BaseException:
            if hold.open:
                if self.on_error == "send":
                    await hold.release()
                else:
                    hold.drop()
            raise
        finally:
            leave(token)
        if hold.open:
            await hold.release()
