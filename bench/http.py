"""What holding a request's events costs: a FastAPI hello-world endpoint that emits one
event per request, without middleware, with tidings' middleware, and with
fastapi-events' middleware, in one run.

    uv run --group bench python bench/http.py [--requests 5000] [--rounds 5]

Two measures. In process: requests driven straight through each app's ASGI interface,
one after another, on one event loop: the app's own cost with no server or network
around it (the listener runs on the same loop, as it would in the server's process);
latency is from the call to the response's last byte. Served: each app on uvicorn in a
process of its own, on loopback, and a client in this process sending requests one
after another on a keep-alive connection; latency is the client's round trip. Each
round runs every variant once, in turn; each figure is its best over the rounds.
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

    from tidings.contrib.fastapi import lifespan

    bus = Bus(listeners=[on_hello])
    app = FastAPI(lifespan=lifespan(bus))

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


VARIANTS = {
    "no middleware (bus.emit)": "plain",
    "tidings EventsMiddleware": "tidings",
    "fastapi-events middleware": "fastapi-events",
}


def _build(kind: str) -> tuple[Any, Any]:
    if kind == "fastapi-events":
        return _fastapi_events_app()
    return _tidings_app(middleware=kind == "tidings")


def _serve(kind: str, port: int) -> None:
    import uvicorn

    app, _ = _build(kind)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="error", access_log=False)


async def _client(port: int, requests: int) -> tuple[float, float, float]:
    """Requests/s, median and p99 round trip in microseconds, over one connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = b"GET / HTTP/1.1\r\nhost: bench\r\n\r\n"
    latencies = []
    gc.collect()
    start = time.perf_counter()
    try:
        for _ in range(requests):
            sent = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - sent)
    finally:
        writer.close()
    elapsed = time.perf_counter() - start
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99)]
    return requests / elapsed, statistics.median(latencies) * 1e6, p99 * 1e6


def _start_servers() -> dict[str, tuple[Any, int]]:
    import socket
    import subprocess
    import sys

    servers = {}
    for name, kind in VARIANTS.items():
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, str(port)])
        servers[name] = (proc, port)
    return servers


async def _served(requests: int, rounds: int) -> dict[str, tuple[float, float, float]]:
    servers = _start_servers()
    try:
        for _, port in servers.values():
            for _ in range(200):
                try:
                    _, w = await asyncio.open_connection("127.0.0.1", port)
                    w.close()
                    break
                except OSError:
                    await asyncio.sleep(0.05)
            await _client(port, 500)  # warm up
        best: dict[str, tuple[float, float, float]] = {}
        for _ in range(rounds):
            for name, (_, port) in servers.items():
                figures = await _client(port, requests)
                best[name] = _better(best.get(name), figures)
        return best
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait()


def _better(
    best: tuple[float, float, float] | None, new: tuple[float, float, float]
) -> tuple[float, float, float]:
    """Each figure's best over the rounds: the most requests/s, the least latencies."""
    if best is None:
        return new
    return max(best[0], new[0]), min(best[1], new[1]), min(best[2], new[2])


def _report(title: str, best: dict[str, tuple[float, float, float]]) -> float:
    print(f"\n{title}")
    base_median = best["no middleware (bus.emit)"][1]
    for name, (rate, median, p99) in best.items():
        extra = (median / base_median - 1) * 100
        print(
            f"  {name:<27} {rate:>8,.0f} req/s   median {median:7.1f} us   "
            f"p99 {p99:7.1f} us   latency {extra:+5.1f}% vs none"
        )
    tidings = best["tidings EventsMiddleware"][1]
    print(f"  tidings' middleware adds {tidings - base_median:+.1f} us to the median")
    return (tidings / base_median - 1) * 100


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--requests", type=int, default=5000, help="requests in a row per variant and round"
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds; each figure's best counts")
    parser.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()

    from importlib.metadata import version

    apps = {name: _build(kind) for name, kind in VARIANTS.items()}
    print(
        f"FastAPI {version('fastapi')}, fastapi-events {version('fastapi-events')}, "
        f"uvicorn {version('uvicorn')}, tidings {version('tidings')}: GET / emits one "
        f"event; {args.requests} requests in a row per round, best of {args.rounds} rounds"
    )
    best: dict[str, tuple[float, float, float]] = {}
    buses = [bus for _, bus in apps.values() if bus is not None]
    for bus in buses:
        await bus.start()
    try:
        for app, _ in apps.values():
            await _measure(app, 500)  # warm up
        for _ in range(args.rounds):
            for name, (app, _) in apps.items():
                figures = await _measure(app, args.requests)
                best[name] = _better(best.get(name), figures)
            for bus in buses:
                await bus.drain()
    finally:
        for bus in buses:
            await bus.aclose()
    in_process = _report("In process (the app's own cost):", best)
    served = _report(
        "Served by uvicorn on loopback (what a client sees):",
        await _served(args.requests, args.rounds),
    )
    print()
    for label, added in (("in process", in_process), ("served", served)):
        verdict = "PASS" if added <= 3 else "MISS"
        print(f"  {verdict}  tidings' middleware adds <= 3% latency {label} (is {added:+.1f}%)")


if __name__ == "__main__":
    # This file's name hides the standard library's http package from the imports
    # below (FastAPI needs it): look for modules elsewhere than beside it.
    import sys
    from pathlib import Path

    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p and str(Path(p).resolve()) != here]
    if sys.argv[1:2] == ["--serve"]:
        _serve(sys.argv[2], int(sys.argv[3]))
    else:
        asyncio.run(main())
