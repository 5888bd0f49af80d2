"""Durable delivery end to end, on SQLite, Redis and PostgreSQL, beside the peers on
each store (and the raw floor of SQLite and of Redis), in one run.

    uv run --group bench python bench/durable.py [--n 20000] [--listeners 1 4]
        [--store sqlite redis postgres]

Each figure runs two processes on one store: a producer that stores N events and a
worker that runs them. Deliveries/s go from the producer's first event to the worker's
last delivery (N x listeners deliveries).

SQLite's floor does the least any SQLite queue must do with aiosqlite: the producer
inserts in batches of 500 (one row per delivery), the worker claims 500 at a time with
UPDATE ... RETURNING and deletes them once run.

Redis's floor (redis-py) is one stream with a consumer group per listener: the producer
XADDs in pipelines of 100, the worker reads each group with XREADGROUP COUNT 100 and
acknowledges the batch with XACK in the same pipeline as its next read. taskiq-redis
(RedisStreamBroker) and FastStream (a stream subscriber per listener, each with its own
group) run the same job the way their documentation shows: one task or subscriber per
listener, one publish per event and listener (taskiq) or per event (FastStream).
PostgreSQL: tidings beside procrastinate (a task per listener, deferred once per event
and listener with defer_async, a worker with concurrency 100).
Redis is $TIDINGS_BENCH_REDIS, by default redis://127.0.0.1:6379/0, PostgreSQL
$TIDINGS_BENCH_POSTGRES, by default postgresql://postgres@127.0.0.1:5432/test; every run
uses keys or a schema of its own and deletes them.
"""

# The processes signal each other through tiny files: blocking writes are fine here.
# ruff: noqa: ASYNC110, ASYNC240

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

BATCH = 500
# A run that has not made every delivery by then is left out (and said so).
WAIT_S = 180
REDIS = os.environ.get("TIDINGS_BENCH_REDIS", "redis://127.0.0.1:6379/0")
POSTGRES = os.environ.get("TIDINGS_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


# -- tidings -----------------------------------------------------------------------------


def _url(target: str) -> str:
    """The tidings URL of a run's store: a SQLite file, a PostgreSQL schema (``pgbench_...``)
    or a Redis key prefix."""
    if target.endswith(".db"):
        return f"sqlite:///{target}?poll_interval=0.005"
    if target.startswith("pgbench_"):
        return f"{POSTGRES}?schema={target}&poll_interval=0.005"
    return f"{REDIS}?prefix={target}&poll_interval=0.005"


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
        _url(path),
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


# -- Redis: the raw floor ------------------------------------------------------------


async def redis_floor_setup(prefix: str, listeners: int) -> None:
    from redis.asyncio import Redis

    async with Redis.from_url(REDIS) as r:
        for k in range(listeners):
            await r.xgroup_create(f"{prefix}:floor", f"g{k}", id="0", mkstream=True)


async def redis_floor_producer(prefix: str, n: int, listeners: int, out: str) -> None:
    import msgspec
    from redis.asyncio import Redis

    encode = msgspec.json.encode
    async with Redis.from_url(REDIS) as r:
        start = time.time()
        for first in range(0, n, 100):
            pipe = r.pipeline(transaction=False)
            for i in range(first, min(first + 100, n)):
                pipe.xadd(f"{prefix}:floor", {"d": encode({"n": i})})
            await pipe.execute()
    Path(out).write_text(repr(start))


async def redis_floor_worker(prefix: str, n: int, listeners: int, out: str) -> None:
    import msgspec
    from redis.asyncio import Redis

    decode = msgspec.json.decode
    key = f"{prefix}:floor"
    done = 0
    total = n * listeners

    async def run(n: int) -> None:
        nonlocal done
        done += 1

    Path(out + ".ready").touch()
    to_ack: list[list[bytes]] = [[] for _ in range(listeners)]
    async with Redis.from_url(REDIS) as r:
        while done < total:
            got = 0
            for k in range(listeners):
                pipe = r.pipeline(transaction=False)
                if to_ack[k]:
                    pipe.xack(key, f"g{k}", *to_ack[k])
                pipe.xreadgroup(f"g{k}", "c", {key: ">"}, count=100)
                reply = (await pipe.execute())[-1]
                to_ack[k] = []
                for _, entries in reply or ():
                    for entry_id, fields in entries:
                        await run(**decode(fields[b"d"]))
                        to_ack[k].append(entry_id)
                        got += 1
            if not got:
                await asyncio.sleep(0.005)
        for k in range(listeners):
            if to_ack[k]:
                await r.xack(key, f"g{k}", *to_ack[k])
    Path(out).write_text(repr(time.time()))


# -- Redis: taskiq-redis -------------------------------------------------------------------


def _taskiq(prefix: str, listeners: int, done_at: int, out: str) -> tuple[Any, list[Any]]:
    from taskiq_redis import RedisStreamBroker

    broker = RedisStreamBroker(
        REDIS, queue_name=f"{prefix}:taskiq", consumer_group_name=f"{prefix}-g", consumer_id="0"
    )
    count = 0
    tasks = []
    for k in range(listeners):

        async def deliver(n: int) -> None:
            nonlocal count
            count += 1
            if count == done_at:
                Path(out).write_text(repr(time.time()))

        tasks.append(broker.task(task_name=f"bench_listener_{k}")(deliver))
    return broker, tasks


async def taskiq_setup(prefix: str, listeners: int) -> None:
    pass


async def taskiq_worker(prefix: str, n: int, listeners: int, out: str) -> None:
    import logging

    from taskiq.api import run_receiver_task

    logging.getLogger("taskiq").setLevel(logging.ERROR)  # its line on being stopped

    broker, _ = _taskiq(prefix, listeners, n * listeners, out)
    await broker.startup()  # makes the group before the producer starts
    receiver = asyncio.create_task(run_receiver_task(broker, max_async_tasks=500))
    Path(out + ".ready").touch()
    while not Path(out).exists():
        await asyncio.sleep(0.01)
    receiver.cancel()
    await asyncio.gather(receiver, return_exceptions=True)
    await broker.shutdown()


async def taskiq_producer(prefix: str, n: int, listeners: int, out: str) -> None:
    broker, tasks = _taskiq(prefix, listeners, -1, "")
    await broker.startup()
    start = time.time()
    for i in range(n):
        for task in tasks:
            await task.kiq(n=i)
    await broker.shutdown()
    Path(out).write_text(repr(start))


# -- Redis: FastStream ---------------------------------------------------------------------


def _faststream(prefix: str, listeners: int, done_at: int, out: str) -> Any:
    from faststream.redis import RedisBroker, StreamSub

    broker = RedisBroker(REDIS, logger=None)  # its per-message log lines, off
    count = 0
    for k in range(listeners):

        async def deliver(body: dict[str, int]) -> None:
            nonlocal count
            count += 1
            if count == done_at:
                Path(out).write_text(repr(time.time()))

        sub = StreamSub(f"{prefix}:fs", group=f"g{k}", consumer="c", last_id="0")
        broker.subscriber(stream=sub)(deliver)
    return broker


async def faststream_setup(prefix: str, listeners: int) -> None:
    pass


async def faststream_worker(prefix: str, n: int, listeners: int, out: str) -> None:
    broker = _faststream(prefix, listeners, n * listeners, out)
    await broker.start()
    Path(out + ".ready").touch()
    while not Path(out).exists():
        await asyncio.sleep(0.01)
    await broker.stop()


async def faststream_producer(prefix: str, n: int, listeners: int, out: str) -> None:
    from faststream.redis import RedisBroker

    async with RedisBroker(REDIS, logger=None) as broker:
        start = time.time()
        for i in range(n):
            await broker.publish({"n": i}, stream=f"{prefix}:fs")
    Path(out).write_text(repr(start))


# -- PostgreSQL: procrastinate --------------------------------------------------------------


def _procrastinate(schema: str, listeners: int, done_at: int, out: str) -> tuple[Any, list[Any]]:
    import logging

    import procrastinate

    # Its warning that the app lives in __main__ (a benchmark's roles do).
    logging.getLogger("procrastinate").setLevel(logging.ERROR)

    connector = procrastinate.PsycopgConnector(
        conninfo=POSTGRES, kwargs={"options": f"-c search_path={schema}"}
    )
    app = procrastinate.App(connector=connector)
    count = 0
    tasks = []
    for k in range(listeners):

        async def deliver(n: int) -> None:
            nonlocal count
            count += 1
            if count == done_at:
                Path(out).write_text(repr(time.time()))

        deliver.__name__ = f"bench_listener_{k}"
        tasks.append(app.task(name=f"bench_listener_{k}")(deliver))
    return app, tasks


async def procrastinate_setup(schema: str, listeners: int) -> None:
    import asyncpg

    conn = await asyncpg.connect(POSTGRES)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
    finally:
        await conn.close()
    app, _ = _procrastinate(schema, listeners, -1, "")
    async with app.open_async():
        await app.schema_manager.apply_schema_async()


async def procrastinate_worker(schema: str, n: int, listeners: int, out: str) -> None:
    app, _ = _procrastinate(schema, listeners, n * listeners, out)
    async with app.open_async():
        worker = asyncio.create_task(app.run_worker_async(concurrency=100))
        Path(out + ".ready").touch()
        while not Path(out).exists():
            await asyncio.sleep(0.01)
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)


async def procrastinate_producer(schema: str, n: int, listeners: int, out: str) -> None:
    app, tasks = _procrastinate(schema, listeners, -1, "")
    async with app.open_async():
        start = time.time()
        for i in range(n):
            for task in tasks:
                await task.defer_async(n=i)
    Path(out).write_text(repr(start))


ROLES: dict[str, Callable[..., Awaitable[None]]] = {
    "tidings-setup": tidings_setup,
    "tidings-producer": tidings_producer,
    "tidings-worker": tidings_worker,
    "floor-setup": floor_setup,
    "floor-producer": floor_producer,
    "floor-worker": floor_worker,
    "redis_floor-setup": redis_floor_setup,
    "redis_floor-producer": redis_floor_producer,
    "redis_floor-worker": redis_floor_worker,
    "taskiq-setup": taskiq_setup,
    "taskiq-producer": taskiq_producer,
    "taskiq-worker": taskiq_worker,
    "faststream-setup": faststream_setup,
    "faststream-producer": faststream_producer,
    "faststream-worker": faststream_worker,
    "procrastinate-setup": procrastinate_setup,
    "procrastinate-producer": procrastinate_producer,
    "procrastinate-worker": procrastinate_worker,
}

KINDS = {
    "sqlite": (("tidings", "tidings"), ("floor", "raw aiosqlite floor")),
    "postgres": (("tidings", "tidings"), ("procrastinate", "procrastinate")),
    "redis": (
        ("tidings", "tidings"),
        ("redis_floor", "raw redis-py floor"),
        ("taskiq", "taskiq-redis"),
        ("faststream", "FastStream"),
    ),
}


def _drop_redis(prefix: str) -> None:
    import redis

    r = redis.Redis.from_url(REDIS)
    keys = list(r.scan_iter(match=f"{prefix}:*", count=1000))
    keys += list(r.scan_iter(match=f"{prefix}-*", count=1000))
    for first in range(0, len(keys), 1000):
        r.delete(*keys[first : first + 1000])
    r.close()


def _drop_schema(schema: str) -> None:
    import asyncpg

    async def drop() -> None:
        conn = await asyncpg.connect(POSTGRES)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await conn.close()

    asyncio.run(drop())


def measure(store: str, kind: str, n: int, listeners: int) -> float:
    with tempfile.TemporaryDirectory(prefix="tidings-bench-") as tmp:
        if store == "sqlite":
            target = str(Path(tmp) / "bench.db")
        elif store == "postgres":
            target = f"pgbench_{uuid.uuid4().hex[:12]}"
        else:
            target = f"bench-{uuid.uuid4().hex}"
        started, finished = str(Path(tmp) / "start"), str(Path(tmp) / "end")
        me = [sys.executable, __file__, "--role"]
        try:
            subprocess.run([*me, f"{kind}-setup", target, "0", str(listeners), ""], check=True)
            worker = subprocess.Popen(
                [*me, f"{kind}-worker", target, str(n), str(listeners), finished]
            )
            while not Path(finished + ".ready").exists():
                if worker.poll() is not None:
                    raise RuntimeError(f"the {kind} worker exited before it was ready")
                time.sleep(0.01)
            subprocess.run(
                [*me, f"{kind}-producer", target, str(n), str(listeners), started], check=True
            )
            try:
                worker.wait(WAIT_S)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
                print(
                    f"    ({kind}, {listeners} listener(s): not every delivery was made within "
                    f"{WAIT_S} s; this run is left out)",
                    flush=True,
                )
                return 0.0
            start = float(Path(started).read_text())
            end = float(Path(finished).read_text())
        finally:
            if store == "redis":
                _drop_redis(target)
            elif store == "postgres":
                _drop_schema(target)
    return n * listeners / (end - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000, help="events per run")
    parser.add_argument(
        "--listeners", type=int, nargs="*", default=[1, 4], help="listener counts to run"
    )
    parser.add_argument(
        "--store",
        nargs="*",
        default=["sqlite", "redis", "postgres"],
        choices=list(KINDS),
        help="stores to run on",
    )
    parser.add_argument("--repeat", type=int, default=2, help="runs per figure; best counts")
    parser.add_argument("--role", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        role, path, n, listeners, out = args.role
        asyncio.run(
            ROLES[role](path, *([int(n), int(listeners), out] if n != "0" else [int(listeners)]))
        )
        return

    print(
        f"{args.n} events per run, a producer process and a worker process "
        "(tidings: run_worker(concurrency=500), as tidings worker --concurrency 500); "
        f"best of {args.repeat}"
    )
    for store in args.store:
        print(f"\n{_describe(store)}")
        for listeners in args.listeners:
            rates = {
                kind: max(measure(store, kind, args.n, listeners) for _ in range(args.repeat))
                for kind, _ in KINDS[store]
            }
            print(f"  {listeners} listener(s), deliveries/s:")
            ours = rates["tidings"]
            for kind, label in KINDS[store]:
                if not rates[kind]:
                    print(f"    {label:<22} did not finish")
                    continue
                ratio = "" if kind == "tidings" else f"  tidings = {ours / rates[kind]:6.2f}x this"
                print(f"    {label:<22} {rates[kind]:>9,.0f}{ratio}")
            if store == "postgres" and all(rates.values()):
                peer = rates["procrastinate"]
                verdict = "PASS" if ours >= 10_000 else "MISS"
                print(f"    {verdict}  >= 10,000 deliveries/s (is {ours:,.0f})")
                verdict = "PASS" if ours >= 10 * peer else "MISS"
                print(f"    {verdict}  >= 10x procrastinate (is {ours / peer:.1f}x)")
            if store == "redis" and all(rates.values()):
                floor, taskiq = rates["redis_floor"], rates["taskiq"]
                verdict = "PASS" if ours >= 0.8 * floor else "MISS"
                print(f"    {verdict}  >= 0.8x the raw floor (is {ours / floor:.2f}x)")
                verdict = "PASS" if ours >= 15 * taskiq else "MISS"
                print(f"    {verdict}  >= 15x taskiq-redis (is {ours / taskiq:.1f}x)")


def _describe(store: str) -> str:
    from importlib.metadata import version as dist

    if store == "sqlite":
        import sqlite3

        return f"SQLite {sqlite3.sqlite_version}"
    if store == "postgres":
        import asyncpg

        async def server_version() -> str:
            conn = await asyncpg.connect(POSTGRES)
            try:
                return str(await conn.fetchval("SHOW server_version"))
            finally:
                await conn.close()

        return (
            f"PostgreSQL {asyncio.run(server_version())} at {POSTGRES}; asyncpg "
            f"{dist('asyncpg')}, procrastinate {dist('procrastinate')} (psycopg {dist('psycopg')})"
        )
    import redis

    r = redis.Redis.from_url(REDIS)
    try:
        version = r.info("server")["redis_version"]
    finally:
        r.close()
    return (
        f"Redis {version} at {REDIS}; redis-py {dist('redis')}, "
        f"taskiq-redis {dist('taskiq-redis')}, FastStream {dist('faststream')}"
    )


if __name__ == "__main__":
    # bench/http.py would hide the standard library's http package from the peers'
    # imports: look for modules elsewhere than beside this file.
    from pathlib import Path as _Path

    _here = str(_Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p and str(_Path(p).resolve()) != _here]
    main()
