"""tidings: events for async Python.

Emit from anywhere, listen with plain functions, and run the same listeners in process
or durably.
"""

from tidings.backends.base import Backend, DeadLetter
from tidings.bus import Bus
from tidings.delivery import Retry
from tidings.errors import (
    BackendError,
    BindingError,
    ConfigurationError,
    ConnectionLost,
    DeliveryLost,
    EmitError,
    ForwardError,
    ListenerError,
    NoListenersError,
    NotStartedError,
    PayloadError,
    PublishFailed,
    QueueFull,
    TidingsError,
)
from tidings.events import Event, register_event
from tidings.listeners import Listener, Registry, Subscription, listener
from tidings.options import EmitOptions
from tidings.scheduling import Schedule

__all__ = [
    "Backend",
    "BackendError",
    "BindingError",
    "Bus",
    "ConfigurationError",
    "ConnectionLost",
    "DeadLetter",
    "DeliveryLost",
    "EmitError",
    "EmitOptions",
    "Event",
    "ForwardError",
    "Listener",
    "ListenerError",
    "NoListenersError",
    "NotStartedError",
    "PayloadError",
    "PublishFailed",
    "QueueFull",
    "Registry",
    "Retry",
    "Schedule",
    "Subscription",
    "TidingsError",
    "listener",
    "register_event",
]
