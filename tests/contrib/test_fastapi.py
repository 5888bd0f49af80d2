"""FastAPI dependencies in listeners, and the lifespan that runs the bus with the app.

No ``from __future__ import annotations`` here: the dependencies are local to each test,
and annotations naming them must be evaluated where they are written (as in FastAPI).
"""

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI, Request, WebSocket
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from tidings import Bus, ConfigurationError, Event, Retry, listener
from tidings.contrib.fastapi import bind, lifespan, unbind


class Mailer:
    def __init__(self, name: str = "smtp") -> None:
        self.name = name
        self.sent: list[str] = []


async def test_a_listener_gets_its_dependency_beside_the_event_arguments() -> None:
    seen: list[tuple[str, str]] = []

    def get_mailer() -> Mailer:
        return Mailer("real")

    @listener("user.created")
    async def welcome(email: str, mailer: Mailer = Depends(get_mailer)) -> None:
        seen.append((email, mailer.name))

    async with Bus(listeners=[welcome]) as bus:
        bus.emit("user.created", email="ada@example.com")
        await bus.drain()
    assert seen == [("ada@example.com", "real")]


async def test_sub_dependencies_are_resolved_once_per_delivery_with_use_cache() -> None:
    calls: list[str] = []
    seen: list[tuple[int, str, dict[str, str], dict[str, str]]] = []

    def settings() -> dict[str, str]:
        calls.append("settings")
        return {"host": "mail.example.com"}

    def fresh() -> dict[str, str]:
        calls.append("fresh")
        return {}

    async def get_mailer(conf: Annotated[dict[str, str], Depends(settings)]) -> Mailer:
        return Mailer(conf["host"])

    @listener("user.created")
    async def welcome(
        n: int,
        mailer: Annotated[Mailer, Depends(get_mailer)],
        conf: Annotated[dict[str, str], Depends(settings)],
        again: Annotated[dict[str, str], Depends(fresh, use_cache=False)],
        more: Annotated[dict[str, str], Depends(fresh, use_cache=False)],
    ) -> None:
        seen.append((n, mailer.name, conf, again))

    async with Bus(listeners=[welcome]) as bus:
        bus.emit("user.created", n=1)
        bus.emit("user.created", n=2)
        await bus.drain()
    assert sorted(s[0] for s in seen) == [1, 2]
    assert all(s[1] == "mail.example.com" for s in seen)
    # Cached within one delivery, fresh for the next; use_cache=False runs each time.
    assert calls.count("settings") == 2
    assert calls.count("fresh") == 4


async def test_yield_dependencies_are_torn_down_after_the_delivery() -> None:
    log: list[str] = []

    async def session() -> AsyncIterator[str]:
        log.append("open")
        try:
            yield "session"
        except RuntimeError as exc:
            log.append(f"saw {exc}")
            raise
        finally:
            log.append("close")

    def sync_resource() -> Iterator[str]:
        log.append("sync open")
        yield "resource"
        log.append("sync close")

    failures: list[BaseException] = []

    @listener("job", retry=Retry(attempts=1), on_dead=lambda e, lst, exc: failures.append(exc))
    async def job(
        fail: bool,
        db: Annotated[str, Depends(session)],
        res: Annotated[str, Depends(sync_resource)],
    ) -> None:
        log.append(f"run with {db} and {res}")
        if fail:
            raise RuntimeError("boom")

    async with Bus(listeners=[job]) as bus:
        bus.emit("job", fail=False)
        await bus.drain()
        assert log == ["open", "sync open", "run with session and resource", "sync close", "close"]
        log.clear()
        bus.emit("job", fail=True)
        await bus.drain()
    # The listener's exception reaches the yield dependency, then the delivery fails.
    assert "saw boom" in log
    assert log[-1] == "close"
    assert [str(e) for e in failures] == ["boom"]


async def test_a_sync_listener_with_dependencies_runs_in_a_thread() -> None:
    import threading

    seen: list[tuple[str, bool]] = []
    main = threading.get_ident()

    def get_mailer() -> Mailer:
        return Mailer()

    @listener("user.created")
    def welcome(email: str, mailer: Mailer = Depends(get_mailer)) -> None:
        seen.append((mailer.name, threading.get_ident() != main))

    async with Bus(listeners=[welcome]) as bus:
        bus.emit("user.created", email="a@b.c")
        await bus.drain()
    assert seen == [("smtp", True)]


async def test_positional_event_arguments_bind_around_a_dependency() -> None:
    seen: list[tuple[int, Mailer, int, Event]] = []

    def get_mailer() -> Mailer:
        return Mailer()

    @listener("add")
    async def add(
        a: int, mailer: Mailer = Depends(get_mailer), b: int = 0, *, event: Event
    ) -> None:
        seen.append((a, mailer, b, event))

    async with Bus(listeners=[add]) as bus:
        bus.emit("add", 1, b=2)
        await bus.drain()
    ((a, mailer, b, event),) = seen
    assert (a, b, event.name) == (1, 2, "add")
    assert isinstance(mailer, Mailer)


async def test_the_apps_dependency_overrides_are_honoured() -> None:
    sent: list[str] = []

    def get_mailer() -> Mailer:
        raise AssertionError("the override replaces the real mailer")

    fake = Mailer("fake")

    @listener("user.created")
    async def welcome(email: str, mailer: Mailer = Depends(get_mailer)) -> None:
        sent.append(f"{mailer.name}:{email}")

    bus = Bus(listeners=[welcome])
    app = FastAPI(lifespan=lifespan(bus))
    app.dependency_overrides[get_mailer] = lambda: fake
    async with lifespan(bus)(app):
        bus.emit("user.created", email="a@b.c")
        await bus.drain()
    assert sent == ["fake:a@b.c"]


async def test_overrides_of_a_bound_app_reach_listeners_subscribed_later() -> None:
    def get_mailer() -> Mailer:
        return Mailer("real")

    seen: list[str] = []

    async def welcome(email: str, mailer: Mailer = Depends(get_mailer)) -> None:
        seen.append(mailer.name)

    app = FastAPI()
    app.dependency_overrides[get_mailer] = lambda: Mailer("fake")
    async with Bus() as bus:
        bind(bus, app)
        try:
            bus.subscribe(welcome, "user.created")
            bus.emit("user.created", email="a@b.c")
            await bus.drain()
        finally:
            unbind(bus, app)
        bus.emit("user.created", email="a@b.c")
        await bus.drain()
    assert seen == ["fake", "real"]


def test_a_listener_asking_for_the_request_is_refused_at_registration() -> None:
    with pytest.raises(ConfigurationError, match=r"asks_for_request.*Request.*'request'"):

        @listener("user.created")
        async def asks_for_request(email: str, request: Request) -> None: ...

    with pytest.raises(ConfigurationError, match="WebSocket"):

        @listener("user.created")
        async def asks_for_socket(ws: WebSocket) -> None: ...

    with pytest.raises(ConfigurationError, match="BackgroundTasks"):

        @listener("user.created")
        async def asks_for_tasks(tasks: BackgroundTasks) -> None: ...

    with pytest.raises(ConfigurationError, match="Request"):

        @listener("user.created")
        async def asks_for_starlette_request(request: StarletteRequest) -> None: ...


def test_a_dependency_that_needs_the_request_is_refused_at_registration() -> None:
    def current_user(request: Request) -> str:
        return "ada"

    def needs_query(token: str) -> str:
        return token

    def optional_query(limit: int = 10) -> int:
        return limit

    def wraps_user(user: str = Depends(current_user)) -> str:
        return user

    with pytest.raises(ConfigurationError, match=r"welcome.*current_user.*the Request"):

        @listener("user.created")
        async def welcome(user: str = Depends(wraps_user)) -> None: ...

    with pytest.raises(ConfigurationError, match=r"needs_query.*query parameter 'token'"):

        @listener("user.created")
        async def audit(token: str = Depends(needs_query)) -> None: ...

    # A parameter with a default is no request parameter at all here: it takes its default.
    @listener("user.created")
    async def fine(limit: int = Depends(optional_query)) -> None: ...


async def test_lifespan_starts_and_drains_the_bus_and_puts_it_in_the_state() -> None:
    seen: list[str] = []

    @listener("user.created")
    async def welcome(email: str) -> None:
        seen.append(email)

    bus = Bus(listeners=[welcome])
    app = FastAPI(lifespan=lifespan(bus))

    @app.post("/users")
    async def create() -> dict[str, Any]:
        bus.emit("user.created", email="ada@example.com")
        return {"ok": True}

    async with app.router.lifespan_context(app) as state:
        assert bus.started
        assert state is not None
        assert state["bus"] is bus
        # ASGITransport sends no lifespan events: the lifespan runs around the client.
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            response = await client.post("/users")
            assert response.status_code == 200
    assert not bus.started
    assert seen == ["ada@example.com"]


async def test_lifespan_runs_the_apps_own_lifespan_inside_and_serves_starlette(
    tmp_path: Path,
) -> None:
    log: list[str] = []

    @listener("app.*")
    async def record(event: Event) -> None:
        log.append(event.name)

    bus = Bus(listeners=[record])

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def own(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        bus.emit("app.started")  # the bus is already running
        yield {"db": "sqlite"}
        bus.emit("app.stopping")  # and still running: drained after

    async def home(request: StarletteRequest) -> PlainTextResponse:
        return PlainTextResponse(request.state.db)

    app = Starlette(routes=[Route("/", home)], lifespan=lifespan(bus, own))
    async with app.router.lifespan_context(app) as state:
        assert state is not None
        assert state == {"bus": bus, "db": "sqlite"}
    assert log == ["app.started", "app.stopping"]


async def test_dependencies_are_resolved_in_a_worker_reading_a_durable_store(
    tmp_path: Path,
) -> None:
    from datetime import datetime

    seen: list[tuple[datetime, str]] = []

    def get_mailer() -> Mailer:
        return Mailer("worker")

    @listener("user.created")
    async def welcome(created: datetime, mailer: Annotated[Mailer, Depends(get_mailer)]) -> None:
        seen.append((created, mailer.name))

    url = f"sqlite:///{tmp_path / 'events.db'}"
    when = datetime(2026, 1, 2, 3, 4, 5)
    async with Bus(url, listeners=[welcome], consume=False) as web:
        await web.publish("user.created", created=when)
    worker = Bus(url, listeners=[welcome])
    worker.backend.poll_s = 0.01  # type: ignore[attr-defined]
    async with worker:
        await worker.drain()
    assert seen == [(when, "worker")]


async def test_a_callable_object_listener_takes_dependencies_too() -> None:
    seen: list[tuple[str, str]] = []

    def get_mailer() -> Mailer:
        return Mailer("object")

    class Welcome:
        async def __call__(self, email: str, mailer: Mailer = Depends(get_mailer)) -> None:
            seen.append((email, mailer.name))

    async with Bus() as bus:
        bus.subscribe(Welcome(), "user.created")
        bus.emit("user.created", email="a@b.c")
        await bus.drain()
    assert seen == [("a@b.c", "object")]


@listener("user.created")
async def _welcome_once_per_client(email: str) -> None:
    _welcomed.append(email)


_welcomed: list[str] = []
# As the README writes it: one bus and one app, at module level.
_module_bus = Bus(listeners=[_welcome_once_per_client])
_module_app = FastAPI(lifespan=lifespan(_module_bus))


@_module_app.post("/users/{email}")
async def _create_user(email: str) -> dict[str, bool]:
    _module_bus.emit("user.created", email=email)
    return {"ok": True}


# What users write today; Starlette asks for another HTTP client for it in time.
_TEST_CLIENT_WARNING = "ignore:Using `httpx` with `starlette.testclient` is deprecated"


@pytest.mark.filterwarnings(_TEST_CLIENT_WARNING)
@pytest.mark.parametrize("run", [1, 2])
def test_a_module_level_bus_serves_one_test_client_after_another(run: int) -> None:
    from fastapi.testclient import TestClient

    _welcomed.clear()
    for client_number in range(2):
        with TestClient(_module_app) as client:
            response = client.post(f"/users/{run}-{client_number}")
            assert response.status_code == 200
        assert not _module_bus.started
    assert _welcomed == [f"{run}-0", f"{run}-1"]


@pytest.mark.filterwarnings(_TEST_CLIENT_WARNING)
@pytest.mark.parametrize("run", [1, 2])
async def test_the_tidings_bus_fixture_beside_a_module_level_app(
    tidings_bus: Bus, run: int
) -> None:
    from fastapi.testclient import TestClient

    seen: list[int] = []
    tidings_bus.subscribe(seen.append, "n")
    tidings_bus.emit("n", run)
    await tidings_bus.drain()
    assert seen == [run]
    with TestClient(_module_app) as client:
        assert client.post(f"/users/fixture-{run}").status_code == 200
