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
from contextvars import Context

__all__ = ["ContextCopies"]

_copy_context = contextvars.copy_context

_MARKER: contextvars.ContextVar[object] = contextvars.ContextVar("tidings.context_copy")


class ContextCopies:
    """The copy events emitted on one thread (a bus's loop thread) share."""

    __slots__ = ("shared",)

    def __init__(self) -> None:
        #: The copy the latest events share.
        self.shared: Context | None = None

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
