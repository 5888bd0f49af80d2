"""The apps the fault scenarios run with ``tidings worker`` in subprocesses.

Each listener writes what it does to the file ``$TIDINGS_TEST_OUT`` with one unbuffered
``write`` per line, so a SIGKILL loses no line already written. The store is
``$TIDINGS_TEST_URL``.
"""

from __future__ import annotations

import asyncio
import os
import time

from tidings import Bus, Event, Retry, listener

URL = os.environ.get("TIDINGS_TEST_URL", "sqlite:///faults.db")
_out = os.environ.get("TIDINGS_TEST_OUT")
_fd = os.open(_out, os.O_WRONLY | os.O_APPEND | os.O_CREAT) if _out else -1

#: How long each delivery of the SIGKILL scenario takes.
JOB_S = float(os.environ.get("TIDINGS_TEST_JOB_S", "0.0002"))
#: The event number the poisoned listener dies on.
POISON = 7
#: How long a stale owner's first attempt and the next owner's attempt take.
FIRST_RUN_S = 3.0
NEXT_RUN_S = 6.0


def record(*fields: object) -> None:
    """Write one line (fields separated by spaces) to the output file."""
    if _fd >= 0:
        os.write(_fd, (" ".join(map(str, fields)) + "\n").encode())


# -- SIGKILL mid-stream: two listeners of one event ---------------------------------------


@listener("job")
async def first(n: int) -> None:
    await asyncio.sleep(JOB_S)
    record("first", n)


@listener("job")
async def second(n: int) -> None:
    await asyncio.sleep(JOB_S)
    record("second", n)


jobs = Bus(URL, listeners=[first, second], consume=False)


# -- a stale owner: a first attempt that outlives its lease, then fails ----------------------


@listener("slow", retry=Retry(attempts=5, backoff=0.05, jitter=0), concurrency=10)
async def slow(event: Event) -> None:
    n = event.kwargs["n"]
    record("start", n, event.attempt, os.getpid(), time.monotonic())
    await asyncio.sleep(FIRST_RUN_S if event.attempt == 1 else NEXT_RUN_S)
    record("end", n, event.attempt, os.getpid(), time.monotonic())
    if event.attempt == 1:
        raise RuntimeError("the first attempt fails (after its owner was frozen)")


stale = Bus(URL, listeners=[slow], consume=False)


# -- poison: a listener that kills its process on one event ----------------------------------


@listener("dose")
async def poisoned(n: int) -> None:
    if n == POISON:
        record("poison", n, os.getpid())
        os._exit(1)
    await asyncio.sleep(0.05)  # still running when the poison kills the process
    record("poisoned", n)


@listener("dose")
async def calm(n: int) -> None:
    await asyncio.sleep(0.05)
    record("calm", n)


poison = Bus(URL, listeners=[poisoned, calm], consume=False)
