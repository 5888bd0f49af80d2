"""The app a worker test runs in a subprocess: a sync listener that writes that it
started, unbuffered, then blocks its thread far longer than the test runs."""

from __future__ import annotations

import os
import time

from tidings import Bus, listener

_out = os.environ.get("TIDINGS_TEST_OUT")
_fd = os.open(_out, os.O_WRONLY | os.O_APPEND | os.O_CREAT) if _out else -1


@listener("stuck")
def stuck() -> None:
    if _fd >= 0:
        os.write(_fd, b"started\n")
    time.sleep(600)  # a thread Python cannot stop


bus = Bus(
    os.environ.get("TIDINGS_TEST_URL", "sqlite:///stuck.db"),
    listeners=[stuck],
    consume=False,
)
