"""The app the worker tests run in a subprocess: two listeners that write each delivery
(event number and listener) to a file, unbuffered, so a SIGKILL loses no line."""

from __future__ import annotations

import asyncio
import os

from tidings import Bus, listener

_out = os.environ.get("TIDINGS_TEST_OUT")
_fd = os.open(_out, os.O_WRONLY | os.O_APPEND | os.O_CREAT) if _out else -1


def _record(tag: str, n: int) -> None:
    if _fd >= 0:
        os.write(_fd, f"{tag} {n}\n".encode())


@listener("job")
async def first(n: int) -> None:
    await asyncio.sleep(0.0002)
    _record("first", n)


@listener("job")
async def second(n: int) -> None:
    await asyncio.sleep(0.0002)
    _record("second", n)


bus = Bus(
    os.environ.get("TIDINGS_TEST_URL", "sqlite:///crash.db"),
    listeners=[first, second],
    consume=False,
)
