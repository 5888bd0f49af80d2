"""Sign-ups on Starlette: POST /users stores a user and emits ``user.created``;
listeners send the welcome mail and notify support once the response is sent.

uv run python examples/starlette_app.py
curl -X POST 127.0.0.1:8000/users -H 'content-type: application/json' \\
     -d '{"name": "Ada", "email": "ada@example.com"}'
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tidings import Bus, Retry, listener
from tidings.asgi import EventsMiddleware


class Mailer:
    """Sends mail (here: keeps it in an outbox and prints it)."""

    def __init__(self) -> None:
        self.outbox: list[tuple[str, str]] = []

    async def send(self, to: str, subject: str) -> None:
        self.outbox.append((to, subject))
        print(f"mail to {to}: {subject}")


class SupportDesk:
    """Where support hears of new users."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def notify(self, note: str) -> None:
        self.notes.append(note)
        print(f"support: {note}")


mailer = Mailer()
desk = SupportDesk()


@listener("user.created", retry=Retry(attempts=3, backoff=0.5))
async def send_welcome_mail(name: str, email: str) -> None:
    await mailer.send(email, f"Welcome, {name}!")


@listener("user.created")
def notify_support(user_id: int, name: str) -> None:
    desk.notify(f"new user #{user_id}: {name}")


def create_app() -> Starlette:
    """The app and its own bus, run by the app's lifespan."""
    bus = Bus(listeners=[send_welcome_mail, notify_support])
    users: dict[int, dict[str, object]] = {}

    async def create_user(request: Request) -> JSONResponse:
        new = await request.json()
        if not isinstance(new.get("name"), str) or not isinstance(new.get("email"), str):
            return JSONResponse({"detail": "name and email are required"}, status_code=422)
        user = {"id": len(users) + 1, "name": new["name"], "email": new["email"]}
        users[len(users) + 1] = user
        bus.emit("user.created", user_id=user["id"], name=user["name"], email=user["email"])
        return JSONResponse(user, status_code=201)

    async def read_user(request: Request) -> JSONResponse:
        user = users.get(request.path_params["user_id"])
        if user is None:
            return JSONResponse({"detail": "no such user"}, status_code=404)
        return JSONResponse(user)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with bus:
            yield

    app = Starlette(
        routes=[
            Route("/users", create_user, methods=["POST"]),
            Route("/users/{user_id:int}", read_user),
        ],
        middleware=[Middleware(EventsMiddleware, bus=bus)],
        lifespan=lifespan,
    )
    app.state.bus = bus
    return app


app = create_app()


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=8000)
