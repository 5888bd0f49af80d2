"""Sign-ups on FastAPI: POST /users stores a user and emits ``user.created``; listeners
send the welcome mail (with a mailer from ``Depends``) and notify support, after the
response and outside the request.

uv run python examples/fastapi_app.py
curl -X POST 127.0.0.1:8000/users -H 'content-type: application/json' \\
     -d '{"name": "Ada", "email": "ada@example.com"}'
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel

from tidings import Bus, Retry, listener
from tidings.asgi import EventsMiddleware
from tidings.contrib.fastapi import lifespan


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


_mailer = Mailer()
_desk = SupportDesk()


def get_mailer() -> Mailer:
    """The mailer (tests override it with ``app.dependency_overrides``)."""
    return _mailer


def get_support_desk() -> SupportDesk:
    """The support desk."""
    return _desk


@listener("user.created", retry=Retry(attempts=3, backoff=0.5))
async def send_welcome_mail(
    name: str, email: str, mailer: Annotated[Mailer, Depends(get_mailer)]
) -> None:
    await mailer.send(email, f"Welcome, {name}!")


@listener("user.created")
def notify_support(
    user_id: int, name: str, desk: Annotated[SupportDesk, Depends(get_support_desk)]
) -> None:
    desk.notify(f"new user #{user_id}: {name}")


class NewUser(BaseModel):
    name: str
    email: str


class User(NewUser):
    id: int


def create_app() -> FastAPI:
    """The app and its own bus (started and drained by the app's lifespan)."""
    bus = Bus(listeners=[send_welcome_mail, notify_support])
    app = FastAPI(title="sign-ups", lifespan=lifespan(bus))
    # The events a request emits run once its response is sent, if it succeeded.
    app.add_middleware(EventsMiddleware, bus=bus)
    app.state.bus = bus
    users: dict[int, User] = {}

    @app.post("/users", status_code=201)
    async def create_user(new: NewUser) -> User:
        user = User(id=len(users) + 1, **new.model_dump())
        users[user.id] = user
        bus.emit("user.created", user_id=user.id, name=user.name, email=user.email)
        return user

    @app.get("/users/{user_id}")
    async def read_user(user_id: int) -> User:
        if user_id not in users:
            raise HTTPException(404, f"no user {user_id}")
        return users[user_id]

    return app


app = create_app()


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=8000)
