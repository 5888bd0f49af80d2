"""What holding a request's events costs: a FastAPI hello-world endpoint that emits one
event per request, without middleware, with tidings' middleware, and with
fastapi-events' middleware, in one run.

    uv run --group bench python bench/http.py [--requests 5000] [--rounds 5]

Requests are driven straight through each app's ASGI interface, one after another, on
one event loop, so the figures are the app's own cost with no server or network around
it (the listener runs on the same loop, as it would in the server's process). Each round
runs every variant once, in turn; the best round of each counts. Latency is from the
call to the response's last byte.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

App = Callable[..., Awaitable[None]]

_SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/",
    "raw_path": b"/",
    "query_string": b"",
    "root_path": "",
    "headers": [(b"host", b"bench")],
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 8000),
}


async def _request(app: App) -> float:
    """One GET /; seconds until the response's last byte was sent."""
    done = 0.0

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal done
        if message["type"] == "http.response.body" and not message.get("more_body"):
            done = time.perf_counter()

    start = time.perf_counter()
    await app(dict(_SCOPE), receive, send)
    return done - start


def _tidings_app(middleware: bool) -> tuple[Any, Any]:
    from fastapi import FastAPI

    from tidings import Bus, listener
    from tidings.asgi import EventsMiddleware

    count = [0]

    @listener("hello")
    async def on_hello(name: str) -> None:
        count[0] += 1

    bus = Bus(listeners=[on_hello])
    app = FastAPI()

    @app.get("/")
    async def hello() -> dict[str, str]:
        bus.emit("hello", name="world")
        return {"hello": "world"}

    if middleware:
        app.add_middleware(EventsMiddleware, bus=bus)
    return app, bus


def _fastapi_events_app() -> tuple[Any, None]:
    from fastapi import FastAPI
    from fastapi_events.dispatcher import dispatch
    from fastapi_events.handlers.local import LocalHandler
    from fastapi_events.middleware import EventHandlerASGIMiddleware

    handler = LocalHandler()
    count = [0]

    @handler.register(event_name="hello")
    async def on_hello(event: Any) -> None:
        count[0] += 1

    app = FastAPI()

    @app.get("/")
    async def hello() -> dict[str, str]:
        dispatch("hello", {"name": "world"})
        return {"hello": "world"}

    app.add_middleware(EventHandlerASGIMiddleware, handlers=[handler])
    return app, None


async def _measure(app: App, requests: int) -> tuple[float, float, float]:
    """Requests/s, median and p99 latency in microseconds."""
    gc.collect()
    latencies = []
    start = time.perf_counter()
    for _ in range(requests):
        latencies.append(await _request(app))
    elapsed = time.perf_counter() - start
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99)]
    return requests / elapsed, statistics.median(latencies) * 1e6, p99 * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    from importlib.metadata import version

    plain, plain_bus = _tidings_app(middleware=False)
    held, held_bus = _tidings_app(middleware=True)
    peer, _ = _fastapi_events_app()
    variants = {
        "no middleware (bus.emit)": plain,
        "tidings EventsMiddleware": held,
        "fastapi-events middleware": peer,
    }
    print(
        f"FastAPI {version('fastapi')}, fastapi-events {version('fastapi-events')}, "
        f"tidings {version('tidings')}: GET / emits one event; {args.requests} requests "
        f"in a row per round, best of {args.rounds} rounds"
    )
    best: dict[str, tuple[float, float, float]] = {}
    async with plain_bus, held_bus:
        for app in variants.values():
            await _measure(app, 500)  # warm up
        for _ in range(args.rounds):
            for name, app in variants.items():
                figures = await _measure(app, args.requests)
                if name not in best or figures[0] > best[name][0]:
                    best[name] = figures
            await plain_bus.drain()
            await held_bus.drain()
    base_rate, base_median, _ = best["no middleware (bus.emit)"]
    for name, (rate, median, p99) in best.items():
        extra = (median / base_median - 1) * 100
        print(
            f"  {name:<27} {rate:>8,.0f} req/s   median {median:6.1f} us   "
            f"p99 {p99:6.1f} us   latency {extra:+5.1f}% vs none"
        )
    tidings_median = best["tidings EventsMiddleware"][1]
    added = (tidings_median / base_median - 1) * 100
    print(f"\n  {'PASS' if added <= 3 else 'MISS'}  tidings' middleware adds <= 3% (is {added:+.1f}%)")


if __name__ == "__main__":
    # This file's name hides the standard library's http package from the imports
    # below (FastAPI needs it): look for modules elsewhere than beside it.
    import sys
    from pathlib import Path

    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p and str(Path(p).resolve()) != here]
    asyncio.run(main())
