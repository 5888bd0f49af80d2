"""Every exception tidings raises.

The tree::

    TidingsError
     ├── ConfigurationError        a bus, registry or listener set up wrongly
     ├── NotStartedError           emit/publish before start or after close (RuntimeError)
     ├── NoListenersError          nothing listens to a name on a strict bus (LookupError)
     ├── EmitError                 an emit's event name or options cannot be used (ValueError)
     ├── QueueFull                 the bounded in-process queue has no room
     ├── PayloadError              a payload that cannot be serialized or validated (ValueError)
     ├── ListenerError             a listener failed or could not be called
     │    ├── BindingError         the event cannot satisfy the listener's signature (TypeError)
     │    ├── DeliveryLost         a durable delivery's worker kept stopping while running it
     │    └── ForwardError         a forwarder's destination refused an event or was unreachable
     └── BackendError              a backend failed to store or hand out deliveries
          ├── ConnectionLost
          └── PublishFailed

A driver's own exception never leaks out: backends re-raise it as a ``BackendError``
with the original as ``__cause__``.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BindingError",
    "ConfigurationError",
    "ConnectionLost",
    "DeliveryLost",
    "EmitError",
    "ForwardError",
    "ListenerError",
    "NoListenersError",
    "NotStartedError",
    "PayloadError",
    "PublishFailed",
    "QueueFull",
    "TidingsError",
]


class TidingsError(Exception):
    """Root of every exception raised by tidings."""


class ConfigurationError(TidingsError):
    """A bus, registry or listener is set up in a way that cannot work."""


class NotStartedError(TidingsError, RuntimeError):
    """The bus is not running: it was never started, or it is closed."""


class NoListenersError(TidingsError, LookupError):
    """A strict bus was asked to emit an event that no listener subscribes to."""


class EmitError(TidingsError, ValueError):
    """An event name or emit option that cannot be used (an empty name, a wildcard, a
    delay that is not finite, a naive ``at=``...); nothing was queued."""


class QueueFull(TidingsError):
    """The in-process queue holds ``max_pending`` deliveries already.

    ``emit`` raises it; ``await bus.publish(...)`` waits for room instead.
    """


class PayloadError(TidingsError, ValueError):
    """A payload cannot be serialized or does not validate; nothing was queued."""


class ListenerError(TidingsError):
    """A listener failed, or could not be called with an event."""


class BindingError(ListenerError, TypeError):
    """An event cannot satisfy a listener's signature (a required parameter is missing)."""


class DeliveryLost(ListenerError):
    """A durable delivery was started again and again and never came to an end: its
    worker stopped (or lost the lease) while running it, each time. It is made a dead
    letter instead of being run once more (a listener that crashes its process would
    otherwise crash every worker that takes it)."""


class ForwardError(ListenerError):
    """A forwarder (:mod:`tidings.forward`) could not hand an event to its destination:
    a webhook answered with a status other than 2xx, SQS refused the message, or the
    destination could not be reached. The delivery is retried by the listener's policy,
    then kept as a dead letter."""


class BackendError(TidingsError):
    """A backend could not store, hand out or acknowledge deliveries."""


class ConnectionLost(BackendError):
    """The connection to the broker or database was lost."""


class PublishFailed(BackendError):
    """The backend did not accept an event."""
