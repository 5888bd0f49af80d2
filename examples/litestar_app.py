"""Sign-ups on Litestar, with Litestar's own ``@listener`` and ``request.app.emit``:
POST /users stores a user and emits ``user_created``; listeners send the welcome mail and
notify support, after the response, with retries, through a tidings bus.

uv run python examples/litestar_app.py
curl -X POST 127.0.0.1:8000/users -H 'content-type: application/json' \\
     -d '{"name": "Ada", "email": "ada@example.com"}'

For a durable store, give the bus a URL: ``Bus("sqlite:///events.db", ...)``.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Litestar, Request, get, post
from litestar.events import listener
from litestar.exceptions import NotFoundException
from litestar.params import FromPath, JSONBody

from tidings import Bus, Retry
from tidings.contrib.litestar import TidingsPlugin


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


# Each listener names only the arguments it needs (Litestar alone would pass them all).
@listener("user_created")
async def send_welcome_mail(name: str, email: str) -> None:
    await mailer.send(email, f"Welcome, {name}!")


@listener("user_created")
def notify_support(user_id: int, name: str) -> None:
    desk.notify(f"new user #{user_id}: {name}")


class NewUser(msgspec.Struct):
    name: str
    email: str


class User(msgspec.Struct):
    id: int
    name: str
    email: str


def create_app() -> Litestar:
    """The app and its own bus (started and drained with the app by the plugin)."""
    bus = Bus(retry=Retry(attempts=3, backoff=0.5))
    users: dict[int, User] = {}

    @post("/users")
    async def create_user(data: JSONBody[NewUser], request: Request[Any, Any, Any]) -> User:
        user = User(id=len(users) + 1, name=data.name, email=data.email)
        users[user.id] = user
        request.app.emit("user_created", user_id=user.id, name=user.name, email=user.email)
        return user

    @get("/users/{user_id:int}")
    async def read_user(user_id: FromPath[int]) -> User:
        if user_id not in users:
            raise NotFoundException(f"no user {user_id}")
        return users[user_id]

    app = Litestar(
        route_handlers=[create_user, read_user],
        listeners=[send_welcome_mail, notify_support],
        plugins=[TidingsPlugin(bus)],
    )
    app.state.bus = bus
    return app


app = create_app()


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=8000)
