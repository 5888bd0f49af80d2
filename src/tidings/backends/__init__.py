"""Where deliveries wait: the backend protocol and its implementations."""

from tidings.backends.base import Backend, DeadLetter, DeadLetters, backend_from_url
from tidings.delivery import Delivery

__all__ = ["Backend", "DeadLetter", "DeadLetters", "Delivery", "backend_from_url"]
