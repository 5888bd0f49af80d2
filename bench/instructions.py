"""Instructions per in-process event, counted by callgrind: repeatable on a busy machine,
where deliveries/s are not. Compare two versions by these counts, not by the clock.

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python bench/instructions.py MODE N

``MODE`` is ``emit`` (emits only, nothing delivered), ``trivial`` (a listener that
returns at once) or ``await`` (one that awaits once). Run it with two values of ``N``
(say 2000 and 22000): the difference of the two totals ("Collected") over the
difference of ``N`` is the cost of one event, without the interpreter's start.
"""

from __future__ import annotations

import asyncio
import sys

from tidings import Bus, listener


async def main(mode: str, count: int) -> None:
    @listener("e")
    async def trivial(n: int) -> None:
        pass

    @listener("e")
    async def awaits(n: int) -> None:
        await asyncio.sleep(0)

    bus = Bus(
        listeners=[awaits if mode == "await" else trivial],
        max_pending=10**7,
        shutdown_timeout=0,
    )
    async with bus:
        emit = bus.emit
        if mode == "emit":
            for i in range(count):
                emit("e", n=i)
            return  # closing reports the undelivered: the same work in every version
        for i in range(count):
            emit("e", n=i)
            if i % 1000 == 999:
                await asyncio.sleep(0)
        await bus.drain()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
