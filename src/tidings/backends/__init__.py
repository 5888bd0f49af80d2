"""Where deliveries wait: the backend protocol and its implementations."""

from tidings.backends.base import Backend, DeadLetter, backend_from_url

__all__ = ["Backend", "DeadLetter", "backend_from_url"]
