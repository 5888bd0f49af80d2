"""Where deliveries wait: the backend protocol and its implementations."""

from tidings.backends._urls import backend_from_url
from tidings.backends.base import Backend, DeadLetter, DeadLetters
from tidings.delivery import Delivery

__all__ = ["Backend", "DeadLetter", "DeadLetters", "Delivery", "backend_from_url"]
