"""The app the poison tests run in a subprocess: a listener that kills its process on
one event and writes every other delivery to a file, unbuffered. :func:`work` runs it
until nothing is due, then returns (unless the poison kills the process first)."""

from __future__ import annotations

import asyncio
import os

from tidings import Bus, listener

POISON = 3

_out = os.environ.get("TIDINGS_TEST_OUT")
_fd = os.open(_out, os.O_WRONLY | os.O_APPEND | os.O_CREAT) if _out else -1


@listener("job", retry=1)
async def job(n: int) -> None:
    if n == POISON:
        os._exit(3)  # as a segfault in a C extension would
    await asyncio.sleep(0.001)
    if _fd >= 0:
        os.write(_fd, f"{n}\n".encode())


def make_bus(consume: bool = True) -> Bus:
    """The bus on the store the test names, with short leases."""
    return Bus(os.environ["TIDINGS_TEST_URL"], listeners=[job], consume=consume)


async def work() -> None:
    """Deliver until nothing is due."""
    async with make_bus() as bus:
        await bus.drain()
