"""What every forwarder shares: the listener it is made into, one connection per event
loop (closed when the bus closes), and the event's JSON form."""

from __future__ import annotations

import asyncio
import weakref
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

import msgspec

from tidings.codec import encode_payload
from tidings.events import Event
from tidings.listeners import Listener, split_names

__all__ = ["Forwarder", "event_json", "listener_name"]

C = TypeVar("C")


class Forwarder(ABC, Generic[C]):
    """Sends events to a destination outside the bus, over a connection of type ``C``.

    A connection is opened on the first event of each event loop and closed by
    :meth:`aclose`, which the bus calls when it closes.
    """

    def __init__(self) -> None:
        self._connections: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, C] = (
            weakref.WeakKeyDictionary()
        )
        self._opening: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )

    @abstractmethod
    async def send(self, event: Event) -> None:
        """Hand ``event`` to the destination; raise ``ForwardError`` if it refuses."""

    @abstractmethod
    async def _open(self) -> C:
        """A new connection, on the running loop."""

    @abstractmethod
    async def _close(self, connection: C) -> None:
        """Close a connection :meth:`_open` made."""

    async def connection(self) -> C:
        """The running loop's connection, opened on first use."""
        loop = asyncio.get_running_loop()
        connection = self._connections.get(loop)
        if connection is not None:
            return connection
        lock = self._opening.setdefault(loop, asyncio.Lock())
        async with lock:  # the first events of a burst all wait for one connection
            connection = self._connections.get(loop)
            if connection is None:
                connection = await self._open()
                self._connections[loop] = connection
        return connection

    async def aclose(self) -> None:
        """Close the running loop's connection, if one is open (it reopens on use)."""
        loop = asyncio.get_running_loop()
        self._opening.pop(loop, None)
        connection = self._connections.pop(loop, None)
        if connection is not None:
            await self._close(connection)

    def listener(
        self, names: Sequence[str | type[Any]], name: str, **options: Any
    ) -> Listener[..., Any]:
        """This forwarder as a listener of ``names`` (names, patterns or typed-event
        classes), whose qualified name is ``name``."""
        forwarder = self

        async def forward(event: Event) -> None:
            # A listener starts outside a task until it first suspends, and the drivers
            # (httpx through sniffio, say) look for the running task: suspend first.
            await asyncio.sleep(0)
            await forwarder.send(event)

        # The qualified name identifies the listener's deliveries in a durable store:
        # each forwarder gets its own, stable across restarts.
        forward.__module__ = "tidings.forward"
        forward.__qualname__ = forward.__name__ = name
        forward.aclose = forwarder.aclose  # type: ignore[attr-defined]
        forward.forwarder = forwarder  # type: ignore[attr-defined]
        # A typed-event class among the names makes a durable store hand the forwarder
        # the event's object, not its fields.
        str_names, typed = split_names(names)
        return Listener(forward, str_names, typed=typed, **options)


def event_json(event: Event) -> bytes:
    """The event as one JSON object: id, name, timestamp, attempt, headers and payload
    (``{"args": [...], "kwargs": {...}, "obj": ...}``).

    Raises:
        PayloadError: the payload cannot be serialized.
    """
    return msgspec.json.encode(
        {
            "id": event.id,
            "name": event.name,
            "timestamp": event.timestamp,
            "attempt": event.attempt,
            "headers": dict(event.headers),
            "payload": msgspec.Raw(encode_payload(event)),
        }
    )


def listener_name(kind: str, url: str) -> str:
    """A forwarder's default listener name: its kind and destination, without the URL's
    credentials, query or fragment (where tokens tend to be)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return f"{kind}({parts.scheme}://{netloc}{parts.path})"
