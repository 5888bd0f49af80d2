"""The README's custom backends, run as written there: one method each, and the bus's
policy (retries, dead letters, drain) travels with every delivery."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import Depends, FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tidings import Bus, Retry, listener


def readme_example(index: int) -> dict[str, Any]:
    """Run the ``index``-th Python block of the README's custom-backend section and
    return what it defined."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Custom backends", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 3
    # At most 15 lines of code each, blank lines and comments aside.
    lines = [
        ln for ln in blocks[index].splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]
    assert len(lines) <= 15, lines
    namespace: dict[str, Any] = {"__name__": f"readme_custom_backend_{index}"}
    exec(compile(blocks[index], "README.md", "exec"), namespace)
    return namespace


# -- (a) FastAPI's background tasks ---------------------------------------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]


async def test_deliveries_run_as_the_requests_background_tasks_after_its_response() -> None:
    example = readme_example(0)
    happened: list[str] = []

    @listener("user.created")
    async def welcome(email: str) -> None:
        happened.append(f"welcome {email}")

    bus = Bus(example["BackgroundTasksBackend"](), listeners=[welcome])
    app = FastAPI()

    @app.post("/users", dependencies=[Depends(example["background"])])
    async def create_user(email: str) -> dict[str, str]:
        bus.emit("user.created", email=email)
        happened.append("handled")
        return {"email": email}

    def recording(inner: ASGIApp) -> ASGIApp:
        async def wrapped(scope: Scope, receive: Any, send: Any) -> None:
            async def sent(message: Message) -> None:
                await send(message)
                if message["type"] == "http.response.body" and not message.get("more_body"):
                    happened.append("response sent")

            await inner(scope, receive, sent)

        return wrapped

    async with bus:
        transport = httpx.ASGITransport(app=recording(app))
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            # In a task of its own, as a server runs each request: what the request's
            # dependency set in its context stays there.
            response = await asyncio.create_task(
                client.post("/users", params={"email": "ada@example.com"})
            )
        assert response.status_code == 200
        await bus.drain()
        # Outside a request, a delivery runs at once.
        bus.emit("user.created", email="bob@example.com")
        await bus.drain()
    assert happened == [
        "handled",
        "response sent",
        "welcome ada@example.com",
        "welcome bob@example.com",
    ]


async def test_a_background_delivery_that_fails_is_retried_then_dead_lettered() -> None:
    example = readme_example(0)
    attempts: list[int] = []

    @listener("user.created", retry=Retry(attempts=3, backoff=0))
    async def flaky(email: str) -> None:
        attempts.append(len(attempts) + 1)
        raise RuntimeError("mail server down")

    bus = Bus(example["BackgroundTasksBackend"](), listeners=[flaky])
    app = FastAPI()

    @app.post("/users", dependencies=[Depends(example["background"])])
    async def create_user(email: str) -> dict[str, str]:
        bus.emit("user.created", email=email)
        return {"email": email}

    async with bus:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            assert (await client.post("/users", params={"email": "a@b.c"})).status_code == 200
        await bus.drain()
        (letter,) = await bus.list_dead_letters()
        assert letter.error == "RuntimeError: mail server down"
        assert await bus.purge_dead_letters() == 1
    assert attempts == [1, 2, 3]


# -- (b) a thread pool for blocking listeners -------------------------------------------


async def test_blocking_listeners_run_at_once_in_the_backends_own_pool() -> None:
    example = readme_example(1)
    # More than the bus's own threads on a small machine: all of them must block at
    # once, which only a pool this large lets them do.
    count = 16
    barrier = threading.Barrier(count, timeout=30)
    threads: set[str] = set()

    @listener("report.due")
    def render(n: int) -> None:
        barrier.wait()
        threads.add(threading.current_thread().name)

    backend = example["ThreadPoolBackend"](threads=count)
    try:
        async with Bus(backend, listeners=[render]) as bus:
            for n in range(count):
                bus.emit("report.due", n=n)
            await bus.drain()
            assert bus.stats()["listeners"][render.qualname] == {"delivered": count, "failed": 0}
        # Closing the bus shut the backend's pool down.
        with pytest.raises(RuntimeError, match="shutdown"):
            backend.pool.submit(print)
    finally:
        backend.pool.shutdown()
    assert len(threads) == count
    assert all(name.startswith("blocking") for name in threads)


async def test_closing_reports_what_a_custom_backend_never_ran(
    caplog: pytest.LogCaptureFixture,
) -> None:
    example = readme_example(1)

    @listener("report.due", retry=Retry(attempts=2, backoff=3600))
    def render(n: int) -> None:
        raise RuntimeError("printer jammed")

    failed = asyncio.Event()
    backend = example["ThreadPoolBackend"](threads=2)
    bus = Bus(backend, listeners=[render], on_error=lambda *_: failed.set())
    try:
        await bus.start()
        bus.emit("report.due", n=1)
        await failed.wait()
        # Its retry waits an hour: the bus closes without it, and says so.
        await bus.aclose(timeout=0)
    finally:
        backend.pool.shutdown()
    assert "1 undelivered event(s)" in caplog.text


# -- (c) forwarding to a webhook ---------------------------------------------------------


@pytest.fixture
async def webhook() -> AsyncIterator[tuple[str, list[dict[str, Any]], list[int]]]:
    """A real HTTP server on a free local port: what it received, and the statuses it
    answers with in turn (then 200)."""
    received: list[dict[str, Any]] = []
    statuses: list[int] = []

    async def hook(request: Request) -> Response:
        received.append(await request.json())
        return JSONResponse({}, status_code=statuses.pop(0) if statuses else 200)

    from starlette.applications import Starlette

    app = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield f"http://127.0.0.1:{port}/hook", received, statuses
    finally:
        server.should_exit = True
        await serving
        sock.close()


async def test_each_delivery_is_posted_to_the_webhook_and_a_failed_post_is_retried(
    webhook: tuple[str, list[dict[str, Any]], list[int]],
) -> None:
    url, received, statuses = webhook
    example = readme_example(2)
    ran_here: list[int] = []

    @listener("order.paid", retry=Retry(attempts=3, backoff=0))
    async def ship(order_id: int) -> None:
        ran_here.append(order_id)  # runs on the other side of the webhook, not here

    backend = example["WebhookBackend"](url)
    statuses.append(503)  # the first post fails: retried by ship's policy
    try:
        async with Bus(backend, listeners=[ship]) as bus:
            bus.emit("order.paid", order_id=7)
            await bus.drain()
            assert bus.dead_letters() == []
    finally:
        await backend.http.aclose()
    body = {"listener": ship.qualname, "name": "order.paid", "kwargs": {"order_id": 7}}
    assert received == [body, body]
    assert ran_here == []


async def test_a_post_that_keeps_failing_is_a_dead_letter_and_replays(
    webhook: tuple[str, list[dict[str, Any]], list[int]],
) -> None:
    url, received, statuses = webhook
    example = readme_example(2)

    @listener("order.paid", retry=Retry(attempts=2, backoff=0))
    async def ship(order_id: int) -> None:
        pass

    backend = example["WebhookBackend"](url)
    statuses.extend([500, 500])
    try:
        async with Bus(backend, listeners=[ship]) as bus:
            bus.emit("order.paid", order_id=8)
            await bus.drain()
            (letter,) = await bus.list_dead_letters(listener=ship.qualname)
            assert letter.attempts == 2
            assert "500" in letter.error
            assert await bus.replay_dead_letters() == 1
            await bus.drain()
            assert await bus.list_dead_letters() == []
    finally:
        await backend.http.aclose()
    assert len(received) == 3
