"""tidings from sync code: a WSGI app (what Flask and Django run) served by threads, with
a CPU-bound listener in worker processes.

uv run python examples/wsgi_app.py
curl -X POST 'localhost:8000/users?email=ada@example.com'
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIServer, make_server

from tidings import Bus, listener

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

sent: list[str] = []
_lock = threading.Lock()


@listener("user.created")
def send_welcome(email: str) -> None:  # a sync listener, in the bus's thread pool
    with _lock:
        sent.append(email)


@listener("user.created", executor="process")
def fingerprint(email: str) -> None:  # CPU-bound: in a worker process, off the GIL
    digest = email.encode()
    for _ in range(100_000):
        digest = hashlib.sha256(digest).digest()
    print(f"fingerprint of {email}: {digest.hex()[:16]} (process {os.getpid()})")


def create_bus(url: str | None = None) -> Bus:
    """The app's bus: in process by default, or on ``TIDINGS_URL`` (a SQLite file...)."""
    return Bus(url or os.environ.get("TIDINGS_URL"), listeners=[send_welcome, fingerprint])


def create_app(bus: Bus) -> WSGIApp:
    """A WSGI app whose sign-up view emits ``user.created``."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ["REQUEST_METHOD"] == "POST" and environ["PATH_INFO"] == "/users":
            email = parse_qs(environ.get("QUERY_STRING", "")).get("email", [""])[0]
            if not email:
                start_response("422 Unprocessable Entity", [("Content-Type", "text/plain")])
                return [b"email is required\n"]
            # ... insert the user ...
            bus.emit("user.created", email=email)  # returns at once, from this thread
            start_response("201 Created", [("Content-Type", "text/plain")])
            return [f"created {email}\n".encode()]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]

    return app


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def main() -> None:
    # Entered once for the life of the process: the bus runs on a loop of its own in
    # a background thread, and leaving the block drains it.
    with create_bus() as bus:
        server = make_server("127.0.0.1", 8000, create_app(bus), server_class=_ThreadingServer)
        print("serving on http://127.0.0.1:8000 (Ctrl-C to stop)")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()


if __name__ == "__main__":  # worker processes import this module: nothing runs then
    main()
