"""The event envelope and the naming of typed events.

An event is a name and a payload: positional and keyword arguments, or one typed object
(a dataclass, msgspec Struct or pydantic model). The envelope adds an id, a timestamp,
headers and, for one delivery, the attempt number.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from os import urandom
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import msgspec

from tidings.errors import ConfigurationError, EmitError

if TYPE_CHECKING:
    from contextvars import Context

    from tidings.listeners import Subscription

__all__ = ["MAX_NAME_BYTES", "Event", "check_event_name", "event_name_of", "register_event"]

#: The longest event name, in UTF-8 bytes.
MAX_NAME_BYTES = 255

# What an emitted name never holds: wildcards (a pattern is no name), whitespace,
# control characters, and lone surrogates (which no store can encode).
_FORBIDDEN = re.compile(r"[*\s\x00-\x1f\x7f-\x9f\ud800-\udfff]")

_registered: dict[type[Any], str] = {}


def register_event(cls: type[Any], name: str) -> None:
    """Give a class an event name without setting ``__event_name__`` on it.

    Raises:
        ConfigurationError: the class is already registered under another name, or
            another class under this one.
    """
    current = _registered.get(cls)
    if current is not None and current != name:
        raise ConfigurationError(
            f"{cls.__qualname__} is already registered as event {current!r}, not {name!r}"
        )
    for other, other_name in list(_registered.items()):
        if other_name == name and other is not cls:
            if (other.__module__, other.__qualname__) != (cls.__module__, cls.__qualname__):
                raise ConfigurationError(
                    f"event {name!r} is already registered for {other.__qualname__}, "
                    f"not {cls.__qualname__}"
                )
            del _registered[other]  # the same class, defined again (a reloaded module)
    _registered[cls] = name


def event_name_of(cls: type[Any]) -> str | None:
    """The event name of a typed-event class, or ``None`` if it is not one."""
    name = _registered.get(cls)
    if name is not None:
        return name
    name = getattr(cls, "__event_name__", None)
    if isinstance(name, str):
        return name
    return None


def check_event_name(name: str, *, pattern: bool = False) -> str:
    """Return ``name`` if an event may be emitted under it, else raise.

    An event name is a non-empty string of at most 255 UTF-8 bytes, without wildcards
    (``*``), whitespace, control characters or lone surrogates. With ``pattern=True``,
    wildcards are allowed (a listener's pattern).

    Raises:
        EmitError: the name breaks one of those rules; the message says which.
    """
    if not isinstance(name, str):
        raise EmitError(f"an event name is a string, not {name!r}")
    if not name:
        raise EmitError("an event name cannot be empty")
    bad = _FORBIDDEN.search(name.replace("*", "") if pattern else name)
    if bad is not None:
        char = bad.group()
        what = (
            "a wildcard: a pattern is for listeners, an event has one name"
            if char == "*"
            else f"the character {char!r}: no whitespace or control characters"
            if not 0xD800 <= ord(char) <= 0xDFFF
            else f"a lone surrogate ({char!r}), which cannot be encoded"
        )
        raise EmitError(f"event name {_shown(name)} holds {what}")
    # A character is at most 4 bytes: only long names need encoding to be measured.
    if len(name) * 4 > MAX_NAME_BYTES and len(name.encode()) > MAX_NAME_BYTES:
        raise EmitError(
            f"event name {_shown(name)} is {len(name.encode())} bytes long in UTF-8; "
            f"the most is {MAX_NAME_BYTES}"
        )
    return name


def _shown(name: str) -> str:
    return repr(name) if len(name) <= 80 else f"{name[:60]!r}... ({len(name)} characters)"


_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


class Event(msgspec.Struct):
    """One event: its name, payload and envelope.

    ``args`` and ``kwargs`` are the payload of a named event; ``obj`` is the object of a
    typed event (then ``payload``). ``attempt`` is 1 for a first delivery and counts up
    with each retry of it. ``id`` is made the first time it is read.
    """

    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = msgspec.field(default_factory=dict)
    timestamp: float = msgspec.field(default_factory=time.time)
    headers: Mapping[str, str] = _NO_HEADERS
    _id: str | None = None
    attempt: int = 1
    obj: Any = None

    @property
    def id(self) -> str:
        """A unique id (made when first read, so unread ids cost nothing)."""
        if self._id is None:
            self._id = urandom(16).hex()  # 128 random bits, as uuid4 but 5x cheaper
        return self._id

    @property
    def payload(self) -> Any:
        """The typed object of a typed event, else the keyword arguments."""
        return self.obj if self.obj is not None else self.kwargs

    def for_attempt(self, attempt: int) -> Event:
        """A copy of this envelope for another attempt of one delivery."""
        return msgspec.structs.replace(self, _id=self.id, attempt=attempt)

    def __repr__(self) -> str:
        return f"<Event {self.name!r} id={self.id} attempt={self.attempt}>"


class QueuedEvent(msgspec.Struct, gc=False):
    """A plain named event queued in process, its envelope built only when something
    reads it (what the bus's flat ``emit`` queues).

    Not tracked by the garbage collector: a burst of waiting events adds nothing for
    it to follow (one only lives while it waits, so it never closes a cycle for long).
    """

    #: The subscriptions whose deliveries have not started.
    subs: tuple[Subscription, ...]
    #: The emitter's context (a copy, shared by the events it emitted in a row).
    context: Context
    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    #: When it was emitted (``time.time()``).
    emitted_at: float
    #: The envelope, once built.
    event: Event | None = None

    def envelope(self) -> Event:
        """The event's envelope, built the first time it is asked for."""
        event = self.event
        if event is None:
            name = self.name
            # A ``str`` subclass (a ``StrEnum`` member) is queued as it is: its event is
            # named with the plain value.
            event = self.event = Event(
                name if type(name) is str else str.__str__(name),
                self.args,
                self.kwargs,
                self.emitted_at,
            )
        return event
