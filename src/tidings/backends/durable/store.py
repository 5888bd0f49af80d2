"""The storage protocol a durable broker implements, and the records it stores.

A broker stores events (:class:`Stored`), hands deliveries out under a lease
(:class:`Claimed`), and writes their outcomes back (:class:`Outcomes`). It never sees a
listener, a retry policy or a hook: :mod:`tidings.backends.durable.engine` drives it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from tidings.backends.base import DeadLetter, ListenerStats
from tidings.codec import decode_payload
from tidings.delivery import error_text
from tidings.errors import BackendError, PayloadError
from tidings.events import Event

__all__ = [
    "STORED_VERSION",
    "Claimed",
    "ListenerStats",
    "Outcomes",
    "Store",
    "Stored",
    "dead_letter",
    "dead_letter_row",
    "event_of",
    "stored_row",
    "unreadable",
]

#: The newest stored format this version of tidings reads (and the one it writes).
STORED_VERSION = 1


class Stored(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One event as a broker stores it (a broker may store it as this msgpack array).

    Untracked by the garbage collector (``gc=False``: it holds no reference back to
    anything that holds it), as :class:`Claimed`: a busy worker makes one of each per
    delivery, and fewer tracked objects mean fewer collections.

    ``version`` is the stored format's: an entry written before it existed reads as 1,
    and a version-1 entry is packed without it (as older workers read it). A worker
    makes an entry of a newer format a dead letter rather than misread it.
    """

    id: str
    name: str
    data: bytes
    headers: dict[str, str]
    created: float
    due: float
    version: int = 1


class Claimed(msgspec.Struct, gc=False):
    """One delivery a broker handed out under a lease."""

    listener: str
    attempt: int
    record: Stored
    #: The broker's own handle for the delivery (a row key, a stream entry id...).
    ref: Any = None
    #: Why the broker could not read the entry into ``record`` (then a placeholder with
    #: the id it knows): the engine makes the delivery a dead letter with this error.
    error: str | None = None
    #: Reclaimed after its lease expired: its last run was lost with its worker. The
    #: engine runs it alone in its process, so a listener that crashes its process
    #: takes no other delivery with it. Handed back (released), it stays lost.
    lost: bool = False


@dataclass(slots=True)
class Outcomes:
    """Delivery outcomes waiting to be written back, in one batch.

    ``uncounted`` are claims of deliveries this process held already (running, or
    their outcome not yet written) when the store handed them out to it again: the
    attempt that claim counted is taken back; the delivery is otherwise left as it is.
    """

    acks: list[Claimed] = field(default_factory=list)
    retries: list[tuple[Claimed, float, str]] = field(default_factory=list)
    burials: list[tuple[Claimed, str, str]] = field(default_factory=list)
    releases: list[Claimed] = field(default_factory=list)
    uncounted: list[Claimed] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.acks or self.retries or self.burials or self.releases or self.uncounted)


def event_of(
    record: Stored, args: tuple[Any, ...], kwargs: dict[str, Any], obj: Any, attempt: int
) -> Event:
    """The event of ``record`` (its payload decoded), for delivery attempt ``attempt``."""
    return Event(
        record.name,
        args,
        kwargs,
        timestamp=record.created,
        headers=record.headers,
        _id=record.id,
        attempt=attempt,
        obj=obj,
    )


def dead_letter(
    record: Stored, listener: str, attempts: int, error: str, traceback: str, failed_at: float
) -> DeadLetter:
    """The dead letter of ``record``'s delivery to ``listener``, as a broker kept it (with
    an empty payload when it cannot be decoded: its error says why)."""
    try:
        payload = decode_payload(record.data)
    except Exception:
        payload = ((), {}, None)
    event = event_of(record, *payload, attempts)
    return DeadLetter(
        event=event,
        listener=listener,
        error=error,
        traceback=traceback,
        attempts=attempts,
        failed_at=failed_at,
    )


_headers_dec = msgspec.json.Decoder(dict[str, str])


def stored_row(
    id_: Any,
    name: Any,
    data: Any,
    headers: Any,
    created: Any,
    due: Any,
    version: Any = 1,
) -> Stored:
    """A stored event read back from an SQL row, whose headers are JSON text (or NULL).

    Raises:
        PayloadError: the row does not hold a stored event (written by something else).
    """
    if not (isinstance(id_, str) and isinstance(name, str) and isinstance(data, bytes)):
        raise PayloadError(
            f"the stored row of event {id_!r} is not an event: id {type(id_).__name__}, "
            f"name {type(name).__name__}, data {type(data).__name__}"
        )
    if headers is not None and not isinstance(headers, str | bytes):
        raise PayloadError(f"the headers of stored event {id_!r} are not JSON text")
    try:
        read = _headers_dec.decode(headers) if headers else {}
        return Stored(id_, name, data, read, float(created), float(due), int(version))
    except (msgspec.DecodeError, TypeError, ValueError) as exc:
        raise PayloadError(f"stored event {id_!r} cannot be read: {exc}") from exc


def unreadable(listener: str, attempt: int, id_: Any, ref: Any, exc: BaseException) -> Claimed:
    """The claim of an entry the broker could not read: a placeholder record with the id
    it knows, and ``exc`` as the error the engine buries the delivery with."""
    error = error_text(exc)
    return Claimed(listener, attempt, Stored(str(id_), "", b"", {}, 0.0, 0.0), ref, error=error)


def dead_letter_row(row: Sequence[Any]) -> DeadLetter:
    """A dead letter read back from an SQL row of ``listener, attempt, error, traceback,
    failed_at`` (of the delivery) and ``id, name, data, headers, created`` (of its event)."""
    listener, attempt, error, tb, failed_at, id_, name, data, headers, created = row
    try:
        record = stored_row(id_, name, data, headers, created, created)
    except PayloadError:
        record = Stored(str(id_), str(name), b"", {}, 0.0, 0.0)
    return dead_letter(record, listener, attempt, error or "", tb or "", failed_at or 0.0)


class Store(Protocol):
    """What a durable broker implements; the engine
    (:class:`~tidings.backends.durable.engine.DurableBackend`) calls nothing else.

    A broker's backend subclasses the engine and implements these methods; each is
    documented on the engine, which declares them abstract.
    """

    scheme: str

    async def connect(self) -> None: ...
    async def disconnect(self) -> None: ...
    async def store(self, records: Sequence[Stored]) -> None: ...
    async def join(self, listener: str, names: Sequence[str]) -> None: ...
    async def claim(
        self, listener: str, names: Sequence[str], limit: int, lease_s: float
    ) -> list[Claimed]: ...
    async def settle(self, outcomes: Outcomes) -> None: ...
    async def renew(self, claimed: Sequence[Claimed], lease_s: float) -> list[Claimed] | None: ...
    async def list_dead(self, listener: str | None, limit: int) -> list[DeadLetter]: ...
    async def replay_dead(self, ids: Sequence[str] | None, listener: str | None) -> int: ...
    async def purge_dead(self, ids: Sequence[str] | None, listener: str | None) -> int: ...
    async def listener_stats(self) -> dict[str, ListenerStats]: ...
    async def forget(self, listener: str) -> bool: ...
    async def joined(self) -> dict[str, list[str]] | None: ...
    def refuses(self, exc: BaseException) -> bool: ...
    def translate(self, exc: BaseException, what: str) -> BackendError: ...
