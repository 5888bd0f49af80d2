"""examples/litestar_app.py and examples/starlette_app.py, through httpx's ASGI transport
(examples/fastapi_app.py has its own tests, uvicorn included)."""

from __future__ import annotations

import importlib
from pathlib import Path

import httpx
import pytest

from examples import litestar_app, starlette_app
from tidings import Bus


def _client(app: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app")  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _fresh_outboxes() -> None:
    for module in (litestar_app, starlette_app):
        module.mailer.outbox.clear()
        module.desk.notes.clear()


async def test_litestar_sign_ups() -> None:
    app = litestar_app.create_app()
    bus: Bus = app.state.bus
    async with app.lifespan(), _client(app) as client:
        created = await client.post("/users", json={"name": "Ada", "email": "ada@example.com"})
        assert created.status_code == 201
        assert created.json() == {"id": 1, "name": "Ada", "email": "ada@example.com"}
        assert (await client.get("/users/1")).json()["name"] == "Ada"
        assert (await client.get("/users/2")).status_code == 404
        await bus.drain()
        assert litestar_app.mailer.outbox == [("ada@example.com", "Welcome, Ada!")]
        assert litestar_app.desk.notes == ["new user #1: Ada"]
    assert not bus.started


async def test_starlette_sign_ups() -> None:
    app = starlette_app.create_app()
    bus: Bus = app.state.bus
    async with app.router.lifespan_context(app), _client(app) as client:
        created = await client.post("/users", json={"name": "Ada", "email": "ada@example.com"})
        assert created.status_code == 201
        assert created.json() == {"id": 1, "name": "Ada", "email": "ada@example.com"}
        assert (await client.post("/users", json={"name": 1})).status_code == 422
        assert (await client.get("/users/1")).json()["name"] == "Ada"
        assert (await client.get("/users/2")).status_code == 404
        await bus.drain()
        assert starlette_app.mailer.outbox == [("ada@example.com", "Welcome, Ada!")]
        assert starlette_app.desk.notes == ["new user #1: Ada"]
    assert not bus.started


async def test_the_worker_example_keeps_options_apart_from_the_payload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIDINGS_URL", f"sqlite:///{tmp_path / 'e.db'}")
    from examples import worker

    example = importlib.reload(worker)
    example.bus.backend.consume = False
    async with example.bus as bus:
        await example.sign_up("ada@example.com")
        stats = await bus.listener_stats()
    audit = stats[f"{example.__name__}.audit"]
    assert (audit.pending, audit.delayed) == (1, 1)  # the reminder waits an hour
    assert stats[f"{example.__name__}.send_welcome"].pending == 1
