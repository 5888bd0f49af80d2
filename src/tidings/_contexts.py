"""The emitter's context, copied once for the events emitted from it in a row.

Listeners run in a copy of their emitter's context. Events emitted one after the other
from the same context share one copy, and the in-process backend delivers a run of
events that share a copy in one go; it never mixes events of different copies.

Whether the context is still the same is asked by value (``Context ==``), which is
cheap when nothing changed. Value alone would take another request's context, whose
variables hold other objects that merely compare equal, for this one; so before a copy
is shared a marker object of its own is set in the emitter's context. Another context
equals the shared copy only if it carries the same marker, that is, if it descends from
the emitter's (a task the emitter started), with the same values.
"""

from __future__ import annotations

import contextvars
import threading
from contextvars import Context

__all__ = ["ContextCopies"]

_copy_context = contextvars.copy_context
_get_ident = threading.get_ident

_MARKER: contextvars.ContextVar[object] = contextvars.ContextVar("tidings.context_copy")


class ContextCopies:
    """The copies events emitted on a bus's loop thread, and on each other thread, share."""

    __slots__ = ("elsewhere", "shared")

    def __init__(self) -> None:
        #: The copy the latest events emitted on the loop's thread share.
        self.shared: Context | None = None
        #: The copy the latest events emitted on each other thread share, by thread id.
        self.elsewhere: dict[int, Context] = {}

    def copy(self) -> Context:
        """The current context: the shared copy if it is the same, else a new one."""
        shared = self.shared
        if shared is None or _copy_context() != shared:
            return self.renew()
        return shared

    def renew(self) -> Context:
        """Mark the current context and share a copy of it from now on."""
        _MARKER.set(object())
        self.shared = shared = _copy_context()
        return shared

    def copy_elsewhere(self) -> Context:
        """:meth:`copy` for a thread other than the loop's (each shares a copy of its own)."""
        ident = _get_ident()
        shared = self.elsewhere.get(ident)
        if shared is None or _copy_context() != shared:
            _MARKER.set(object())
            self.elsewhere[ident] = shared = _copy_context()
        return shared

    def release(self) -> None:
        """Share no copy any more: the next events make new ones. (Called on the loop's
        thread while others may add theirs: each dict operation is atomic.)"""
        self.shared = None
        if self.elsewhere:
            self.elsewhere.clear()
