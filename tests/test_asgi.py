"""The ASGI middleware: request events run after the response, only for requests that
succeeded; everything else goes to the bus at once."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from tidings import Bus, ConfigurationError, Event, PayloadError, listener
from tidings.asgi import EventsMiddleware

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class Seen:
    def __init__(self) -> None:
        self.names: list[str] = []
        self.request_ids: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()


@pytest.fixture
async def seen() -> Seen:
    return Seen()


@pytest.fixture
async def bus(seen: Seen) -> AsyncIterator[Bus]:
    @listener("**")
    async def record(event: Event) -> None:
        await seen.gate.wait()
        seen.names.append(event.name)
        seen.request_ids.append(request_id.get())

    async with Bus(listeners=[record], check_serializable=True) as bus:
        yield bus


def _app(bus: Bus, seen: Seen, **options: Any) -> Any:
    async def ok(request: Request) -> Response:
        request_id.set(request.headers.get("x-request-id", "-"))
        bus.emit("user.created", email="a@b.c")
        for _ in range(10):
            await asyncio.sleep(0)
        # Still inside the request: nothing ran yet.
        return PlainTextResponse(",".join(seen.names) or "nothing yet")

    async def fails(request: Request) -> Response:
        bus.emit("user.created", email="a@b.c")
        raise RuntimeError("the handler failed")

    async def server_error(request: Request) -> Response:
        bus.emit("report.failed")
        return PlainTextResponse("the app says 503", status_code=503)

    async def background(request: Request) -> Response:
        bus.emit("in.request")
        return PlainTextResponse("ok", background=BackgroundTask(bus.emit, "in.background"))

    async def spawns(request: Request) -> Response:
        async def later() -> None:
            await asyncio.sleep(0.05)
            bus.emit("after.response")

        request.state.task = asyncio.get_running_loop().create_task(later())
        spawned.append(request.state.task)
        return PlainTextResponse("ok")

    async def bad_payload(request: Request) -> Response:
        try:
            bus.emit("bad", value=object())
        except PayloadError as exc:
            return PlainTextResponse(str(exc), status_code=422)
        return PlainTextResponse("accepted")

    async def socket(websocket: WebSocket) -> None:
        await websocket.accept()
        bus.emit("ws.message")
        await websocket.send_text("sent")
        await websocket.receive_text()
        await websocket.close()

    spawned: list[asyncio.Task[None]] = []
    app = Starlette(
        routes=[
            Route("/ok", ok),
            Route("/fails", fails),
            Route("/server-error", server_error),
            Route("/background", background),
            Route("/spawns", spawns),
            Route("/bad", bad_payload),
            WebSocketRoute("/ws", socket),
        ]
    )
    app.state.spawned = spawned
    return EventsMiddleware(app, bus=bus, **options)


def _client(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


async def test_request_events_run_after_the_response(bus: Bus, seen: Seen) -> None:
    async with _client(_app(bus, seen)) as client:
        response = await client.get("/ok", headers={"x-request-id": "r-1"})
    assert response.text == "nothing yet"
    await bus.drain()
    assert seen.names == ["user.created"]
    assert seen.request_ids == ["r-1"]  # the emitter's context reaches the listener


async def test_the_response_never_waits_for_a_listener(bus: Bus, seen: Seen) -> None:
    seen.gate.clear()  # listeners block until the test lets them go
    async with _client(_app(bus, seen)) as client:
        response = await asyncio.wait_for(client.get("/ok"), 5)
    assert response.status_code == 200
    assert seen.names == []
    seen.gate.set()
    await bus.drain()
    assert seen.names == ["user.created"]


async def test_a_failed_request_drops_its_events(bus: Bus, seen: Seen) -> None:
    async with _client(_app(bus, seen)) as client:
        response = await client.get("/fails")
    assert response.status_code == 500
    await bus.drain()
    assert seen.names == []


async def test_on_error_send_keeps_them(bus: Bus, seen: Seen) -> None:
    async with _client(_app(bus, seen, on_error="send")) as client:
        await client.get("/fails")
    await bus.drain()
    assert seen.names == ["user.created"]


async def test_a_5xx_the_app_returns_is_a_success(bus: Bus, seen: Seen) -> None:
    async with _client(_app(bus, seen)) as client:
        response = await client.get("/server-error")
    assert response.status_code == 503
    await bus.drain()
    assert seen.names == ["report.failed"]


async def test_background_tasks_and_spawned_tasks_emit_as_usual(bus: Bus, seen: Seen) -> None:
    app = _app(bus, seen)
    async with _client(app) as client:
        await client.get("/background")
        await client.get("/spawns")
    await asyncio.gather(*app.app.state.spawned)
    await bus.drain()
    assert sorted(seen.names) == ["after.response", "in.background", "in.request"]


async def test_a_bad_payload_is_refused_inside_the_handler(bus: Bus, seen: Seen) -> None:
    async with _client(_app(bus, seen)) as client:
        response = await client.get("/bad")
    assert response.status_code == 422
    assert "'value'" in response.text


async def test_outside_requests_emit_goes_straight_to_the_bus(bus: Bus, seen: Seen) -> None:
    _app(bus, seen)  # a middleware exists, but no request is being handled
    bus.emit("startup.done")
    await bus.drain()
    assert seen.names == ["startup.done"]


async def test_outside_requests_a_plain_bus_keeps_order_and_context(seen: Seen) -> None:
    # A bus with no per-event checks, whose emit is not replaced while a middleware
    # holds request events: outside a request, its events are queued as they come.
    got: list[tuple[str, int, str]] = []

    @listener("**")
    async def record(event: Event, n: int) -> None:
        got.append((event.name, n, request_id.get()))

    async with Bus(listeners=[record]) as plain:
        _app(plain, seen)
        for n in range(3):
            request_id.set(f"job {n}")
            plain.emit("job.done", n=n)
            plain.emit("job.logged", n=n)
        await plain.drain()
    assert got == [(name, n, f"job {n}") for n in range(3) for name in ("job.done", "job.logged")]


async def test_websockets_are_not_held(bus: Bus, seen: Seen) -> None:
    during: list[list[str]] = []

    async def socket(websocket: WebSocket) -> None:
        await websocket.accept()
        bus.emit("ws.message")
        await bus.drain()
        during.append(list(seen.names))  # delivered while the connection is open
        await websocket.close()

    app = EventsMiddleware(Starlette(routes=[WebSocketRoute("/ws", socket)]), bus=bus)
    incoming: list[dict[str, Any]] = [
        {"type": "websocket.connect"},
        {"type": "websocket.disconnect", "code": 1000},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: Any) -> None:
        sent.append(dict(message))

    scope = {"type": "websocket", "path": "/ws", "headers": [], "query_string": b""}
    await app(scope, receive, send)
    assert during == [["ws.message"]]
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.close"]


async def test_on_error_is_checked(bus: Bus) -> None:
    with pytest.raises(ConfigurationError, match="on_error"):
        EventsMiddleware(Starlette(), bus=bus, on_error="later")  # type: ignore[arg-type]


async def test_no_requests_context_is_kept_alive_once_its_events_ran() -> None:
    import gc
    import weakref

    class Session:
        pass

    session_var: contextvars.ContextVar[Session] = contextvars.ContextVar("session")
    refs: list[weakref.ref[Session]] = []
    seen: list[bool] = []

    @listener("x")
    async def uses() -> None:
        seen.append(isinstance(session_var.get(), Session))

    async def app(scope: Any, receive: Any, send: Any) -> None:
        session = Session()
        refs.append(weakref.ref(session))
        session_var.set(session)
        events.emit("x")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        pass

    async with Bus(listeners=[uses]) as events:
        middleware = EventsMiddleware(app, bus=events)
        scope = {"type": "http", "method": "GET", "path": "/", "headers": []}
        # A request in a task and a context of its own, as a server runs it.
        task = asyncio.create_task(middleware(scope, receive, send), context=contextvars.Context())
        await task
        del task
        await events.drain()
        for _ in range(3):
            await asyncio.sleep(0)  # the loop lets go of the finished task
        gc.collect()
        assert seen == [True]
        assert refs[0]() is None


@pytest.mark.parametrize("plain", [True, False])
async def test_what_a_request_emitted_past_max_pending_waits_for_room(plain: bool) -> None:
    # Emitted inside the request, so accepted: at release, what does not fit in the
    # queue waits for room instead of being dropped.
    got: list[int] = []

    @listener("row")
    async def store(n: int) -> None:
        await asyncio.sleep(0)
        got.append(n)

    async with Bus(listeners=[store], max_pending=2, check_serializable=not plain) as bus:

        async def many(request: Request) -> Response:
            for n in range(7):
                bus.emit("row", n=n)
            return PlainTextResponse("ok")

        app = EventsMiddleware(Starlette(routes=[Route("/", many)]), bus=bus)
        async with _client(app) as client:
            assert (await client.get("/")).status_code == 200
        await bus.drain()
    assert sorted(got) == list(range(7))


async def test_what_a_request_emitted_as_the_bus_closed_is_reported_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    @listener("row")
    async def store(n: int) -> None:
        pass

    bus = Bus(listeners=[store])
    await bus.start()

    async def closes(request: Request) -> Response:
        bus.emit("row", n=1)
        await bus.aclose()
        return PlainTextResponse("ok")

    app = EventsMiddleware(Starlette(routes=[Route("/", closes)]), bus=bus)
    async with _client(app) as client:
        assert (await client.get("/")).status_code == 200
    assert "the bus closed before the response was sent: 1 event(s)" in caplog.text


async def test_a_request_handled_on_another_loop_waits_for_room_too() -> None:
    # The app runs on a loop of its own, in a thread, as a test client's does.
    got: list[int] = []

    @listener("row")
    async def store(n: int) -> None:
        await asyncio.sleep(0)
        got.append(n)

    async with Bus(listeners=[store], max_pending=1, check_serializable=True) as bus:

        async def many(request: Request) -> Response:
            for n in range(5):
                bus.emit("row", n=n)
            return PlainTextResponse("ok")

        app = EventsMiddleware(Starlette(routes=[Route("/", many)]), bus=bus)

        async def request() -> int:
            async with _client(app) as client:
                return (await client.get("/")).status_code

        assert await asyncio.to_thread(asyncio.run, request()) == 200
        await bus.drain()
    assert sorted(got) == list(range(5))


async def test_a_failed_request_gives_back_the_once_listeners_its_events_took() -> None:
    got: list[int] = []

    @listener("x", once=True)
    async def first(n: int) -> None:
        got.append(n)

    async with Bus(listeners=[first], check_serializable=True) as bus:

        async def fails(request: Request) -> Response:
            bus.emit("x", n=1)
            raise RuntimeError("the handler failed")

        app = EventsMiddleware(Starlette(routes=[Route("/", fails)]), bus=bus)
        async with _client(app) as client:
            assert (await client.get("/")).status_code == 500
        bus.emit("x", n=2)
        await bus.drain()
    assert got == [2]


async def test_capture_leaves_out_what_a_failed_request_emitted(bus: Bus, seen: Seen) -> None:
    from tidings.testing import capture

    with capture(bus) as events:
        async with _client(_app(bus, seen)) as client:
            assert (await client.get("/fails")).status_code == 500
            assert (await client.get("/ok")).status_code == 200
        await bus.drain()
    assert seen.names == ["user.created"]
    assert len(events.events) == 1  # the /ok request's, not the dropped one
    events.assert_emitted("user.created", times=1)
    assert [e.name for e in events.dropped] == ["user.created"]
    with pytest.raises(AssertionError, match="1 dropped with a failed request"):
        events.assert_emitted("user.deleted")


@pytest.mark.parametrize("checked", [False, True])
async def test_a_held_event_keeps_keywords_named_like_options_as_payload(checked: bool) -> None:
    got: list[dict[str, object]] = []

    @listener("cache.invalidated")
    async def invalidated(key: str, delay: int) -> None:
        got.append({"key": key, "delay": delay})

    events = Bus(listeners=[invalidated], check_serializable=checked)

    async def handler(request: Request) -> Response:
        events.emit("cache.invalidated", key="user-1", delay=60)
        events.options(delay=0).emit("cache.invalidated", key="user-2", delay=0)
        return PlainTextResponse("ok")

    async with events:
        app = EventsMiddleware(Starlette(routes=[Route("/", handler)]), bus=events)
        async with _client(app) as client:
            assert (await client.get("/")).status_code == 200
        await events.drain()
    assert sorted(got, key=str) == [{"key": "user-1", "delay": 60}, {"key": "user-2", "delay": 0}]
