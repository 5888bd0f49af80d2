"""The fault suite's SIGKILL scenario at full size: 100,000 events x 2 listeners, the
worker SIGKILLed three times mid-stream, on each durable store. Prints what was lost
(must be 0) and what ran twice (bounded by what was in flight at each kill).

    uv run python bench/faults.py [--events 100000] [--kills 3] [--store sqlite redis postgres]

The 10,000-example fuzzing run is ``uv run pytest tests/faults -m slow``.
Redis is $TIDINGS_TEST_REDIS, by default redis://127.0.0.1:6379/0, PostgreSQL
$TIDINGS_TEST_POSTGRES, by default postgresql://postgres@127.0.0.1:5432/test; every run
uses a file, keys or a schema of its own and deletes them.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.faults.stores import STORES  # noqa: E402
from tests.faults.workers import kill_run  # noqa: E402


async def _run(kind: str, events: int, kills: int, concurrency: int) -> bool:
    with tempfile.TemporaryDirectory(prefix="tidings-faults-") as tmp:
        store = STORES[kind](Path(tmp))
        await store.setup()
        try:
            figures = await kill_run(
                Path(tmp),
                store.url(lease=2, poll_interval=0.01),
                events=events,
                kills=kills,
                concurrency=concurrency,
                timeout_s=600,
            )
        finally:
            await store.teardown()
    # What may run twice per kill, per listener: the running deliveries, a claimed batch
    # (500) and a batch of outcomes on its way.
    bound = kills * 2 * (concurrency + 2 * 500)
    print(f"{kind:>8}: {figures} (bound {bound})", flush=True)
    return figures.lost == 0 and figures.duplicates <= bound


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000, help="events per store")
    parser.add_argument("--kills", type=int, default=3, help="SIGKILLs of the worker per store")
    parser.add_argument(
        "--concurrency", type=int, default=50, help="deliveries per listener at once in the worker"
    )
    parser.add_argument(
        "--store",
        nargs="+",
        default=sorted(STORES),
        choices=sorted(STORES),
        help="stores to run on",
    )
    args = parser.parse_args()
    ok = True
    for kind in args.store:
        ok = asyncio.run(_run(kind, args.events, args.kills, args.concurrency)) and ok
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
