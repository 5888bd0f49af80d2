"""Durable backends: the storage protocol a broker implements
(:mod:`~tidings.backends.durable.store`) and the one engine that drives it
(:mod:`~tidings.backends.durable.engine`)."""

from tidings.backends.durable.engine import DurableBackend
from tidings.backends.durable.store import (
    STORED_VERSION,
    Claimed,
    ListenerStats,
    Outcomes,
    Store,
    Stored,
    dead_letter,
    dead_letter_row,
    event_of,
    stored_row,
    unreadable,
)

__all__ = [
    "STORED_VERSION",
    "Claimed",
    "DurableBackend",
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
