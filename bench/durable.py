"""Durable delivery on SQLite, end to end, beside the raw aiosqlite floor, in one run.

    uv run python bench/durable.py [--n 20000] [--listeners 1 4]

Each figure runs two processes on one database file: a producer that stores N events
and a worker that runs them. Deliveries/s go from the producer's first event to the
worker's last delivery. The floor does the least any SQLite queue must do with
aiosqlite: the producer inserts in batches of 500 (one row per delivery), the worker
claims 500 at a time with UPDATE ... RETURNING and deletes them once run.
"""

# The processes signal each other through tiny files: blocking writes are fine here.
# ruff: noqa: ASYNC110, ASYNC240

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH = 500


# -- tidings -----------------------------------------------------------------------------


def _tidings_bus(path: str, listeners: int, done_at: int, out: str) -> object:
    from tidings import Bus, listener

    count = 0

    def make(i: int) -> object:
        async def deliver(n: int) -> None:
            nonlocal count
            count += 1
            if count == done_at:
                Path(out).write_text(repr(time.time()))

        deliver.__qualname__ = f"bench_listener_{i}"
        return listener("bench")(deliver)

    return Bus(
        f"sqlite:///{path}?poll_s=0.005",
        listeners=[make(i) for i in range(listeners)],  # type: ignore[misc]
        consume=False,
    )


async def tidings_worker(path: str, n: int, listeners: int, out: str) -> None:
    from tidings.worker import run_worker

    bus = _tidings_bus(path, listeners, n * listeners, out)
    stop = asyncio.Event()

    async def watch() -> None:
        while not Path(out).exists():
            await asyncio.sleep(0.01)
        stop.set()

    watcher = asyncio.create_task(watch())
    Path(out + ".ready").touch()
    await run_worker(bus, stop=stop, concurrency=500)  # type: ignore[arg-type]
    await watcher


async def tidings_producer(path: str, n: int, listeners: int, out: str) -> None:
    bus = _tidings_bus(path, listeners, -1, "")
    async with bus:  # type: ignore[attr-defined]
        start = time.time()
        for i in range(n):
            bus.emit("bench", n=i)  # type: ignore[attr-defined]
            if i % 1000 == 999:
                await asyncio.sleep(0)
    Path(out).write_text(repr(start))


async def tidings_setup(path: str, listeners: int) -> None:
    # Join the listeners first, as a deployed app would have.
    async with _tidings_bus(path, listeners, -1, ""):  # type: ignore[attr-defined]
        pass


# -- the raw floor -----------------------------------------------------------------------


async def floor_setup(path: str, listeners: int) -> None:
    import aiosqlite

    async with aiosqlite.connect(path, isolation_level=None) as db:
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute(
            "CREATE TABLE IF NOT EXISTS q (id INTEGER PRIMARY KEY, listener INTEGER, "
            "data BLOB, lease REAL NOT NULL DEFAULT 0)"
        )
        await db.execute("CREATE INDEX IF NOT EXISTS q_l ON q (listener, lease)")


async def floor_producer(path: str, n: int, listeners: int, out: str) -> None:
    import aiosqlite
    import msgspec

    encode = msgspec.json.encode
    async with aiosqlite.connect(path, isolation_level=None) as db:
        await db.execute("PRAGMA synchronous=NORMAL")
        start = time.time()
        rows: list[tuple[int, bytes]] = []
        for i in range(n):
            data = encode({"n": i})
            rows.extend((k, data) for k in range(listeners))
            if len(rows) >= BATCH or i == n - 1:
                await db.execute("BEGIN IMMEDIATE")
                await db.executemany("INSERT INTO q (listener, data) VALUES (?, ?)", rows)
                await db.execute("COMMIT")
                rows = []
    Path(out).write_text(repr(start))


async def floor_worker(path: str, n: int, listeners: int, out: str) -> None:
    import aiosqlite
    import msgspec

    decode = msgspec.json.decode
    done = 0
    total = n * listeners

    async def run(n: int) -> None:
        nonlocal done
        done += 1

    Path(out + ".ready").touch()
    async with aiosqlite.connect(path, isolation_level=None, timeout=30) as db:
        await db.execute("PRAGMA synchronous=NORMAL")
        while done < total:
            for k in range(listeners):
                await db.execute("BEGIN IMMEDIATE")
                cursor = await db.execute(
                    "UPDATE q SET lease = ? WHERE id IN (SELECT id FROM q WHERE listener = ? "
                    "AND lease < ? ORDER BY id LIMIT ?) RETURNING id, data",
                    (time.time() + 30, k, time.time(), BATCH),
                )
                claimed = await cursor.fetchall()
                await db.execute("COMMIT")
                for _, data in claimed:
                    await run(**decode(data))
                if claimed:
                    await db.execute("BEGIN IMMEDIATE")
                    await db.executemany("DELETE FROM q WHERE id = ?", [(i,) for i, _ in claimed])
                    await db.execute("COMMIT")
            if not claimed:
                await asyncio.sleep(0.005)
    Path(out).write_text(repr(time.time()))


ROLES = {
    "tidings-setup": tidings_setup,
    "tidings-producer": tidings_producer,
    "tidings-worker": tidings_worker,
    "floor-setup": floor_setup,
    "floor-producer": floor_producer,
    "floor-worker": floor_worker,
}


def measure(kind: str, n: int, listeners: int) -> float:
    with tempfile.TemporaryDirectory(prefix="tidings-bench-") as tmp:
        db = str(Path(tmp) / "bench.db")
        started, finished = str(Path(tmp) / "start"), str(Path(tmp) / "end")
        me = [sys.executable, __file__, "--role"]
        subprocess.run([*me, f"{kind}-setup", db, "0", str(listeners), ""], check=True)
        worker = subprocess.Popen([*me, f"{kind}-worker", db, str(n), str(listeners), finished])
        while not Path(finished + ".ready").exists():
            time.sleep(0.01)
        subprocess.run([*me, f"{kind}-producer", db, str(n), str(listeners), started], check=True)
        worker.wait(300)
        start = float(Path(started).read_text())
        end = float(Path(finished).read_text())
    return n * listeners / (end - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="events per run")
    parser.add_argument("--listeners", type=int, nargs="*", default=[1, 4])
    parser.add_argument("--repeat", type=int, default=2, help="runs per figure; best counts")
    parser.add_argument("--role", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        role, path, n, listeners, out = args.role
        asyncio.run(
            ROLES[role](path, *([int(n), int(listeners), out] if n != "0" else [int(listeners)]))
        )
        return

    import sqlite3

    print(
        f"SQLite {sqlite3.sqlite_version}, {args.n} events, a producer process and a worker "
        "process (tidings: run_worker(concurrency=500), as tidings worker --concurrency 500)"
    )
    for listeners in args.listeners:
        rates = {
            kind: max(measure(kind, args.n, listeners) for _ in range(args.repeat))
            for kind in ("tidings", "floor")
        }
        print(
            f"  {listeners} listener(s): tidings {rates['tidings']:>9,.0f} deliveries/s, "
            f"raw aiosqlite floor {rates['floor']:>9,.0f}/s, "
            f"ratio {rates['tidings'] / rates['floor']:.2f}x"
        )


if __name__ == "__main__":
    main()
