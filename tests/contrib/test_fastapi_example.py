"""examples/fastapi_app.py, driven through httpx's ASGI transport and through uvicorn."""

from __future__ import annotations

import asyncio
import socket

import httpx
import uvicorn

from examples.fastapi_app import (
    Mailer,
    SupportDesk,
    create_app,
    get_mailer,
    get_support_desk,
    notify_support,
)
from tidings import Bus


async def test_signing_up_sends_the_welcome_mail_and_notifies_support() -> None:
    app = create_app()
    mailer, desk = Mailer(), SupportDesk()
    app.dependency_overrides[get_mailer] = lambda: mailer
    app.dependency_overrides[get_support_desk] = lambda: desk
    bus: Bus = app.state.bus
    # ASGITransport sends no lifespan events, so the app's lifespan runs around it.
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            created = await client.post("/users", json={"name": "Ada", "email": "ada@example.com"})
            assert created.status_code == 201
            assert created.json() == {"id": 1, "name": "Ada", "email": "ada@example.com"}
            assert (await client.get("/users/1")).json()["name"] == "Ada"
            assert (await client.get("/users/2")).status_code == 404
            await bus.drain()
            assert mailer.outbox == [("ada@example.com", "Welcome, Ada!")]
            assert desk.notes == ["new user #1: Ada"]
    assert not bus.started


async def test_the_app_serves_on_uvicorn_and_drains_the_bus_on_shutdown() -> None:
    app = create_app()
    mailer, desk = Mailer(), SupportDesk()
    app.dependency_overrides[get_mailer] = lambda: mailer
    app.dependency_overrides[get_support_desk] = lambda: desk
    bus: Bus = app.state.bus
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            for name in ("Ada", "Bob"):
                response = await client.post(
                    "/users", json={"name": name, "email": f"{name.lower()}@example.com"}
                )
                assert response.status_code == 201
    finally:
        server.should_exit = True
        await serving
        sock.close()
    # Shutting down drained the bus: every delivery ran before the server stopped.
    assert not bus.started
    assert sorted(to for to, _ in mailer.outbox) == ["ada@example.com", "bob@example.com"]
    assert sorted(desk.notes) == ["new user #1: Ada", "new user #2: Bob"]
    assert bus.stats()["listeners"][notify_support.qualname]["delivered"] == 2
