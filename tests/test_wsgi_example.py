"""examples/wsgi_app.py served for real: a threaded WSGI server, requests on threads of
their own, the bus entered once with ``with``."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from wsgiref.simple_server import make_server

import pytest

from examples import wsgi_app


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_the_wsgi_example_emits_from_its_views(store: str, tmp_path: Path) -> None:
    wsgi_app.sent.clear()
    url = None if store == "memory" else f"sqlite:///{tmp_path / 'events.db'}?poll_interval=0.01"
    emails = [f"user{n}@example.com" for n in range(20)]
    with wsgi_app.create_bus(url) as bus:
        server = make_server(
            "127.0.0.1", 0, wsgi_app.create_app(bus), server_class=wsgi_app._ThreadingServer
        )
        serving = threading.Thread(target=server.serve_forever)
        serving.start()
        base = f"http://127.0.0.1:{server.server_address[1]}"
        try:

            def sign_up(email: str) -> str:
                req = urllib.request.Request(f"{base}/users?email={email}", method="POST")
                with urllib.request.urlopen(req, timeout=30) as response:
                    body: bytes = response.read()
                return body.decode()

            with ThreadPoolExecutor(4) as clients:
                bodies = list(clients.map(sign_up, emails))
            with pytest.raises(urllib.error.HTTPError, match="422"):
                sign_up("")
        finally:
            server.shutdown()
            serving.join()
            server.server_close()
        assert bodies == [f"created {email}\n" for email in emails]
    # Leaving the block drained the bus, the process listener's deliveries included.
    assert sorted(wsgi_app.sent) == sorted(emails)
    counts = bus.stats()["listeners"]
    assert counts[wsgi_app.fingerprint.qualname] == {"delivered": 20, "failed": 0}
    assert counts[wsgi_app.send_welcome.qualname] == {"delivered": 20, "failed": 0}
