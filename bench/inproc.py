"""In-process delivery, side by side in one run: tidings against the emitters users use today.

    uv run --group bench python bench/inproc.py [--n 200000] [--repeat 3]

Deliveries/s is measured from the first emit to the last listener call, for 1 and 5
trivial async listeners, and for 1 that awaits once (``asyncio.sleep(0)``, as a listener
doing I/O would). Every emitter gets the same treatment: emits in a loop, a yield to
the event loop every 1000 emits (so queue-based emitters are not starved), and the clock
stops when the listeners have been called N x listeners times. With trivial listeners,
slow peers run fewer events (scaled so each run takes about a second); with the one
that awaits, every contender runs a tenth of N. The contenders take turns, one run each
per round, so a slow spell of the machine falls on all of them alike; each one's best
of ``--repeat`` rounds counts. Then the median cost of one ``bus.emit()``: emits are
timed a hundred at a time, so the clock's own cost (about 100-200 ns on a virtual
machine) is not counted as the emit's. Last, deliveries/s of events emitted on another
thread (tidings alone; the peers are not thread-safe).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import platform
import statistics
import threading
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from typing import Any

Runner = Callable[[int, int, bool], Awaitable[float]]

YIELD_EVERY = 1000


class Done:
    """Counts listener calls; the future completes at the expected total."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.future: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    def hit(self) -> None:
        self.count += 1
        if self.count == self.expected:
            self.future.set_result(time.perf_counter())


def make_listeners(done: Done, k: int, awaits: bool) -> list[Callable[..., Awaitable[None]]]:
    def one() -> Callable[..., Awaitable[None]]:
        async def on_event(n: int) -> None:
            done.hit()

        async def awaits_once(n: int) -> None:
            await asyncio.sleep(0)  # as a listener doing I/O would
            done.hit()

        return awaits_once if awaits else on_event

    return [one() for _ in range(k)]


async def emit_loop(emit: Callable[..., Any], n: int) -> float:
    # Each emitter's own emit is called in the loop, with no wrapper of ours around it.
    start = time.perf_counter()
    for i in range(n):
        emit("bench", n=i)
        if i % YIELD_EVERY == YIELD_EVERY - 1:
            await asyncio.sleep(0)
    return start


# -- the contenders ---------------------------------------------------------------------


async def run_tidings(n: int, k: int, awaits: bool) -> float:
    from tidings import Bus, listener

    done = Done(n * k)
    fns = [listener("bench")(fn) for fn in make_listeners(done, k, awaits)]
    async with Bus(listeners=fns, max_pending=n * k + 1) as bus:
        emit = bus.emit
        start = await emit_loop(emit, n)
        end = await done.future
    assert done.count == n * k
    return n * k / (end - start)


async def run_tidings_metrics(n: int, k: int, awaits: bool, detailed: bool = False) -> float:
    """tidings with Prometheus metrics on (``tidings.metrics.instrument``, its defaults:
    the backend counts and times as it goes; or ``detailed``: emit hooks and delivery
    observers, off the fast path)."""
    from tidings import Bus, listener
    from tidings.metrics import instrument

    done = Done(n * k)
    fns = [listener("bench")(fn) for fn in make_listeners(done, k, awaits)]
    bus = Bus(listeners=fns, max_pending=n * k + 1)
    instrument(bus, detailed=detailed)
    async with bus:
        emit = bus.emit
        start = await emit_loop(emit, n)
        end = await done.future
    assert done.count == n * k
    return n * k / (end - start)


async def run_tidings_metrics_detailed(n: int, k: int, awaits: bool) -> float:
    return await run_tidings_metrics(n, k, awaits, detailed=True)


async def run_litestar(n: int, k: int, awaits: bool) -> float:
    from litestar.events import SimpleEventEmitter, listener

    done = Done(n * k)
    fns = [listener("bench")(fn) for fn in make_listeners(done, k, awaits)]
    async with SimpleEventEmitter(fns) as emitter:
        emit = emitter.emit
        start = await emit_loop(emit, n)
        end = await done.future
    assert done.count == n * k
    return n * k / (end - start)


async def run_pyee(n: int, k: int, awaits: bool) -> float:
    from pyee.asyncio import AsyncIOEventEmitter

    done = Done(n * k)
    ee = AsyncIOEventEmitter()
    for fn in make_listeners(done, k, awaits):
        ee.on("bench", fn)
    emit = ee.emit
    start = await emit_loop(emit, n)
    end = await done.future
    assert done.count == n * k
    return n * k / (end - start)


async def run_pyventus(n: int, k: int, awaits: bool) -> float:
    from pyventus.events import AsyncIOEventEmitter, EventLinker

    class Linker(EventLinker):
        pass

    done = Done(n * k)
    for fn in make_listeners(done, k, awaits):
        Linker.subscribe("bench", event_callback=fn)
    emitter = AsyncIOEventEmitter(event_linker=Linker, debug=False)
    emit = emitter.emit
    start = await emit_loop(emit, n)
    end = await done.future
    Linker.remove_all()
    assert done.count == n * k
    return n * k / (end - start)


async def run_fastapi_events(n: int, k: int, awaits: bool) -> float:
    # Outside a request, dispatch() runs the handlers of the middleware identified by a
    # context variable in one asyncio task per event: set what the middleware would set.
    from fastapi_events import handler_store, middleware_identifier
    from fastapi_events.dispatcher import dispatch
    from fastapi_events.handlers.local import LocalHandler

    done = Done(n * k)
    handler = LocalHandler()
    for fn in make_listeners(done, k, awaits):

        async def on_event(event: tuple[str, Any], fn: Any = fn) -> None:
            await fn(**event[1])

        handler.register(on_event, event_name="bench")
    middleware_id = id(handler)
    handler_store[middleware_id] = [handler]
    token = middleware_identifier.set(middleware_id)
    try:
        start = await emit_loop(
            lambda name, **payload: dispatch(name, payload, validate_payload=False), n
        )
        end = await done.future
    finally:
        middleware_identifier.reset(token)
        del handler_store[middleware_id]
    assert done.count == n * k
    return n * k / (end - start)


async def run_task_per_delivery(n: int, k: int, awaits: bool) -> float:
    done = Done(n * k)
    fns = make_listeners(done, k, awaits)
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    def emit(name: str, n: int) -> None:
        for fn in fns:
            task = loop.create_task(fn(n=n))  # type: ignore[arg-type]
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    start = await emit_loop(emit, n)
    end = await done.future
    assert done.count == n * k
    return n * k / (end - start)


async def run_bare_await(n: int, k: int, awaits: bool) -> float:
    done = Done(n * k)
    fns = make_listeners(done, k, awaits)
    start = time.perf_counter()
    for i in range(n):
        for fn in fns:
            await fn(n=i)
    end = await done.future
    assert done.count == n * k
    return n * k / (end - start)


CONTENDERS: dict[str, tuple[Runner, float]] = {
    # name: (runner, share of --n it runs: slow peers run fewer events)
    "tidings": (run_tidings, 1.0),
    "tidings + metrics": (run_tidings_metrics, 1.0),
    # What emit hooks and delivery observers cost in process (not the default there).
    "tidings + metrics, detailed": (run_tidings_metrics_detailed, 0.2),
    "litestar SimpleEventEmitter": (run_litestar, 0.1),
    "pyee AsyncIOEventEmitter": (run_pyee, 0.1),
    "pyventus AsyncIOEventEmitter": (run_pyventus, 0.1),
    "fastapi-events dispatch": (run_fastapi_events, 0.1),
    "one task per delivery": (run_task_per_delivery, 0.5),
    "bare await (floor)": (run_bare_await, 1.0),
}


async def from_a_thread(n: int) -> float:
    """Deliveries/s of ``n`` events emitted on another thread (tidings alone: the peers
    are not safe to call from one), one trivial listener."""
    from tidings import Bus, listener

    done = Done(n)
    fns = [listener("bench")(fn) for fn in make_listeners(done, 1, False)]
    async with Bus(listeners=fns, max_pending=n + 1) as bus:

        def emits() -> None:
            for i in range(n):
                bus.emit("bench", n=i)

        start = time.perf_counter()
        thread = threading.Thread(target=emits)
        thread.start()
        end = await done.future
        thread.join()
    return n / (end - start)


async def emit_cost(samples: int) -> tuple[float, float]:
    """Median and p99 nanoseconds of one ``bus.emit`` on a started bus, one listener:
    over ``samples`` timings of a hundred emits in a row."""
    from tidings import Bus, listener

    @listener("bench")
    async def on_event(n: int) -> None:
        pass

    per_call: list[float] = []
    clock = time.perf_counter_ns
    async with Bus(listeners=[on_event]) as bus:
        emit = bus.emit
        for _ in range(samples // 10):
            for _ in range(10):
                t0 = clock()
                for i in range(100):
                    emit("bench", n=i)
                per_call.append((clock() - t0) / 100)
            await bus.drain()
    per_call.sort()
    return statistics.median(per_call), per_call[int(len(per_call) * 0.99)]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200_000, help="events per run (tidings)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds; each one's best counts")
    parser.add_argument("--only", nargs="*", help="contenders whose name contains one of these")
    args = parser.parse_args()

    peers = ("litestar", "pyee", "pyventus", "fastapi-events", "msgspec")
    print(
        f"Python {platform.python_version()} on {platform.machine()}, tidings {version('tidings')}"
    )
    print(", ".join(f"{p} {version(p)}" for p in peers))

    contenders = {
        name: entry
        for name, entry in CONTENDERS.items()
        if not args.only or any(o in name for o in args.only)
    }
    results: dict[tuple[int, bool], dict[str, float]] = {}
    for k, awaits in ((1, False), (5, False), (1, True)):
        results[k, awaits] = best = dict.fromkeys(contenders, 0.0)
        # A listener that awaits suspends every delivery: each contender pays for a
        # task per delivery then, so all run a tenth of the events, the same number
        # (a short run flatters: it ends before the garbage collector has much to do).
        for _ in range(args.repeat):
            for name, (runner, share) in contenders.items():
                gc.collect()
                events = args.n // 10 if awaits else max(1000, int(args.n * share))
                best[name] = max(best[name], await runner(events, k, awaits))
        label = f"{k} async listener(s)" + (" that await once" if awaits else "")
        print(f"\n{label}: deliveries/s (best of {args.repeat} rounds)")
        for name, rate in best.items():
            ratio = ""
            if "tidings" in best and name != "tidings":
                ratio = f"tidings = {best['tidings'] / rate:6.2f}x this"
            print(f"  {name:30} {rate:>13,.0f}  {ratio}")

    median_ns, p99_ns = await emit_cost(2000)
    print(f"\nbus.emit(): median {median_ns:.0f} ns, p99 {p99_ns:.0f} ns (timed 100 at a time)")
    best_thread = 0.0
    for _ in range(args.repeat):
        gc.collect()
        best_thread = max(best_thread, await from_a_thread(args.n // 2))
    print(f"bus.emit() on another thread: {best_thread:,.0f} deliveries/s (1 listener)")

    one = results.get((1, False), {})
    if "tidings" in one:
        checks = [
            ("tidings >= 1,000,000 deliveries/s (1 listener)", one["tidings"] >= 1_000_000),
            ("emit() median <= 1 us", median_ns <= 1000),
        ]
        if "tidings + metrics" in one:
            ratio = one["tidings + metrics"] / one["tidings"]
            checks.append((f"metrics cost <= 10% (keeps {ratio:.0%})", ratio >= 0.9))
        if "pyee AsyncIOEventEmitter" in one:
            ratio = one["tidings"] / one["pyee AsyncIOEventEmitter"]
            checks.append((f">= 15x pyee (is {ratio:.1f}x)", ratio >= 15))
        if "litestar SimpleEventEmitter" in one:
            ratio = one["tidings"] / one["litestar SimpleEventEmitter"]
            checks.append((f">= 20x Litestar (is {ratio:.1f}x)", ratio >= 20))
        if "bare await (floor)" in one:
            ratio = one["tidings"] / one["bare await (floor)"]
            checks.append((f">= 0.2x bare await (is {ratio:.2f}x)", ratio >= 0.2))
        awaiting = results.get((1, True), {})
        if "tidings + metrics" in awaiting:
            ratio = awaiting["tidings + metrics"] / awaiting["tidings"]
            checks.append((f"awaiting once: metrics cost <= 10% (keeps {ratio:.0%})", ratio >= 0.9))
        if "pyee AsyncIOEventEmitter" in awaiting:
            ratio = awaiting["tidings"] / awaiting["pyee AsyncIOEventEmitter"]
            checks.append((f"awaiting once: >= 3x pyee (is {ratio:.2f}x)", ratio >= 3))
        if "one task per delivery" in awaiting:
            ratio = awaiting["tidings"] / awaiting["one task per delivery"]
            checks.append(
                (f"awaiting once: >= 1.5x one task per delivery (is {ratio:.2f}x)", ratio >= 1.5)
            )
        print("\ntargets:")
        for label, ok in checks:
            print(f"  {'PASS' if ok else 'MISS'}  {label}")


if __name__ == "__main__":
    import sys

    # bench/http.py would hide the standard library's http package from the peers'
    # imports: look for modules elsewhere than beside this file.
    from pathlib import Path as _Path

    _here = str(_Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p and str(_Path(p).resolve()) != _here]
    asyncio.run(main())
