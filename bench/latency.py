"""How long a durable event takes to arrive: a producer process publishes events at a
steady pace, a ``tidings worker`` process runs a listener that notes the time from the
``publish`` call to its own first line.

    uv run python bench/latency.py [--n 1000] [--rate 200]
        [--store memory sqlite-local sqlite redis postgres]

Printed per store: p50 / p99 / max latency, and the worker's CPU while idle (its user and
system time over a few seconds with nothing to do, as a share of one core), then the
targets as PASS / MISS. ``memory`` is the reference: the same listener in the publishing
process. ``sqlite-local`` ("sqlite (same process)") is a durable bus that both publishes
and consumes: its own events should wake its consumer at once, with no poll and no look
at the file. Producer and worker share the machine's clock (same host). Redis is
$TIDINGS_BENCH_REDIS (redis://127.0.0.1:6379/0), PostgreSQL $TIDINGS_BENCH_POSTGRES
(postgresql://postgres@127.0.0.1:5432/test); every run uses keys, a schema or a file of
its own and deletes them.
"""

# The processes signal each other through tiny files: blocking reads are fine here.
# ruff: noqa: ASYNC240

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REDIS = os.environ.get("TIDINGS_BENCH_REDIS", "redis://127.0.0.1:6379/0")
POSTGRES = os.environ.get("TIDINGS_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
IDLE_S = 5.0

# (p50 ms, p99 ms, idle CPU %) a store should keep to; None: no target.
TARGETS: dict[str, tuple[float | None, float | None, float | None]] = {
    "memory": (None, None, None),
    "sqlite-local": (1.0, None, None),
    "redis": (2.0, 10.0, None),
    "sqlite": (10.0, 25.0, 1.0),
    "postgres": (3.0, None, None),
}

LABELS = {"sqlite-local": "sqlite (same process)"}


def _bus(url: str | None, out: str | None, *, consume: bool = True) -> Any:
    """The bus both processes load: one listener that writes each latency to ``out``."""
    from tidings import Bus, listener

    lines: list[str] = []

    @listener("tick")
    async def tick(sent: float, last: bool = False) -> None:
        arrived = time.time()
        lines.append(f"{(arrived - sent) * 1000:.3f}\n")
        if last and out:
            Path(out).write_text("".join(lines))

    tick.qualname = "bench.latency.tick"
    return Bus(url, listeners=[tick], consume=consume) if url else Bus(listeners=[tick])


# What `tidings worker bench.latency:bus` loads (the worker's environment sets these).
bus = (
    _bus(os.environ["LATENCY_URL"], os.environ.get("LATENCY_OUT"))
    if "LATENCY_URL" in os.environ
    else None
)


def _percentiles(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return statistics.median(ordered), p99, ordered[-1]


async def _publish(pub: Any, n: int, rate: float) -> None:
    began = time.perf_counter()
    for i in range(n):
        wait = began + i / rate - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        await pub.publish("tick", sent=time.time(), last=i == n - 1)


async def _memory(n: int, rate: float, out: str) -> None:
    async with _bus(None, out) as pub:
        await _publish(pub, n, rate)
        await pub.drain()


async def _same_process(url: str, n: int, rate: float, out: str) -> None:
    async with _bus(url, out) as bus:
        # The first event opens what a first claim opens; its line is left out.
        await bus.publish("tick", sent=time.time())
        await bus.drain()
        await _publish(bus, n, rate)
        await bus.drain()


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _url(store: str, tmp: str) -> tuple[str, Any]:
    """A URL of the store's own, and how to delete what it made."""
    if store == "sqlite":
        return f"sqlite:///{tmp}/events.db", lambda: None
    if store == "redis":
        prefix = f"latency-{uuid.uuid4().hex[:8]}"

        def drop() -> None:
            import redis

            r = redis.Redis.from_url(REDIS)
            keys = list(r.scan_iter(match=f"{prefix}:*", count=1000))
            if keys:
                r.delete(*keys)
            r.close()

        return f"{REDIS}?prefix={prefix}", drop
    schema = f"latency_{uuid.uuid4().hex[:8]}"

    def drop_schema() -> None:
        async def run() -> None:
            import asyncpg

            conn = await asyncpg.connect(POSTGRES)
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            await conn.close()

        asyncio.run(run())

    sep = "&" if "?" in POSTGRES else "?"
    return f"{POSTGRES}{sep}schema={schema}", drop_schema


def measure(store: str, n: int, rate: float) -> tuple[list[float], float | None]:
    """Latencies (ms) of ``n`` events paced at ``rate``/s, and the idle worker's CPU %."""
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/latencies"
        if store == "memory":
            asyncio.run(_memory(n, rate, out))
            return [float(x) for x in Path(out).read_text().split()], None
        if store == "sqlite-local":
            asyncio.run(_same_process(f"sqlite:///{tmp}/events.db", n, rate, out))
            return [float(x) for x in Path(out).read_text().split()[1:]], None
        url, drop = _url(store, tmp)
        warm = f"{tmp}/warm"
        env = {
            **os.environ,
            "LATENCY_URL": url,
            "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
        }
        tidings = shutil.which("tidings") or "tidings"
        try:
            # The producer joins the listener first, so nothing stored is missed.
            asyncio.run(_warm_up(url))
            worker = subprocess.Popen(
                [tidings, "worker", "bench.latency:bus"],
                env={**env, "LATENCY_OUT": warm},
                stderr=subprocess.DEVNULL,
            )
            try:
                asyncio.run(_publish_one(url))
                _wait_for(warm, 60)
                time.sleep(1.0)  # let the worker settle before the idle reading
                before = _cpu_s(worker.pid)
                time.sleep(IDLE_S)
                idle = (_cpu_s(worker.pid) - before) / IDLE_S * 100
                Path(warm).unlink()
                asyncio.run(_producer(url, n, rate))
                _wait_for(warm, 120)
                lines = Path(warm).read_text().split()
            finally:
                worker.terminate()
                worker.wait(30)
        finally:
            drop()
        # The worker wrote the warm-up event's line first.
        return [float(x) for x in lines[1:]], idle


async def _warm_up(url: str) -> None:
    async with _bus(url, None, consume=False):
        pass  # joins the listener


async def _publish_one(url: str) -> None:
    from tidings import Bus

    async with Bus(url, consume=False) as pub:
        await pub.publish("tick", sent=time.time(), last=True)


async def _producer(url: str, n: int, rate: float) -> None:
    from tidings import Bus

    async with Bus(url, consume=False) as pub:
        await _publish(pub, n, rate)


def _wait_for(path: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the worker did not finish ({path})")
        time.sleep(0.01)


def _verdict(value: float | None, target: float | None) -> str:
    if target is None or value is None:
        return ""
    return f"{'PASS' if value <= target else 'MISS'} (<= {target:g})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="events per store")
    parser.add_argument("--rate", type=float, default=200.0, help="events published per second")
    parser.add_argument(
        "--store",
        nargs="+",
        default=["memory", "sqlite-local", "sqlite", "redis", "postgres"],
        choices=list(TARGETS),
        help="stores to run on",
    )
    args = parser.parse_args()
    print(f"{args.n} events at {args.rate:g}/s, publish call to the listener's first line")
    print(f"{'store':<22}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'idle CPU':>10}   targets")
    for store in args.store:
        latencies, idle = measure(store, args.n, args.rate)
        p50, p99, top = _percentiles(latencies)
        want50, want99, want_cpu = TARGETS[store]
        verdicts = [
            f"p50 {v}" if (v := _verdict(p50, want50)) else "",
            f"p99 {v}" if (v := _verdict(p99, want99)) else "",
            f"CPU {v}" if (v := _verdict(idle, want_cpu)) else "",
        ]
        cpu = f"{idle:.2f}%" if idle is not None else "-"
        print(
            f"{LABELS.get(store, store):<22}{p50:>9.2f}{p99:>9.2f}{top:>9.2f}{cpu:>10}   "
            + "  ".join(v for v in verdicts if v),
            flush=True,
        )
    sys.exit(0)


if __name__ == "__main__":
    main()
