"""Litestar: its own listeners and ``app.emit`` through tidings, with Litestar's
semantics (the cases of Litestar's events tests), and the plugin."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any
from unittest.mock import MagicMock

import pytest
from litestar import Litestar, Request, get, post
from litestar.di import NamedDependency
from litestar.events import EventListener, listener
from litestar.exceptions import ImproperlyConfiguredException
from litestar.params import FromPath, JSONBody
from litestar.status_codes import HTTP_200_OK
from litestar.testing import AsyncTestClient, create_test_client

from tidings import Bus, Retry
from tidings import listener as tidings_listener
from tidings.contrib.litestar import TidingsEmitterBackend, TidingsPlugin

Backend = TidingsEmitterBackend


@dataclasses.dataclass
class CreateUserDTO:
    first_name: str
    last_name: str
    email: str


@pytest.fixture
def mock() -> MagicMock:
    return MagicMock()


@pytest.fixture
def sync_listener(mock: MagicMock) -> EventListener:
    @listener("test_event")
    def listener_fn(*args: Any, **kwargs: Any) -> None:
        mock(*args, **kwargs)

    return listener_fn


@pytest.fixture
def async_listener(mock: MagicMock) -> EventListener:
    @listener("test_event")
    async def listener_fn(*args: Any, **kwargs: Any) -> None:
        mock(*args, **kwargs)

    return listener_fn


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_listener_gets_the_positional_and_keyword_arguments(
    kind: str, mock: MagicMock, sync_listener: EventListener, async_listener: EventListener
) -> None:
    @get("/", sync_to_thread=False)
    def route_handler(request: Request[Any, Any, Any]) -> None:
        request.app.emit("test_event", "positional", keyword="keyword-value")

    chosen = sync_listener if kind == "sync" else async_listener
    with create_test_client(
        route_handlers=[route_handler], listeners=[chosen], event_emitter_backend=Backend
    ) as client:
        assert client.get("/").status_code == HTTP_200_OK
    mock.assert_called_with("positional", keyword="keyword-value")


async def test_shutdown_waits_for_what_is_pending(
    async_listener: EventListener, mock: MagicMock
) -> None:
    async with Backend([async_listener]) as emitter:
        for _ in range(100):
            emitter.emit("test_event")
    assert mock.call_count == 100


def test_several_listeners_of_one_event(
    async_listener: EventListener, sync_listener: EventListener, mock: MagicMock
) -> None:
    @get("/", sync_to_thread=False)
    def route_handler(request: Request[Any, Any, Any]) -> None:
        request.app.emit("test_event")

    with create_test_client(
        route_handlers=[route_handler],
        listeners=[async_listener, sync_listener],
        event_emitter_backend=Backend,
    ) as client:
        assert client.get("/").status_code == HTTP_200_OK
    assert mock.call_count == 2


def test_one_listener_of_several_events(mock: MagicMock) -> None:
    @listener("test_event_1", "test_event_2")
    def event_handler() -> None:
        mock()

    @get("/{event_id:int}", sync_to_thread=False)
    def route_handler(request: Request[Any, Any, Any], event_id: FromPath[int]) -> None:
        request.app.emit(f"test_event_{event_id}")

    with create_test_client(
        route_handlers=[route_handler], listeners=[event_handler], event_emitter_backend=Backend
    ) as client:
        assert client.get("/1").status_code == HTTP_200_OK
        assert client.get("/2").status_code == HTTP_200_OK
    assert mock.call_count == 2


def test_emit_before_startup_is_a_runtime_error() -> None:
    app = Litestar([], event_emitter_backend=Backend)
    with pytest.raises(RuntimeError, match="not initialized"):
        app.emit("x")


def test_an_event_nobody_listens_to_is_improperly_configured(
    async_listener: EventListener,
) -> None:
    with (
        create_test_client(
            route_handlers=[], listeners=[async_listener], event_emitter_backend=Backend
        ) as client,
        pytest.raises(ImproperlyConfiguredException, match="for event ID: x"),
    ):
        client.app.emit("x")


def test_a_raising_listener_disturbs_no_other(
    async_listener: EventListener, sync_listener: EventListener, mock: MagicMock
) -> None:
    error_mock = MagicMock()

    @listener("async_error_event")
    async def async_raising_listener(*args: Any, **kwargs: Any) -> None:
        error_mock()
        raise ValueError("test")

    @listener("sync_error_event")
    def sync_raising_listener(*args: Any, **kwargs: Any) -> None:
        error_mock()
        raise ValueError("test")

    @get("/async-error", sync_to_thread=False)
    def route_handler_1(request: Request[Any, Any, Any]) -> None:
        request.app.emit("async_error_event")

    @get("/sync-error", sync_to_thread=False)
    def route_handler_2(request: Request[Any, Any, Any]) -> None:
        request.app.emit("sync_error_event")

    @get("/no-error", sync_to_thread=False)
    def route_handler_3(request: Request[Any, Any, Any]) -> None:
        request.app.emit("test_event")

    with create_test_client(
        route_handlers=[route_handler_1, route_handler_2, route_handler_3],
        listeners=[async_listener, sync_listener, async_raising_listener, sync_raising_listener],
        event_emitter_backend=Backend,
    ) as client:
        assert client.get("/async-error").status_code == HTTP_200_OK
        assert client.get("/sync-error").status_code == HTTP_200_OK
        assert client.get("/no-error").status_code == HTTP_200_OK
    assert error_mock.call_count == 2
    assert mock.call_count == 2


def test_listeners_take_only_the_arguments_they_name() -> None:
    # Litestar's documented example, without the **kwargs it needs there.
    mails: list[str] = []
    tickets: list[str] = []

    @listener("user_deleted")
    async def send_farewell_email_handler(email: str) -> None:
        mails.append(email)

    @listener("user_deleted")
    async def notify_customer_support(reason: str) -> None:
        tickets.append(reason)

    @post("/users/{user_id:int}/delete")
    async def delete_user(request: Request[Any, Any, Any], user_id: FromPath[int]) -> None:
        request.app.emit("user_deleted", email=f"{user_id}@example.com", reason="asked")

    with create_test_client(
        route_handlers=[delete_user],
        listeners=[send_farewell_email_handler, notify_customer_support],
        event_emitter_backend=Backend,
    ) as client:
        assert client.post("/users/7/delete").status_code == 201
    assert mails == ["7@example.com"]
    assert tickets == ["asked"]


def test_a_durable_store_with_retries_and_dead_letters(tmp_path: Path) -> None:
    attempts: list[int] = []

    @listener("order_paid")
    async def charge(order_id: int) -> None:
        attempts.append(order_id)
        raise ConnectionError("the payment service is down")

    @post("/orders/{order_id:int}/pay")
    async def pay(request: Request[Any, Any, Any], order_id: FromPath[int]) -> None:
        request.app.emit("order_paid", order_id=order_id)

    url = f"sqlite:///{tmp_path / 'events.db'}?poll_interval=0.01"
    bus = Bus(url, retry=Retry(attempts=3, backoff=0, jitter=0))
    with create_test_client(
        route_handlers=[pay], listeners=[charge], event_emitter_backend=Backend.using(bus)
    ) as client:
        assert client.post("/orders/5/pay").status_code == 201
    assert attempts == [5, 5, 5]

    async def dead() -> list[Any]:
        async with Bus(url, consume=False) as reader:
            return await reader.list_dead_letters()

    import asyncio

    (letter,) = asyncio.run(dead())
    assert letter.error == "ConnectionError: the payment service is down"
    assert letter.listener.endswith("charge")


async def test_the_plugin_runs_litestar_listeners_after_the_response() -> None:
    sent: list[str] = []

    @listener("user_created")
    async def send_welcome_email_handler(email: str) -> None:
        sent.append(email)

    @post("/users")
    async def create_user(
        request: Request[Any, Any, Any], bus: NamedDependency[Bus]
    ) -> dict[str, Any]:
        request.app.emit("user_created", email="ada@example.com")
        bus.emit("user_created", email="bob@example.com")
        return {"queued_before_response": list(sent)}

    bus = Bus()
    app = Litestar(
        route_handlers=[create_user],
        listeners=[send_welcome_email_handler],
        plugins=[TidingsPlugin(bus)],
    )
    async with AsyncTestClient(app) as client:
        response = await client.post("/users")
        assert response.status_code == 201
        assert response.json() == {"queued_before_response": []}
        await bus.drain()
        assert sent == ["ada@example.com", "bob@example.com"]
    assert not bus.started


async def test_the_scenarios_of_litestars_events_page_with_the_plugin() -> None:
    # Its examples import modules of an imagined app (db, utils.email): the same
    # listeners and handlers, with stand-ins for those.
    mails: list[tuple[str, str]] = []
    support: list[str] = []

    @listener("user_created")
    async def send_welcome_email_handler(email: str) -> None:
        mails.append((email, "welcome"))

    @listener("user_deleted")
    async def send_farewell_email_handler(email: str, **kwargs: Any) -> None:
        mails.append((email, "farewell"))

    @listener("user_deleted")
    async def notify_customer_support(reason: str) -> None:  # no **kwargs needed
        support.append(reason)

    @listener("user_created", "password_changed")
    async def send_email_handler(email: str, message: str = "") -> None:
        mails.append((email, message or "-"))

    @post("/users")
    async def create_user_handler(
        data: JSONBody[CreateUserDTO], request: Request[Any, Any, Any]
    ) -> None:
        request.app.emit("user_created", email=data.email)

    @post("/users/delete")
    async def delete_user_handler(
        data: JSONBody[CreateUserDTO], request: Request[Any, Any, Any]
    ) -> None:
        request.app.emit("user_deleted", email=data.email, reason="deleted")

    @post("/password")
    async def change_password(request: Request[Any, Any, Any]) -> None:
        request.app.emit("password_changed", email="ada@example.com", message="changed")

    bus = Bus()
    app = Litestar(
        route_handlers=[create_user_handler, delete_user_handler, change_password],
        listeners=[
            send_welcome_email_handler,
            send_farewell_email_handler,
            notify_customer_support,
            send_email_handler,
        ],
        plugins=[TidingsPlugin(bus)],
    )
    user = {"first_name": "Ada", "last_name": "Lovelace", "email": "ada@example.com"}
    async with AsyncTestClient(app) as client:
        assert (await client.post("/users", json=user)).status_code == 201
        assert (await client.post("/users/delete", json=user)).status_code == 201
        assert (await client.post("/password")).status_code == 201
        await bus.drain()
    assert sorted(mails) == [
        ("ada@example.com", "-"),
        ("ada@example.com", "changed"),
        ("ada@example.com", "farewell"),
        ("ada@example.com", "welcome"),
    ]
    assert support == ["deleted"]


@pytest.mark.parametrize("with_plugin", [True, False])
async def test_payload_keywords_named_like_options_reach_the_listener(with_plugin: bool) -> None:
    invalidated: list[tuple[str, int]] = []

    @listener("cache_invalidated")
    async def drop_from_cache(key: str, delay: int) -> None:
        invalidated.append((key, delay))

    @post("/cache/{k:str}")
    async def invalidate(k: FromPath[str], request: Request[Any, Any, Any]) -> None:
        request.app.emit("cache_invalidated", key=k, delay=60)

    bus = Bus()
    extra: dict[str, Any] = (
        {"plugins": [TidingsPlugin(bus)]}
        if with_plugin
        else {"event_emitter_backend": Backend.using(bus)}
    )
    app = Litestar(route_handlers=[invalidate], listeners=[drop_from_cache], **extra)
    async with AsyncTestClient(app) as client:
        assert (await client.post("/cache/user-1")).status_code == 201
        await bus.drain()
        assert invalidated == [("user-1", 60)]
        assert bus.dead_letters() == []


async def test_the_plugin_takes_tidings_listeners_beside_litestars() -> None:
    seen: list[str] = []

    @tidings_listener("user_created", retry=2)
    async def welcome(email: str) -> None:
        seen.append(f"tidings {email}")

    @listener("user_created")
    async def audit(email: str) -> None:
        seen.append(f"litestar {email}")

    @post("/users")
    async def create_user(request: Request[Any, Any, Any]) -> None:
        request.app.emit("user_created", email="ada@example.com")

    bus = Bus()
    for _ in range(2):  # one plugin, two apps (as two test clients make): subscribed once
        app = Litestar(
            route_handlers=[create_user],
            # Litestar's annotation names only its own listener class.
            listeners=[welcome, audit],  # type: ignore[list-item]
            plugins=[TidingsPlugin(bus)],
        )
        seen.clear()
        async with AsyncTestClient(app) as client:
            assert (await client.post("/users")).status_code == 201
            await bus.drain()
        assert sorted(seen) == ["litestar ada@example.com", "tidings ada@example.com"]


@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_apps_on_one_bus_share_its_litestar_listeners(store: str, tmp_path: Path) -> None:
    got: list[int] = []

    @listener("order_paid")
    async def charge(order_id: int) -> None:
        got.append(order_id)

    @post("/orders/{order_id:int}/pay")
    async def pay(request: Request[Any, Any, Any], order_id: FromPath[int]) -> None:
        request.app.emit("order_paid", order_id=order_id)

    url = "memory://" if store == "memory" else f"sqlite:///{tmp_path / 'events.db'}"
    bus = Bus(url)

    def create_app() -> Litestar:
        return Litestar([pay], listeners=[charge], plugins=[TidingsPlugin(bus)])

    create_app()  # a module-level app, never started here
    test_app = create_app()  # a test's own, on the same bus
    assert [item.qualname.rsplit(".", 1)[-1] for item in bus.listeners()] == ["charge"]
    for order_id in (1, 2):  # started twice, as one test client after another
        async with AsyncTestClient(test_app) as client:
            assert (await client.post(f"/orders/{order_id}/pay")).status_code == 201
            await bus.drain()
        assert got == list(range(1, order_id + 1))
        assert not bus.started
    assert len(bus.listeners()) == 1  # still held by the app that never started


async def test_on_shutdown_may_close_the_bus() -> None:
    bus = Bus()
    app = Litestar(route_handlers=[], on_startup=[bus.start], on_shutdown=[bus.aclose])
    async with AsyncTestClient(app):
        assert bus.started
    assert not bus.started


async def test_the_emitter_backend_alone_takes_tidings_listeners_too() -> None:
    seen: list[str] = []

    @tidings_listener("user_created")
    async def welcome(email: str) -> None:
        seen.append(email)

    async with Backend([welcome]) as emitter:  # type: ignore[list-item]
        emitter.emit("user_created", email="ada@example.com")
    assert seen == ["ada@example.com"]
